"""Starting or joining Ray, once, with a clear error when the cluster is not there."""

from __future__ import annotations

import os

import ray

from shardwise.cluster.membership import credentials_for
from shardwise.errors import ShardwiseError


def join(address: str | None, instead: str) -> bool:
    """Start Ray locally (address None) or join the cluster at `address`, unless Ray already runs
    in this process. True when this call started it, so the caller should shut it down.
    instead: what the user can do without a cluster, for the error message."""
    if ray.is_initialized():
        return False
    credentials = credentials_for(address)
    if credentials:
        os.environ.update(credentials)
        # (Ray read its settings from the environment on import, and keeps the first cluster's token
        # for the process: both again, or a second cluster - another lab - refuses this process)
        ray._raylet.Config.initialize("")
        ray._raylet.AuthenticationTokenLoader.instance().reset_cache()
    try:
        # "local": a new instance of our own, never a stale session another (killed) `ray start` left behind
        # (stages' logs reach this process only when asked for: shardwise --verbose)
        ray.init(address=address or "local", include_dashboard=False,
                 log_to_driver="SHARDWISE_LOG_LEVEL" in os.environ, configure_logging=False)
    except ConnectionError as e:
        if address is None:
            raise ShardwiseError(f"cannot start a local Ray instance ({e}): check /tmp/ray's space and "
                                 "permissions, or give --address of a running cluster") from None
        raise ShardwiseError(f"cannot join the Ray cluster at '{address}' ({e}): start it with `shardwise cluster "
                             "start` (then this machine needs `shardwise cluster join ADDRESS --token ...` first, "
                             f"unless it is the head), or drop --address to {instead}") from None
    return True
