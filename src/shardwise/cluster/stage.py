"""The Ray actor around one pipeline stage: a Worker holding layers [a, b) and their KV."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import ray
import torch

from shardwise.cluster.weight_source import local_model
from shardwise.engine.prefix_cache import CachedPrefix
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.shard import ShardModel
from shardwise.engine.structured import model_grammars
from shardwise.engine.worker import Moving, Sampled, Worker
from shardwise.model.weights import open_weights


@ray.remote(num_cpus=0)  # threads are set per stage by the plan, not by Ray's CPU accounting
class StageActor:
    """Started empty, then load()s its layers; or kept empty a while as a warm spare (process up,
    libraries imported) that loads a lost stage's layers in a fraction of a fresh actor's start."""

    def __init__(self):
        logging.basicConfig(level=os.environ.get("SHARDWISE_LOG_LEVEL", "WARNING"),
                            format="%(asctime)s %(name)s: %(message)s")
        self.worker = None

    def load(self, model_path: str, layers: tuple[int, int], device: str, dtype: str | None,
             kv_tokens: int = 0, source: ray.actor.ActorHandle | None = None,
             fetch: bool | None = None) -> tuple[int, str]:
        """kv_tokens: the KV pool's room from the start (0: it grows as sequences need it).
        source: the driver's node's WeightSource, where this node may lack the model file (see
        weight_source.local_model; fetch: True always fetches)."""
        path = Path(local_model(model_path, layers, source, fetch))
        weights = open_weights(path)  # memory-mapped: only this stage's tensors are read
        shard = ShardModel(weights.spec, layers, weights=weights, device=device, dtype=dtype)
        shard.kv.hold_at_least(kv_tokens)
        self.worker = Worker(shard, model_grammars(path, weights))
        return self.ready()

    def ready(self) -> tuple[int, str]:
        """Once loaded: this actor's process id and Ray node id."""
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def add(self, seq_id: int, params: SamplingParams, generated: list[int], prefix: CachedPrefix | None) -> None:
        self.worker.add(seq_id, params, generated, prefix)

    def keep(self, seq_id: int, first: int, keys: list[bytes]) -> None:
        self.worker.keep(seq_id, first, keys)

    def evict(self, keys: list[bytes]) -> None:
        self.worker.evict(keys)

    def free(self, seq_id: int) -> None:
        self.worker.free(seq_id)

    def rewind(self, seq_id: int, length: int) -> None:
        self.worker.rewind(seq_id, length)

    def reset(self) -> None:
        self.worker.reset()

    def export(self, seq_ids: list[int]) -> dict[int, Moving]:
        """KV travels as numpy arrays, as hidden states do (Ray pickles a torch tensor through
        copies, ~5x slower)."""
        return {i: m._replace(kv=m.kv.cpu().numpy()) for i, m in self.worker.export(seq_ids).items()}

    def adopt(self, *exports: dict[int, Moving]) -> None:
        """(Ray fetches each export from the old stage's node, read-only: the KV is only read,
        into this stage's pool.)"""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            self.worker.adopt(*({i: m._replace(kv=torch.from_numpy(m.kv)) for i, m in e.items()} for e in exports))

    def step(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool],
             previous: tuple[np.ndarray, tuple[float, ...]] | None, threads: int) -> tuple | Sampled:
        """Hidden states travel as float32 numpy arrays (zero-copy in Ray's object store), with
        the seconds each stage so far computed; the last stage returns token ids (and any
        logprobs asked for) only, with every stage's seconds. threads: how many cores this step
        may use."""
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        hidden, seconds = previous or (None, ())
        inputs = None if hidden is None else torch.from_numpy(hidden.copy())
        out = self.worker.step(seq_ids, chunks, sample, inputs)
        seconds = (*seconds, self.worker.last_step_s)
        if isinstance(out, torch.Tensor):
            return out.float().cpu().numpy(), seconds
        return out._replace(stage_seconds=seconds)

    def stats(self) -> dict:
        return self.worker.stats()
