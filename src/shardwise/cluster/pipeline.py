"""Pipeline: the model's stages as Ray actors, driven like one executor.

Each step's hidden states go from stage to stage as ObjectRefs (never through the
driver) and only the last stage's token ids come back. The step loop keeps one
micro-batch in flight per compute resource the stages occupy (a node's CPU cores,
or one GPU), so every resource works at once. Stages that share one resource
gain nothing from overlapping (they would only split its cores and re-read all
weights per smaller micro-batch), so they take turns with all of it instead.

A stage that dies (its actor or node) or answers nothing for stage_timeout seconds
surfaces as a StageFailure; recover() then loads its layers into a fresh actor (on its
node if that lives, else on the surviving node with the most memory per stage; with spares,
into the warm spare kept on that node) and clears every other stage's sequences, for
the scheduler to replay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardwise.cluster.plan import DEFAULT_KV_TOKENS, STAGE_TIMEOUT_S, Plan
from shardwise.cluster.ray_session import join
from shardwise.cluster.stage import StageActor
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.worker import Sampled
from shardwise.errors import ShardwiseError, StageFailure
from shardwise.model.spec import ModelSpec

# Stages on one node take turns on its cores. OpenMP threads spin only briefly before
# sleeping: hot between the ops of a step, out of the way while another stage computes.
STAGE_ENV = {"env_vars": {"GOMP_SPINCOUNT": "20000"}}


class Pipeline:
    def __init__(self, model_path: Path, spec: ModelSpec, plan: Plan, *, dtype: str | None = None,
                 address: str | None = None, kv_tokens: int = DEFAULT_KV_TOKENS, micro_batches: int | None = None,
                 stage_timeout: float = STAGE_TIMEOUT_S, spares: bool = False):
        plan.check_layers(spec)
        self.model_path, self.spec, self.plan, self.dtype = model_path, spec, plan, dtype
        self.kv_tokens, self.stage_timeout = kv_tokens, stage_timeout
        self.use_spares, self.spares = spares, {}  # node id -> an empty, warm StageActor
        self._owns_ray = join(address, instead="run locally")
        try:
            self.nodes = self._place(plan)
            self._check_memory()
            self._set_threads()
            self.stages = [self._start(i) for i in range(len(plan.stages))]
            self.pids, self.node_ids = map(list, zip(*_get([s.ready.remote() for s in self.stages]), strict=True))
            self._keep_spares()
        except BaseException:
            self.close()
            raise
        resources = {(n["NodeID"], s.device if s.device.startswith("cuda") else "cpu")
                     for s, n in zip(plan.stages, self.nodes, strict=True)}
        self.parallelism = micro_batches or len(resources)
        self._steps: dict[ray.ObjectRef, list[ray.ObjectRef]] = {}  # in flight: last ref -> every stage's

    def _check_memory(self) -> None:
        """Each node holds its stages' weights and KV (a ShardwiseError if not)."""
        plan, nodes = self.plan, self.nodes
        dtypes = [self.dtype or ("bfloat16" if s.device.startswith("cuda") else "float32") for s in plan.stages]
        where = [f"{n['NodeManagerAddress']}/{s.device}" for n, s in zip(nodes, plan.stages, strict=True)]
        capacity = {f"{n['NodeManagerAddress']}/cpu": int(n["Resources"].get("memory", 0)) for n in nodes}
        plan.check_memory(self.spec, dtypes, where, capacity, self.kv_tokens)

    def _set_threads(self) -> None:
        """Each stage's threads: alone on its node's cores, or sharing them when steps overlap."""
        self._threads = [(s.threads or self._cores(n), s.threads or self._share(n, self.nodes))
                         for s, n in zip(self.plan.stages, self.nodes, strict=True)]

    def _load_args(self, i: int) -> tuple:
        stage = self.plan.stages[i]
        return str(self.model_path), stage.layers, stage.device, self.dtype

    def _start(self, i: int) -> Any:
        return self._actor_on(self.nodes[i]).remote(*self._load_args(i))

    @staticmethod
    def _actor_on(node: dict[str, Any]) -> Any:
        return StageActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                                  runtime_env=STAGE_ENV)

    def _keep_spares(self) -> None:
        """With spares: one warm, empty actor on each node that holds stages (started, not awaited)."""
        for node in self.nodes if self.use_spares else []:
            if node["NodeID"] not in self.spares:
                self.spares[node["NodeID"]] = self._actor_on(node).remote()

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
    def add(self, seq_id: int, params: SamplingParams, generated: list[int] = ()) -> None:
        for stage in self.stages:  # an actor runs calls in the order one caller sent them
            stage.add.remote(seq_id, params, list(generated))

    def free(self, seq_id: int) -> None:
        for stage in self.stages:
            stage.free.remote(seq_id)

    def submit(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool]) -> ray.ObjectRef:
        overlapping = bool(self._steps)
        refs = []
        for stage, (alone, shared) in zip(self.stages, self._threads, strict=True):
            # each stage gets the previous one's output as a ref, never through the driver
            refs.append(stage.step.remote(seq_ids, chunks, sample, refs[-1] if refs else None,
                                          shared if overlapping else alone))
        self._steps[refs[-1]] = refs
        return refs[-1]

    def wait(self, handles: list[ray.ObjectRef]) -> int:
        ready, _ = ray.wait(handles, num_returns=1, timeout=self.stage_timeout)
        if not ready:  # the oldest step is the one stuck: each stage runs its steps in order
            raise StageFailure(f"no step finished in {self.stage_timeout:.0f} s", handles[0], hung=True)
        return handles.index(ready[0])

    def result(self, handle: ray.ObjectRef) -> Sampled:
        try:
            out = _get(handle)
        except ray.exceptions.RayError as e:  # the actor, its node or an object it needed is gone
            raise StageFailure(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", handle) from None
        del self._steps[handle]
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [{"layers": list(s.layers), "device": s.device, "node": node, "pid": pid}
                for s, node, pid in zip(self.plan.stages, self.node_ids, self.pids, strict=True)]

    # --- recovery -------------------------------------------------------------------------------
    def recover(self, failure: StageFailure) -> list[int]:
        """Replace the stages that died or hang, and clear the sequences of the rest (their KV
        also holds the steps that were in flight). Returns the replaced stages' indices."""
        lost = self._lost_stages(self._steps.get(failure.step, []), failure.hung)
        self._steps.clear()
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        loading = []
        for i in lost:
            ray.kill(self.stages[i], no_restart=True)
            if self.nodes[i]["NodeID"] not in alive:
                self.nodes[i] = self._new_home(i, alive)
                self._check_memory()
                self._set_threads()
            spare = self.spares.pop(self.nodes[i]["NodeID"], None)
            self.stages[i] = spare or self._start(i)
            loading.append(spare.load.remote(*self._load_args(i)) if spare else self.stages[i].ready.remote())
        survivors = [s for i, s in enumerate(self.stages) if i not in lost]
        try:
            ready = _get(loading + [s.reset.remote() for s in survivors], timeout=max(self.stage_timeout, 300.0))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
            raise ShardwiseError(f"a replacement pipeline stage failed to start ({type(e).__name__}): "
                                 "the node may be out of memory; check `ray status`") from None
        for i, (pid, node_id) in zip(lost, ready, strict=False):
            self.pids[i], self.node_ids[i] = pid, node_id
        self._keep_spares()
        return lost

    def _lost_stages(self, refs: list[ray.ObjectRef], hung: bool) -> list[int]:
        """The stages that failed the step whose per-stage refs these are: every stage an error
        names as a dead actor (its own death, or one it passes on because a dead stage's output
        was lost with it), and, when the step hung, the first stage that has not finished (its
        input is there, its output is not; the stages after it only wait on it)."""
        ids = {stage._actor_id.hex(): i for i, stage in enumerate(self.stages)}
        lost = set()
        for i, ref in enumerate(refs):
            if not ray.wait([ref], timeout=0)[0]:
                if hung:
                    lost.add(i)
                    break
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if e.actor_id in ids:
                    lost.add(ids[e.actor_id])
            except ray.exceptions.RayError:
                pass
        return sorted(lost)

    def _new_home(self, i: int, alive: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """A surviving node for stage i, whose node died: the most memory per stage it would hold."""
        if not alive:
            raise ShardwiseError(f"stage {i}'s node died and no Ray node is left to take its layers")
        held = {n["NodeID"]: 0 for n in alive.values()}
        for node in self.nodes:
            if node["NodeID"] in held:
                held[node["NodeID"]] += 1
        return max(alive.values(), key=lambda n: n["Resources"].get("memory", 0) / (1 + held[n["NodeID"]]))

    def kv_stats(self) -> list[dict[str, int]]:
        return _get([s.kv_stats.remote() for s in self.stages])

    def close(self) -> None:
        for actor in [*getattr(self, "stages", []), *getattr(self, "spares", {}).values()]:
            ray.kill(actor)
        self.stages, self.spares = [], {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


def _get(refs: Any, timeout: float | None = None) -> Any:
    """ray.get, with a user mistake raised inside a stage surfacing as itself."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ShardwiseError):
            raise ShardwiseError(str(e.cause)) from None
        raise
