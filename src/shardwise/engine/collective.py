"""TensorGroup: the devices of one tensor-parallel stage, joined by torch.distributed.

Each device is a process of its own (a Ray actor). They meet at a TCP store the first device
opens, then sum their partial outputs with all-reduce: gloo between CPUs, NCCL between GPUs.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import psutil
import torch
import torch.distributed as dist

from shardwise.errors import ShardwiseError


def open_store(host: str) -> tuple[dist.TCPStore, int]:
    """The first device's rendezvous: a TCP store on a free port of `host`, and that port."""
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
    return store, store.port


def _interface_of(host: str) -> str | None:
    """The network interface that carries `host`'s address (gloo must talk on it: its default,
    the address the hostname resolves to, may not reach the other devices)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == host for a in addresses):
            return name
    return None


class TensorGroup:
    """rank: this device's place in the group of `size`; `address`: (host, port) of the first
    device's store (`store`: that store itself, on the first device); my_host: this device's
    address, whose interface gloo uses."""

    def __init__(self, rank: int, size: int, address: tuple[str, int], my_host: str, device: torch.device,
                 timeout_s: float = 120.0, store: dist.TCPStore | None = None):
        self.rank, self.size, self.device = rank, size, device
        if dist.is_initialized():  # a warm process that held another group's rank before
            dist.destroy_process_group()
        if device.type == "cpu" and (interface := _interface_of(my_host)):
            os.environ["GLOO_SOCKET_IFNAME"] = interface
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = store or dist.TCPStore(address[0], address[1], is_master=False, timeout=timeout)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                    world_size=size, timeout=timeout)
        except (RuntimeError, dist.DistStoreError) as e:
            raise ShardwiseError(f"tensor-parallel device {rank} could not reach the group at "
                                 f"{address[0]}:{address[1]} ({e}): check that the nodes reach each other") from None
        self.seconds = 0.0  # time spent in collectives (waiting for the slowest device included)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every device's x (in place)."""
        started = time.perf_counter()
        dist.all_reduce(x)
        self.seconds += time.perf_counter() - started
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """The first device's x, on every device (in place)."""
        started = time.perf_counter()
        dist.broadcast(x, src=0)
        self.seconds += time.perf_counter() - started
        return x

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
