"""TensorGroup: the devices of one tensor-parallel stage, summing their parts each layer.

Each device is a process of its own (a Ray actor). They meet at a TCP store the first device
opens. GPUs sum with NCCL (torch.distributed). CPUs sum over direct TCP connections between
every pair of devices: each sends its part to every other, and each adds all parts up in rank
order, so every device holds the same bits. Not gloo: its all-reduce sleeps in the kernel
while it waits, and waking took 0.3 ms at the median and 4-8 ms at the tail on this project's
2-core machine (a 135M model's 60 all-reduces a step cost 80 ms). Here a device waiting for a
part polls its socket for a while before it sleeps (a tensor-parallel layer's parts arrive
within microseconds of each other when the devices are balanced).
"""

from __future__ import annotations

import datetime
import os
import select
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from shardwise.errors import ShardwiseError

POLL_S = 0.002  # how long a device polls for a part before it sleeps until one arrives


def open_store(host: str) -> tuple[dist.TCPStore, int]:
    """The first device's rendezvous: a TCP store on a free port of `host`, and that port."""
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
    return store, store.port


class TensorGroup:
    """rank: this device's place in the group of `size`; `address`: (host, port) of the first
    device's store (`store`: that store itself, on the first device); my_host: this device's
    address, where the others connect to it."""

    def __init__(self, rank: int, size: int, address: tuple[str, int], my_host: str, device: torch.device,
                 timeout_s: float = 120.0, store: dist.TCPStore | None = None):
        self.rank, self.size, self.device, self.timeout_s = rank, size, device, timeout_s
        self.seconds = 0.0  # time spent summing (waiting for the slowest device included)
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = store or dist.TCPStore(address[0], address[1], is_master=False, timeout=timeout)
            if device.type == "cuda":
                if dist.is_initialized():  # a warm process that held another group's rank before
                    dist.destroy_process_group()
                dist.init_process_group("nccl", store=store, rank=rank, world_size=size, timeout=timeout)
            else:
                self.peers = self._connect(store, my_host)
        except (OSError, RuntimeError, dist.DistStoreError) as e:
            raise ShardwiseError(f"tensor-parallel device {rank} could not reach the group at "
                                 f"{address[0]}:{address[1]} ({e}): check that the nodes reach each other") from None

    def _connect(self, store: dist.TCPStore, my_host: str) -> dict[int, socket.socket]:
        """A connection to every other device: each accepts those of the devices after it."""
        listener = socket.create_server((my_host, 0))
        store.set(f"device-{self.rank}", f"{my_host}:{listener.getsockname()[1]}")
        peers = {}
        for other in range(self.rank):
            host, port = store.get(f"device-{other}").decode().rsplit(":", 1)
            conn = socket.create_connection((host, int(port)), timeout=self.timeout_s)
            conn.sendall(self.rank.to_bytes(4, "little"))
            peers[other] = conn
        listener.settimeout(self.timeout_s)
        for _ in range(self.rank + 1, self.size):
            conn, _ = listener.accept()
            peers[int.from_bytes(_receive_exactly(conn, 4), "little")] = conn
        listener.close()
        for conn in peers.values():
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
        return peers

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every device's x (in place), the same bits on every device."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            dist.all_reduce(x)
        else:
            mine = x.contiguous()
            parts = {self.rank: mine}
            for conn in self.peers.values():
                self._send(conn, _bytes(mine))
            for other, conn in self.peers.items():
                parts[other] = torch.empty_like(mine)
                self._receive(conn, _bytes(parts[other]))
            total = parts[0].clone()
            for rank in range(1, self.size):  # (one order everywhere: every device gets the same bits)
                total += parts[rank]
            x.copy_(total)
        self.seconds += time.perf_counter() - started
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """The first device's x, on every device (in place)."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            dist.broadcast(x, src=0)
        elif self.rank == 0:
            for conn in self.peers.values():
                self._send(conn, _bytes(x.contiguous()))
        else:
            part = torch.empty_like(x, memory_format=torch.contiguous_format)
            self._receive(self.peers[0], _bytes(part))
            x.copy_(part)
        self.seconds += time.perf_counter() - started
        return x

    def _send(self, conn: socket.socket, array: np.ndarray) -> None:
        view, sent = memoryview(array), 0
        while sent < len(view):
            try:
                sent += conn.send(view[sent:])
            except BlockingIOError:
                self._wait(conn, writable=True)

    def _receive(self, conn: socket.socket, array: np.ndarray) -> None:
        view, got = memoryview(array), 0
        polled = time.perf_counter()
        while got < len(view):
            try:
                n = conn.recv_into(view[got:])
            except BlockingIOError:
                if time.perf_counter() - polled > POLL_S:  # a slow device: sleep until its part comes
                    self._wait(conn)
                else:  # (another process waiting for this core, e.g. the device we wait for, goes first)
                    os.sched_yield()
                continue
            if n == 0:
                raise ConnectionError("a device of this tensor-parallel stage left its group")
            got += n

    def _wait(self, conn: socket.socket, writable: bool = False) -> None:
        ready = select.select([], [conn], [], self.timeout_s) if writable else select.select([conn], [], [],
                                                                                               self.timeout_s)
        if not any(ready):
            raise TimeoutError(f"a device of this tensor-parallel stage sent nothing in {self.timeout_s:.0f} s")

    def close(self) -> None:
        if self.device.type == "cuda":
            if dist.is_initialized():
                dist.destroy_process_group()
        else:
            for conn in self.peers.values():
                conn.close()


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's memory, as bytes (any dtype, bfloat16 included)."""
    return t.view(-1).view(torch.uint8).numpy()


def _receive_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("a device closed its connection while joining the group")
        data += chunk
    return data
