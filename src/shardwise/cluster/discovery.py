"""Finding a cluster's head on the local network, as printers and speakers are found (mDNS /
DNS-SD, the zeroconf library): the head announces `_shardwise._tcp.local.` while its cluster
runs, and `cluster join` without an address takes the first head that proves it is the token's
cluster's (its certificate is from the authority the token gives), passing over the heads of
other clusters on the same network.
"""

from __future__ import annotations

import socket
import time

import ray
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from shardwise.cluster.membership import Membership, check_head, local_ip_towards
from shardwise.errors import ShardwiseError

SERVICE = "_shardwise._tcp.local."
LISTEN_S = 3.0  # how long a join listens for heads


@ray.remote(num_cpus=0)
class Announcer:
    """On the head's node: announces its address for as long as the cluster runs."""

    def __init__(self, head: str):
        host, _, port = head.rpartition(":")
        self.zeroconf = Zeroconf()
        self.zeroconf.register_service(ServiceInfo(
            SERVICE, f"shardwise head {host} {port}.{SERVICE}", port=int(port),
            addresses=[socket.inet_aton(host)], properties={"head": head}))

    def ready(self) -> bool:
        return True


def announce(head: str) -> None:
    """Start the head's announcer: a detached actor, so it lives while the cluster does (one per
    cluster: a second call finds the first)."""
    announcer = Announcer.options(name="shardwise-announcer", namespace="shardwise", lifetime="detached",
                                  get_if_exists=True).remote(head)
    try:
        ray.get(announcer.ready.remote(), timeout=60)
    except (ray.exceptions.RayError, OSError) as e:
        ray.kill(announcer)
        raise ShardwiseError(f"the head could not announce itself on the local network ({e}): other machines "
                             "join with its address") from None


def heads_nearby(listen_s: float = LISTEN_S) -> list[str]:
    """The HOST:PORT of every head that announces itself on this machine's networks."""
    zeroconf, found = Zeroconf(), []

    def seen(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added:
            info = zeroconf.get_service_info(service_type, name, timeout=2000)
            if info is not None and (head := info.properties.get(b"head")):
                found.append(head.decode())

    try:
        ServiceBrowser(zeroconf, SERVICE, handlers=[seen])
        time.sleep(listen_s)
    finally:
        zeroconf.close()
    return list(dict.fromkeys(found))


def find_head(secret: str, node_ip: str | None = None) -> str:
    """The address of the announced head whose cluster the secret is for."""
    heads = heads_nearby()
    for head in heads:
        trial = Membership.create(head, secret, node_ip or local_ip_towards(head.rpartition(":")[0]))
        try:
            check_head(trial)
            return head
        except ShardwiseError:
            continue
        finally:
            trial.forget()
    raise ShardwiseError(f"no head of this token's cluster announces itself on this network "
                         f"({len(heads)} other head{'s' * (len(heads) != 1)} heard in {LISTEN_S:g} s): give the "
                         "head's address, as `cluster start` printed it (multicast may not cross this network)")
