"""TensorGroup: the devices of one tensor-parallel stage, summing their parts each layer.

Each device is a process of its own (a Ray actor). They meet at a TCP store the first device
opens, and keep a direct TCP connection to every other: over these the first device tells the
others what to do (each call in order, a step as soon as it starts it: no Ray call on the way).
GPUs sum with NCCL (torch.distributed). CPUs sum over the same connections between
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
import pickle
import select
import socket
import time
from typing import Any

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
            self.peers = self._connect(store, my_host)
            if device.type == "cuda":
                if dist.is_initialized():  # a warm process that held another group's rank before
                    dist.destroy_process_group()
                dist.init_process_group("nccl", store=store, rank=rank, world_size=size, timeout=timeout)
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
            parts = {self.rank: mine, **{other: torch.empty_like(mine) for other in self.peers}}
            self._exchange([(conn, _bytes(mine)) for conn in self.peers.values()],
                           [(conn, _bytes(parts[other])) for other, conn in self.peers.items()])
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
            self._exchange([(conn, _bytes(x.contiguous())) for conn in self.peers.values()], [])
        else:
            part = torch.empty_like(x, memory_format=torch.contiguous_format)
            self._exchange([], [(self.peers[0], _bytes(part))])
            x.copy_(part)
        self.seconds += time.perf_counter() - started
        return x

    def gather(self, value: float) -> list[float]:
        """Every device's `value` on the first device, in rank order (the others send theirs and
        go on: the first reads them once it is done, by when they have long arrived)."""
        mine = np.array([value])
        if self.rank > 0:
            self._exchange([(self.peers[0], mine.view(np.uint8))], [])
            return [value]
        theirs = {other: np.empty(1) for other in self.peers}
        self._exchange([], [(conn, theirs[other].view(np.uint8)) for other, conn in self.peers.items()])
        return [value, *(float(theirs[rank][0]) for rank in range(1, self.size))]

    def tell(self, message: Any, to: int | None = None) -> None:
        """The first device: a message (any picklable object) to every other device, or to device `to`."""
        self._send([conn for rank, conn in self.peers.items() if to in (None, rank)], message)

    def hear(self) -> Any:
        """Another device: the first device's next message, however long it takes to come."""
        return self._message(self.peers[0], patient=True)

    def report(self, message: Any) -> None:
        """Another device: a message to the first device, which reads it with reports()."""
        self._send([self.peers[0]], message)

    def reports(self) -> list[Any]:
        """The first device: one message from each other device (report()), in rank order."""
        return [self._message(self.peers[rank]) for rank in range(1, self.size)]

    def _send(self, conns: list[socket.socket], message: Any) -> None:
        """A message as its sizes and pickle, then its arrays' memory apart (pickle's out-of-band
        buffers: a sequence's KV is sent from where it lies and received into the array it
        becomes, never copied whole), one after another (parts sent at once on one connection
        would interleave)."""
        buffers: list[pickle.PickleBuffer] = []
        header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
        raws = [np.frombuffer(b.raw(), np.uint8) for b in buffers]
        sizes = np.array([len(header), len(raws), *(r.size for r in raws)], np.int64)
        for part in (np.frombuffer(sizes.tobytes() + header, np.uint8), *raws):
            self._exchange([(conn, part) for conn in conns], [])

    def _message(self, conn: socket.socket, patient: bool = False) -> Any:
        counts = np.empty(2, np.int64)
        self._exchange([], [(conn, counts.view(np.uint8))], patient=patient)
        rest = np.empty(8 * counts[1] + counts[0], np.uint8)  # the buffers' sizes, then the pickle
        self._exchange([], [(conn, rest)])
        buffers = [np.empty(n, np.uint8) for n in rest[:8 * counts[1]].view(np.int64)]
        for buffer in buffers:
            self._exchange([], [(conn, buffer)])
        return pickle.loads(rest[8 * counts[1]:], buffers=buffers)

    def _exchange(self, sends: list[tuple[socket.socket, np.ndarray]],
                  receives: list[tuple[socket.socket, np.ndarray]], patient: bool = False) -> None:
        """Send each array and fill each, on every connection as far as it goes: a device that
        finished sending before it received would wait forever for one doing the same, once the
        parts outgrow the connections' buffers. It polls for a while (a part from a balanced
        device comes within microseconds) before it sleeps until a connection is ready.
        patient: sleep at once, without a time limit (the next call may be hours off; polling
        for it would take the core from the device that is making it)."""
        sending = [(conn, memoryview(a)) for conn, a in sends if a.size]
        filling = [(conn, memoryview(a)) for conn, a in receives if a.size]
        polled = time.perf_counter() - (POLL_S if patient else 0.0)
        while sending or filling:
            moved = False
            for k, (conn, view) in enumerate(sending):
                try:
                    sending[k] = (conn, view[conn.send(view):])
                    moved = True
                except BlockingIOError:
                    pass
            for k, (conn, view) in enumerate(filling):
                try:
                    n = conn.recv_into(view)
                except BlockingIOError:
                    continue
                if n == 0:
                    raise ConnectionError("a device of this tensor-parallel stage left its group")
                filling[k], moved = (conn, view[n:]), True
            sending = [(c, v) for c, v in sending if len(v)]
            filling = [(c, v) for c, v in filling if len(v)]
            if moved:
                polled, patient = time.perf_counter(), False
            elif time.perf_counter() - polled > POLL_S:  # a slow device: sleep until a connection is ready
                ready = select.select([c for c, _ in filling], [c for c, _ in sending], [],
                                      None if patient else self.timeout_s)
                if not any(ready):
                    raise TimeoutError(f"a device of this tensor-parallel stage sent nothing in "
                                       f"{self.timeout_s:.0f} s")
            else:  # (another process waiting for this core, e.g. the device we wait for, goes first)
                os.sched_yield()

    def close(self) -> None:
        if self.device.type == "cuda" and dist.is_initialized():
            dist.destroy_process_group()
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
