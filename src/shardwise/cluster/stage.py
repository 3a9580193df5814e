"""The Ray actor around one pipeline stage: a Worker holding layers [a, b) and their KV.

A tensor-parallel stage is several such actors, one per device, each holding its slice of
every layer (model/tensor_split.py). The pipeline talks to the first alone: it starts the
others on their nodes (they live and die with it), and passes every call on to them over the
group's own connections, in order, so all the devices' KV pools hold the same sequences in the
same slots and each device starts a step as soon as the first does. Sequences that move leave
and arrive through the first device too, with the KV of all the model's key/value heads: it
gathers the others' heads, and hands each its own.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardwise.cluster.weight_source import local_model
from shardwise.engine.collective import TensorGroup, open_store
from shardwise.engine.prefix_cache import CachedPrefix
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.shard import ShardModel, TensorPart, resolve_device
from shardwise.engine.structured import model_grammars
from shardwise.engine.worker import Moving, Sampled, Worker
from shardwise.model.tensor_split import RankSlice, heads_of, put_heads, split
from shardwise.model.weights import open_weights

log = logging.getLogger("shardwise.cluster")


def stage_env() -> dict:
    """The stages' environment. Stages on one node take turns on its cores: OpenMP threads spin
    only briefly before sleeping (hot between the ops of a step, out of the way while another
    stage computes). And the log level asked for (shardwise --verbose)."""
    level = {"SHARDWISE_LOG_LEVEL": os.environ["SHARDWISE_LOG_LEVEL"]} if "SHARDWISE_LOG_LEVEL" in os.environ else {}
    return {"env_vars": {"GOMP_SPINCOUNT": "20000", **level}}


class TensorSeat(NamedTuple):
    """An actor's place in a tensor-parallel stage: every device's share of the work, its own
    rank and, for the others (rank > 0), the first device's rendezvous; for the first, the Ray
    node of each other device."""

    shares: tuple[float, ...]
    rank: int = 0
    address: tuple[str, int] | None = None
    nodes: tuple[str, ...] = ()


def actor_on(node_id: str) -> Any:
    """A StageActor placed on this Ray node."""
    return StageActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                              runtime_env=stage_env())


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's memory as numpy's: bfloat16, which numpy lacks, as its bits (uint16)."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _torch(a: np.ndarray) -> torch.Tensor:
    """The tensor _numpy() gave (KV is never an integer type: uint16 is bfloat16's bits)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if a.dtype == np.uint16 else t


@ray.remote(num_cpus=0)  # threads are set per stage by the plan, not by Ray's CPU accounting
class StageActor:
    """Started empty, then load()s its layers; or kept empty a while as a warm spare (process up,
    libraries imported) that loads a lost stage's layers in a fraction of a fresh actor's start."""

    def __init__(self):
        logging.basicConfig(level=os.environ.get("SHARDWISE_LOG_LEVEL", "WARNING"),
                            format="%(asctime)s %(name)s: %(message)s")
        self.worker, self.group, self.peers = None, None, []
        self.slices: list[RankSlice] = []  # a tensor-parallel stage's: each device's slice of a layer

    def load(self, model_path: str, layers: tuple[int, int], device: str, dtype: str | None,
             kv_tokens: int = 0, source: ray.actor.ActorHandle | None = None,
             fetch: bool | None = None, tensor: TensorSeat | None = None) -> tuple[int, str]:
        """kv_tokens: the KV pool's room from the start (0: it grows as sequences need it).
        source: the driver's node's WeightSource, where this node may lack the model file (see
        weight_source.local_model; fetch: True always fetches). tensor: this actor's seat where
        the stage's layers are split among devices (the first starts the others here)."""
        path = Path(local_model(model_path, layers, source, fetch))
        weights = open_weights(path)  # memory-mapped: only this stage's tensors (or its slices) are read
        part, loading = None, []
        if tensor is not None:
            host, store = ray.util.get_node_ip_address(), None
            address = tensor.address
            if tensor.rank == 0:
                store, port = open_store(host)
                address = (host, port)
                self.peers = [actor_on(node).remote() for node in tensor.nodes]
                loading = [peer.load.remote(model_path, layers, device, dtype, kv_tokens, source, fetch,
                                            TensorSeat(tensor.shares, rank, address))
                           for rank, peer in enumerate(self.peers, 1)]
            self.group = TensorGroup(tensor.rank, len(tensor.shares), address, host, resolve_device(device),
                                     store=store)
            self.slices = split(weights.spec, tensor.shares)
            part = TensorPart(self.slices[tensor.rank], self.group)
        shard = ShardModel(weights.spec, layers, weights=weights, device=device, dtype=dtype, tensor=part)
        shard.kv.hold_at_least(kv_tokens)
        self.worker = Worker(shard, model_grammars(path, weights))
        ray.get(loading)
        if tensor is not None and tensor.rank > 0:
            threading.Thread(target=self._follow, name="tensor-parallel device", daemon=True).start()
        return self.ready()

    def _follow(self) -> None:
        """Another device of a tensor-parallel stage: the first device's calls, in order. One that
        fails ends this actor: its connections close, the first device's next sum or call fails,
        and the pipeline starts the stage afresh."""
        try:
            while True:
                method, args = self.group.hear()
                getattr(self, method)(*args)
        except Exception:
            log.exception("a device of a tensor-parallel stage failed: the stage stops")
            self.group.close()
            os._exit(1)

    def ready(self) -> tuple[int, str]:
        """Once loaded: this actor's process id and Ray node id."""
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def _others(self, method: str, *args: Any) -> None:
        """The same call on the stage's other devices. One that died takes this actor with it, so
        that the pipeline sees the stage lost and starts it afresh, every device included."""
        if self.peers:
            try:
                self.group.tell((method, args))
            except ConnectionError:
                self._lost()

    def _lost(self) -> None:
        log.warning("a device of this tensor-parallel stage died: the stage stops")
        ray.actor.exit_actor()

    def add(self, seq_id: int, params: SamplingParams, generated: list[int], prefix: CachedPrefix | None) -> None:
        self._others("add", seq_id, params, generated, prefix)
        self.worker.add(seq_id, params, generated, prefix)

    def keep(self, seq_id: int, first: int, keys: list[bytes]) -> None:
        self._others("keep", seq_id, first, keys)
        self.worker.keep(seq_id, first, keys)

    def evict(self, keys: list[bytes]) -> None:
        self._others("evict", keys)
        self.worker.evict(keys)

    def free(self, seq_id: int) -> None:
        self._others("free", seq_id)
        self.worker.free(seq_id)

    def rewind(self, seq_id: int, length: int) -> None:
        self._others("rewind", seq_id, length)
        self.worker.rewind(seq_id, length)

    def reset(self) -> None:
        self._others("reset")
        self.worker.reset()

    def export(self, seq_ids: list[int]) -> dict[int, Moving] | None:
        """KV travels as numpy arrays, as hidden states do (Ray pickles a torch tensor through
        copies, ~5x slower). A tensor-parallel stage returns the KV of all the model's heads,
        as one device holding these layers would: the first device puts its own heads in
        place, and the others' as they send them (over the group's connections)."""
        if self.peers:
            self._others("export", seq_ids)
        if self.group is not None and self.group.rank > 0:
            self.group.report({i: _numpy(m.kv.cpu()) for i, m in self.worker.export(seq_ids).items()})
            return None
        heads = self.slices[0].kv_heads if self.slices else None
        moving = {i: m._replace(kv=_numpy(m.kv.cpu())) for i, m in self.worker.export(seq_ids, heads).items()}
        for device, theirs in zip(self.slices[1:], self.group.reports() if self.peers else [], strict=True):
            for i, kv in theirs.items():
                put_heads(moving[i].kv, device.kv_heads, kv)
        return moving

    def adopt(self, *exports: dict[int, Moving]) -> None:
        """(Ray fetches each export from the old stage's node, read-only: the KV is only read,
        into this stage's pool.) A tensor-parallel stage's first device sends each other device
        its own heads."""
        for rank in range(1, len(self.slices)):
            self.group.tell(("_take_in", self._heads(exports, rank)), to=rank)
        self._take_in(*self._heads(exports, 0))

    def _heads(self, exports: tuple[dict[int, Moving], ...], rank: int) -> list[dict[int, Moving]]:
        if not self.slices:
            return list(exports)
        heads = self.slices[rank].kv_heads
        return [{i: m._replace(kv=heads_of(m.kv, heads)) for i, m in e.items()} for e in exports]

    def _take_in(self, *exports: dict[int, Moving]) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            self.worker.adopt(*({i: m._replace(kv=_torch(m.kv)) for i, m in e.items()} for e in exports))

    def step(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool],
             previous: tuple[np.ndarray, tuple[float, ...]] | None, threads: tuple[int, ...]) -> tuple | Sampled:
        """Hidden states travel as float32 numpy arrays (zero-copy in Ray's object store), with
        the seconds each stage so far computed (a tensor-parallel stage's, each device's own,
        without its sums: the time it waited for the others is theirs); the last stage returns
        token ids (and any logprobs asked for) only, with every stage's seconds. threads: how
        many cores this step may use, on each of the stage's devices."""
        mine = threads[self.group.rank if self.group else 0]
        if torch.get_num_threads() != mine:
            torch.set_num_threads(mine)
        hidden, seconds = previous or (None, ())
        self._others("step", seq_ids, chunks, sample, None if hidden is None else (hidden, ()), threads)
        inputs = None if hidden is None else torch.from_numpy(hidden.copy())
        summed = self.group.seconds if self.group else 0.0
        try:
            out = self.worker.step(seq_ids, chunks, sample, inputs)
            computed = [self.worker.last_step_s - (self.group.seconds - summed if self.group else 0.0)]
            if self.group is not None:
                computed = self.group.gather(computed[0])
        except ConnectionError:  # a device died
            self._lost()
        except Exception:
            if self.peers:  # the others may wait on a sum, or have sent their seconds: the stage cannot go on
                log.exception("a tensor-parallel stage's step failed: the stage stops")
                self._lost()
            raise
        if self.group is not None and self.group.rank > 0:
            return None
        seconds = (*seconds, *computed)
        if isinstance(out, torch.Tensor):
            return out.float().cpu().numpy(), seconds
        return out._replace(stage_seconds=seconds)

    def stats(self) -> dict:
        stats = self.worker.stats()
        if self.group is not None:  # seconds in all-reduces (waiting for the slowest device included)
            stats["collective_s"] = self.group.seconds
        if self.peers:  # a tensor-parallel stage: each device's own
            stats["devices"] = [dict(stats), *ray.get([peer.stats.remote() for peer in self.peers])]
        return stats
