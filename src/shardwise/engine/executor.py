"""Executors run steps for the LLM's step loop: in this process, or as a Ray pipeline.

Both take a step with submit() and hand its token ids back through wait()/result(),
so the loop can keep several micro-batches in flight where the executor allows it
(parallelism: how many steps it can overlap). A step that fails raises from result(),
never from submit(); rewind() then drops what it wrote to a sequence's KV.
"""

from __future__ import annotations

from typing import Any

from shardwise.engine.prefix_cache import CachedPrefix
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.worker import Sampled, Worker


class SynchronousExecutor:
    """An executor whose step completes inside submit() (nothing overlaps): its outcome, a result
    or the error it raised, waits in the handle for result()."""

    parallelism = 1
    prefix_caching = False  # whether add() takes a cached prefix, and keep() / evict() exist
    speculation = False  # whether a step can verify drafted tokens (speculative decoding)
    moving = None  # a move to a new plan under way (a pipeline's: see Pipeline.move_to); never here

    def submit(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool]) -> Sampled | Exception:
        try:
            return self.run_step(seq_ids, chunks, sample)
        except Exception as e:  # raised by result(), where the scheduler takes a step's outcome
            return e

    def run_step(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool]) -> Sampled:
        raise NotImplementedError

    def wait(self, handles: list[Any]) -> int:
        return 0

    def timing(self) -> list[tuple[float, float]]:
        return []  # nothing predicts its steps

    def result(self, handle: Sampled | Exception) -> Sampled:
        if isinstance(handle, Exception):
            raise handle
        return handle


class LocalExecutor(SynchronousExecutor):
    """The whole model in this process."""

    prefix_caching = speculation = True

    def __init__(self, worker: Worker):
        self.worker = worker
        self.shard = worker.shard

    def add(self, seq_id: int, params: SamplingParams, generated: list[int] = (),
            prefix: CachedPrefix | None = None) -> None:
        self.worker.add(seq_id, params, generated, prefix)

    def keep(self, seq_id: int, first: int, keys: list[bytes]) -> None:
        self.worker.keep(seq_id, first, keys)

    def evict(self, keys: list[bytes]) -> None:
        self.worker.evict(keys)

    def free(self, seq_id: int) -> None:
        self.worker.free(seq_id)

    def rewind(self, seq_id: int, length: int) -> None:
        self.worker.rewind(seq_id, length)

    def run_step(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool]) -> Sampled:
        return self.worker.step(seq_ids, chunks, sample)

    def describe(self) -> list[dict[str, Any]]:
        return []  # no pipeline stages

    def stats(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return [self.worker.stats() | {"node": "local"}]  # the whole model, as one stage

    def close(self) -> None:
        self.worker = self.shard = None
