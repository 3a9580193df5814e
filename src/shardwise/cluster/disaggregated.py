"""Disaggregated prefill (Splitwise, DistServe): two pipelines, one executor.

Long prompts run on a prefill pool, every decode on a decode pool, each a Pipeline of its own
plan (other nodes, or other cores of one node), so a decode step never waits behind a prompt's
chunk. The scheduler puts a sequence on the prefill pool (add_prefill) and, once its prompt has
run and its first token is sampled there, hands it over (handoff): each prefill stage exports
the sequence's KV for its layers (the last, its sampler) and each decode stage takes in the
layers it holds, through Ray's object store, as a move to a new plan does. Ray runs one
caller's calls to an actor in order, so a decode step sent after the handover finds the KV in
place. Short prompts, prompts mostly cached, and every replay after a lost stage prefill on the
decode pool itself, beside its decodes; the prefix cache lives there too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from shardwise.cluster.pipeline import Pipeline
from shardwise.engine.prefix_cache import CachedPrefix
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.worker import Sampled
from shardwise.errors import ShardwiseError, StageFailure
from shardwise.planner.plan import Plan


class Disaggregated:
    """The executor over a prefill pool and a decode pool: the first prefill.parallelism step
    groups step on the prefill pool, the rest on the decode pool (see Scheduler)."""

    prefix_caching = True  # on the decode pool (the scheduler caches no block on the prefill pool)
    moving = None  # neither pool moves to a new plan while they serve

    def __init__(self, prefill: Pipeline, decode: Pipeline):
        self.prefill, self.decode = prefill, decode
        prefill.share_cores(decode.nodes)  # stages of both pools on one node split its cores
        decode.share_cores(prefill.nodes)
        self.prefill_parallelism = prefill.parallelism
        self.parallelism = prefill.parallelism + decode.parallelism
        self.speculation = decode.speculation
        self._pool: dict[int, Pipeline] = {}  # where each sequence's KV lives

    @property
    def on_event(self) -> Callable[[str, str], None]:
        return self.decode.on_event

    @on_event.setter
    def on_event(self, note: Callable[[str, str], None]) -> None:
        self.prefill.on_event = self.decode.on_event = note

    def add(self, seq_id: int, params: SamplingParams, generated: list[int] = (),
            prefix: CachedPrefix | None = None) -> None:
        """A sequence prefilled and decoded on the decode pool (a short prompt, or one mostly
        cached, or a replay)."""
        self._pool[seq_id] = self.decode
        self.decode.add(seq_id, params, generated, prefix)

    def keep(self, seq_id: int, first: int, keys: list[bytes]) -> None:
        self.decode.keep(seq_id, first, keys)

    def evict(self, keys: list[bytes]) -> None:
        self.decode.evict(keys)

    def add_prefill(self, seq_id: int, params: SamplingParams) -> None:
        """A sequence whose prompt runs on the prefill pool, until handoff()."""
        self._pool[seq_id] = self.prefill
        self.prefill.add(seq_id, params)

    def handoff(self, seq_ids: list[int]) -> None:
        """Move these sequences, their prompts run and first tokens sampled, to the decode pool."""
        self.prefill.hand_over(seq_ids, to=self.decode)
        self._pool.update(dict.fromkeys(seq_ids, self.decode))

    def free(self, seq_id: int) -> None:
        pool = self._pool.pop(seq_id, None)
        if pool is not None:
            pool.free(seq_id)

    def rewind(self, seq_id: int, length: int) -> None:
        self._pool[seq_id].rewind(seq_id, length)

    def submit(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool]) -> ray.ObjectRef:
        return self._pool[seq_ids[0]].submit(seq_ids, chunks, sample)  # (a step's sequences share a pool)

    def wait(self, handles: list[ray.ObjectRef]) -> int:
        return self.decode.wait(handles)  # (any pool's refs: it waits for the first to finish)

    def result(self, handle: ray.ObjectRef) -> Sampled:
        return (self.prefill if self.prefill.holds(handle) else self.decode).result(handle)

    def recover(self, failure: StageFailure) -> list[int]:
        """The pool that lost a stage replaces it; the other forgets its sequences too, for the
        scheduler replays every sequence (on the decode pool)."""
        lost, other = (self.prefill, self.decode) if self.prefill.holds(failure.step) else (self.decode, self.prefill)
        other.forget_all()
        self._pool.clear()
        return lost.recover(failure)

    def move_to(self, plan: Plan, why: str) -> None:
        """Refused (after the checks a move makes, so a bad plan is named as such)."""
        plan.check_layers(self.decode.spec)
        Pipeline._place(plan)
        raise ShardwiseError("a server with a prefill pool does not move its pools to a new plan while serving: "
                             "restart it with the new plan (--plan / --prefill-plan)")

    def migrate(self, plan: Any) -> bool:
        return False

    def ready_to_move(self, timeout: float = 0) -> bool:
        return False

    def timing(self) -> list[tuple[float, float]]:
        return []

    def describe(self) -> list[dict[str, Any]]:
        return _by_pool(self.prefill.describe(), self.decode.describe())

    def stats(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return _by_pool(self.prefill.stats(timeout), self.decode.stats(timeout))

    def close(self) -> None:
        self.prefill.close()
        self.decode.close()  # (last: it started Ray, if this process did)


def _by_pool(prefill: list[dict[str, Any]], decode: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pool's stages, prefill first, each marked with its pool."""
    return [s | {"pool": "prefill"} for s in prefill] + [s | {"pool": "decode"} for s in decode]
