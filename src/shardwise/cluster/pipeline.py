"""Pipeline: the model's stages as Ray actors, driven like one executor.

Each step's hidden states go from stage to stage as ObjectRefs (never through the
driver) and only the last stage's token ids come back. The step loop keeps one
micro-batch in flight per compute resource the stages occupy (a node's CPU cores,
or one GPU), so every resource works at once. Stages that share one resource
gain nothing from overlapping (they would only split its cores and re-read all
weights per smaller micro-batch), so they take turns with all of it instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardwise.cluster.plan import DEFAULT_KV_TOKENS, Plan
from shardwise.cluster.ray_session import join
from shardwise.cluster.stage import StageActor
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.worker import Sampled
from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec

# Stages on one node take turns on its cores. OpenMP threads spin only briefly before
# sleeping: hot between the ops of a step, out of the way while another stage computes.
STAGE_ENV = {"env_vars": {"GOMP_SPINCOUNT": "20000"}}


class Pipeline:
    def __init__(self, model_path: Path, spec: ModelSpec, plan: Plan, *, dtype: str | None = None,
                 address: str | None = None, kv_tokens: int = DEFAULT_KV_TOKENS, micro_batches: int | None = None):
        plan.check_layers(spec)
        self._owns_ray = join(address, instead="run locally")
        try:
            nodes = self._place(plan)
            dtypes = [dtype or ("bfloat16" if s.device.startswith("cuda") else "float32") for s in plan.stages]
            where = [f"{n['NodeManagerAddress']}/{s.device}" for n, s in zip(nodes, plan.stages, strict=True)]
            capacity = {f"{n['NodeManagerAddress']}/cpu": int(n["Resources"].get("memory", 0)) for n in nodes}
            plan.check_memory(spec, dtypes, where, capacity, kv_tokens)
            self.stages = [
                StageActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                                   runtime_env=STAGE_ENV)
                .remote(str(model_path), s.layers, s.device, dtype)
                for s, n in zip(plan.stages, nodes, strict=True)
            ]
            # threads per stage: alone on its node's cores, or sharing them when steps overlap
            self._threads = [(s.threads or self._cores(n), s.threads or self._share(n, nodes))
                             for s, n in zip(plan.stages, nodes, strict=True)]
            self.pids, self.node_ids = map(list, zip(*_get([s.ready.remote() for s in self.stages]), strict=True))
        except BaseException:
            self.close()
            raise
        resources = {(n["NodeID"], s.device if s.device.startswith("cuda") else "cpu")
                     for s, n in zip(plan.stages, nodes, strict=True)}
        self.parallelism = micro_batches or len(resources)
        self._in_flight = 0

    @staticmethod
    def _place(plan: Plan) -> list[dict[str, Any]]:
        """The Ray node of each stage; an unknown placement is an error before anything loads."""
        alive = [n for n in ray.nodes() if n["Alive"]]
        local = ray.get_runtime_context().get_node_id()
        placed = []
        for i, stage in enumerate(plan.stages):
            key = local if stage.placement == "local" else stage.placement
            match = [n for n in alive if key in (n["NodeID"], n["NodeManagerAddress"])]
            if not match:
                known = ", ".join(f"{n['NodeManagerAddress']} ({n['NodeID'][:8]}…)" for n in alive)
                raise ShardwiseError(f"plan stage {i} is placed on unknown node '{stage.placement}': "
                                     f"the cluster has {known}; use one of those or \"local\"")
            placed.append(match[0])
        return placed

    @staticmethod
    def _cores(node: dict[str, Any]) -> int:
        return int(node["Resources"].get("CPU", os.cpu_count() or 1))

    @classmethod
    def _share(cls, node: dict[str, Any], nodes: list[dict[str, Any]]) -> int:
        """Stages on one node that run at once share its cores, so they never oversubscribe it."""
        return max(1, cls._cores(node) // sum(n["NodeID"] == node["NodeID"] for n in nodes))

    # --- the executor interface ---------------------------------------------------------------
    def add(self, seq_id: int, params: SamplingParams) -> None:
        for stage in self.stages:  # an actor runs calls in the order one caller sent them
            stage.add.remote(seq_id, params)

    def free(self, seq_id: int) -> None:
        for stage in self.stages:
            stage.free.remote(seq_id)

    def submit(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool]) -> ray.ObjectRef:
        overlapping = self._in_flight > 0
        self._in_flight += 1
        ref = None
        for stage, (alone, shared) in zip(self.stages, self._threads, strict=True):
            # each stage gets the previous one's output as a ref, never through the driver
            ref = stage.step.remote(seq_ids, chunks, sample, ref, shared if overlapping else alone)
        return ref

    def wait(self, handles: list[ray.ObjectRef]) -> int:
        ready, _ = ray.wait(handles, num_returns=1)
        return handles.index(ready[0])

    def result(self, handle: ray.ObjectRef) -> Sampled:
        self._in_flight -= 1
        return _get(handle)

    def kv_stats(self) -> list[dict[str, int]]:
        return _get([s.kv_stats.remote() for s in self.stages])

    def close(self) -> None:
        for stage in getattr(self, "stages", []):
            ray.kill(stage)
        self.stages = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


def _get(refs: Any) -> Any:
    """ray.get, with a user mistake raised inside a stage surfacing as itself."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ShardwiseError):
            raise ShardwiseError(str(e.cause)) from None
        raise
