"""Pipeline: the model's stages as Ray actors, driven like one executor.

Each step's hidden states go from stage to stage as ObjectRefs (never through the
driver) and only the last stage's token ids come back. The step loop keeps one
micro-batch in flight per compute resource the stages occupy (a node's CPU cores,
or one GPU), so every resource works at once. Stages that share one resource
gain nothing from overlapping (they would only split its cores and re-read all
weights per smaller micro-batch), so they take turns with all of it instead.

A stage that dies (its actor or node) or answers nothing for stage_timeout seconds
surfaces as a StageFailure; recover() then loads its layers into a fresh actor on its
node (with spares, into the warm spare kept there) and clears every other stage's
sequences, for the scheduler to replay. If a node died, the planner splits the model
anew over the devices left (those of the cluster file the plan came from, or else the
surviving Ray nodes) and every stage restarts under that plan.

With a cluster file, a DriftWatch compares each stage's measured seconds with the
estimator's (see drift.py); when a node's speed drifted and a new plan pays, the pipeline
moves to it live (move_to): the new stages load beside the old ones, which serve on;
once they are ready, wait() raises Drifted and the scheduler calls migrate(), which lets
the steps in flight finish and moves each sequence's KV from the old stages to the new.
Where that fails, recover() moves to the plan as after a lost stage, for a replay. A Ray node
that joins the cluster is measured in place (joins.py) and offered to the watch, which plans
again: where the new plan pays, the pipeline moves to it the same way.

With verify_share, that share of steps is checked on the driver's node (see verify.py); a
stage on another node whose output differs from the recompute is a StageFailure too, and
its node is planned around from then on, as a dead one is.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardwise.cluster.drift import DriftWatch, Verdict
from shardwise.cluster.joins import Join, newcomers
from shardwise.cluster.ray_session import join
from shardwise.cluster.stage import TensorSeat, actor_on, stage_env
from shardwise.cluster.verify import Checked, Verifier, is_greedy
from shardwise.cluster.weight_source import WeightSource, wait_showing_progress
from shardwise.config import EngineConfig
from shardwise.engine.prefix_cache import CachedPrefix
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.worker import Sampled
from shardwise.errors import Drifted, ShardwiseError, StageFailure, StepError
from shardwise.model.spec import ModelSpec
from shardwise.perf.operators import Work
from shardwise.planner.plan import Plan, StageSpec
from shardwise.planner.topology import Cluster, plan_cluster

log = logging.getLogger("shardwise.cluster")
JOINS_CHECK_S = 2.0  # how often a watched pipeline looks for Ray nodes that joined, and at their measures


class Pipeline:
    def __init__(self, model_path: Path, spec: ModelSpec, plan: Plan, *, dtype: str | None = None,
                 address: str | None = None, kv_tokens: int = EngineConfig.kv_tokens,
                 micro_batches: int | None = None, stage_timeout: float = EngineConfig.stage_timeout,
                 spares: bool = False, cluster: Cluster | None = None, objective: str = "throughput",
                 batch: int | None = None, drift_threshold: float = EngineConfig.drift_threshold,
                 drift_window_s: float = EngineConfig.drift_window_s, move_kv: bool = EngineConfig.move_kv,
                 preallocate_kv: bool = EngineConfig.preallocate_kv, join_nodes: bool = EngineConfig.join_nodes,
                 fetch_weights: bool | None = EngineConfig.fetch_weights,
                 weights_index: str | None = EngineConfig.weights_index,
                 verify_share: float = EngineConfig.verify_share):
        self.model_path, self.spec, self.dtype = model_path, spec, dtype
        self.kv_tokens, self.stage_timeout = kv_tokens, stage_timeout
        self._pool_tokens = kv_tokens if preallocate_kv else 0  # each stage's KV pool from the start
        # what a re-plan splits over, for what, and for how many sequences decoding at once
        self.cluster, self.objective, self.batch = cluster, objective, batch
        self.use_spares, self.spares = spares, {}  # node id -> an empty, warm StageActor
        self.stages, self._micro_batches = [], micro_batches
        # in flight: a step's last ref -> every stage's refs, and the work it computes (None: under
        # a plan since left)
        self._steps: dict[ray.ObjectRef, tuple[list[ray.ObjectRef], Work | None]] = {}
        self._context: dict[int, int] = {}  # tokens each sequence's KV holds once its submitted steps ran
        self.drift_threshold, self.drift_window_s, self.move_kv = drift_threshold, drift_window_s, move_kv
        self.watch: DriftWatch | None = None
        self._move: Move | None = None  # to a new plan: raised by wait() once its stages are loaded
        self._starting: list[ray.ObjectRef] = []  # spare stage processes starting: ready() of each
        self.join_nodes = join_nodes
        self.fetch_weights, self._source = fetch_weights, None  # (a WeightSource once a stage may need one)
        self.weights_index = weights_index
        self._joins: dict[str, Join | None] = {}  # Ray nodes that joined: measured (None once offered)
        self._joins_checked = time.monotonic()
        self.on_event: Callable[[str, str], None] = lambda kind, message: None  # the scheduler's note()
        self._beside: list[dict[str, Any]] = []  # nodes of another pipeline's stages that compute at once
        self.verify_share, self._verifier = verify_share, None  # (a Verifier while a stage is on another node)
        self._history: dict[int, tuple[list[int], bool]] = {}  # checked: each sequence's tokens, and if greedy
        # a checked step's last ref -> its check, and the plan and nodes it ran under
        self._checks: dict[ray.ObjectRef, tuple[ray.ObjectRef, Plan, list[dict[str, Any]]]] = {}
        self.distrusted: set[str] = set()  # node ids whose stages failed a check
        plan.check_layers(spec)  # a bad plan is an error before Ray starts
        self._owns_ray = join(address, instead="run locally")
        try:
            self._start_plan(plan)
        except BaseException:
            self.close()
            raise

    def _start_plan(self, plan: Plan, started: Move | None = None) -> None:
        """Place, check and start every stage of `plan` (into warm spares where there are some),
        or take over the stages a move already `started` for it."""
        plan.check_layers(self.spec)
        self.plan, self.nodes = plan, started.nodes if started else self._place(plan)
        self.device_nodes = [self._device_nodes(i, s) for i, s in enumerate(plan.stages)]
        self._check_memory(plan.stages, self.device_nodes)
        self._set_threads()
        resources = {(n["NodeID"], s.device if s.device.startswith("cuda") else "cpu")
                     for s, nodes in zip(plan.stages, self.device_nodes, strict=True) for n in nodes}
        self.parallelism = self._micro_batches or len(resources)
        n = len(plan.stages)
        self.stages, self.pids, self.node_ids = [None] * n, [None] * n, [None] * n
        if started:  # (its spares are kept once the sequences moved in: see migrate())
            self.stages = list(started.actors)
            self._await(list(range(n)), started.loading)
        else:
            self._launch(list(range(n)))
        self._watch(plan)
        self._start_verifier()

    def _start_verifier(self) -> None:
        """With checks asked for and a stage on another node than the driver's: a Verifier on the
        driver's node holding the layers up to the last such stage's end, split as the plan is."""
        if self._verifier is not None:  # (the checks it runs for steps under the last plan finish first)
            pending = [check for check, _, _ in self._checks.values()]
            ray.wait(pending, num_returns=len(pending), timeout=self.stage_timeout)
            ray.kill(self._verifier)
        here = ray.get_runtime_context().get_node_id()
        remote = [i for i, node in enumerate(self.nodes) if node["NodeID"] != here]
        checked = self.plan.stages[:remote[-1] + 1] if remote else ()
        self._verifier = None if not self.verify_share or not checked else Verifier.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False), runtime_env=stage_env()).remote(
            str(self.model_path), [s.layers for s in checked], self._dtypes(checked), self.dtype)

    def _watch(self, plan: Plan) -> None:
        """Watch the stages' speeds against the cluster file's (without one, nothing predicts them)."""
        if self.cluster is None or not self.drift_threshold:
            return
        try:
            if self.watch is None:
                self.watch = DriftWatch(self.spec, self.cluster, plan, quant=self.dtype, objective=self.objective,
                                        kv_tokens=self.kv_tokens, threshold=self.drift_threshold,
                                        window_s=self.drift_window_s, batch=self.batch)
            else:  # a new plan (its cluster corrected by the watch, or without a dead node's devices)
                self.watch.cluster = self.cluster
                self.watch.follow(plan)
        except ValueError as e:
            log.warning("not watching the stages' speeds: %s", e)
            self.watch = None

    def _check_memory(self, stages: tuple[StageSpec, ...], nodes: list[list[dict[str, Any]]]) -> None:
        """Each node holds these stages' weights and KV (a ShardwiseError if not); nodes: each
        stage's devices' nodes."""
        where = [[f"{n['NodeManagerAddress']}/{s.device}" for n in ns] for ns, s in zip(nodes, stages, strict=True)]
        capacity = {f"{n['NodeManagerAddress']}/cpu": int(n["Resources"].get("memory", 0)) for ns in nodes for n in ns}
        Plan(stages).check_memory(self.spec, self._dtypes(stages), where, capacity, self.kv_tokens)

    def _dtypes(self, stages: tuple[StageSpec, ...]) -> list[str]:
        return [self.dtype or ("bfloat16" if s.device.startswith("cuda") else "float32") for s in stages]

    def _set_threads(self) -> None:
        """Each stage's threads (on each of its devices): alone on its node's cores, or sharing
        them when steps overlap (always, with another pipeline's stages beside it). A
        tensor-parallel stage's devices compute at once, so those on one node share its cores."""
        everything = [n for nodes in self.device_nodes for n in nodes] + self._beside
        self._threads = []
        for i, (stage, nodes) in enumerate(zip(self.plan.stages, self.device_nodes, strict=True)):
            for node in {n["NodeID"]: n for n in nodes}.values():
                count, cores = sum(n["NodeID"] == node["NodeID"] for n in nodes), self._cores(node)
                if count > cores:
                    log.warning("plan stage %d splits its layers among %d devices on node %s, which has %d cores: "
                                "they compute at once, so each sum waits for a device the OS has not scheduled; "
                                "give that node at most %d of them", i, count, node["NodeManagerAddress"], cores, cores)
            alone = tuple(stage.threads or self._share(n, everything if self._beside else nodes) for n in nodes)
            shared = tuple(stage.threads or self._share(n, everything) for n in nodes)
            self._threads.append((alone, shared))

    def share_cores(self, beside: list[dict[str, Any]]) -> None:
        """Another pipeline's stages compute on these Ray nodes at the same time as this one's (a
        disaggregated server's other pool): stages that share a node split its cores with them."""
        self._beside = beside
        self._set_threads()

    def _start_actors(self, stages: list[StageSpec], nodes: list[dict[str, Any]]) -> tuple[list, list]:
        """An actor loading each stage on its node (into the warm spare there if there is one),
        and a ref to each one's (pid, node id) once loaded."""
        actors, loading = [], []
        for i, (stage, node) in enumerate(zip(stages, nodes, strict=True)):
            devices = [node] + [self._node(i, placement) for placement, _ in stage.shares[1:]]
            tensor = TensorSeat(tuple(share for _, share in stage.shares),
                                nodes=tuple(n["NodeID"] for n in devices[1:])) if stage.devices else None
            actors.append(self.spares.pop(node["NodeID"], None) or actor_on(node["NodeID"]).remote())
            loading.append(actors[-1].load.remote(str(self.model_path), stage.layers, stage.device, self.dtype,
                                                  self._pool_tokens, self._source_for(devices), self.fetch_weights,
                                                  tensor))
        return actors, loading

    def _source_for(self, nodes: list[dict[str, Any]]) -> ray.actor.ActorHandle | None:
        """The driver's node's WeightSource (started the first time it is needed), for a stage on
        nodes that may lack the model file: another machine, or any where fetch_weights is True."""
        here = ray.get_runtime_context().get_node_id()
        if self.fetch_weights is False or (all(n["NodeID"] == here for n in nodes) and not self.fetch_weights):
            return None
        if self._source is None:
            self._source = WeightSource.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
                str(self.model_path), self.spec, self.weights_index)
        return self._source

    def _launch(self, indices: list[int]) -> None:
        """Start stages `indices` on their nodes while every other stage forgets its sequences;
        return once all are done."""
        actors, loading = self._start_actors([self.plan.stages[i] for i in indices], [self.nodes[i] for i in indices])
        for i, actor in zip(indices, actors, strict=True):
            self.stages[i] = actor
        self._await(indices, loading + [s.reset.remote() for i, s in enumerate(self.stages) if i not in indices])
        self._keep_spares()

    def _await(self, indices: list[int], loading: list[ray.ObjectRef]) -> None:
        """Wait for stages `indices` to load (and whatever else `loading` holds after their refs)."""
        timeout = max(self.stage_timeout, 300.0)
        if self._source is not None:  # some stages may fetch weights first: their progress
            wait_showing_progress(self._source, loading, timeout)
        try:
            ready = _get(loading, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ShardwiseError("pipeline stages did not start in 5 minutes: a node may be out of memory or "
                                 "gone; check `ray status`") from None
        for i, (pid, node_id) in zip(indices, ready, strict=False):
            self.pids[i], self.node_ids[i] = pid, node_id

    def _keep_spares(self) -> None:
        """With spares: one warm, empty actor on each node that holds stages (started, not awaited)."""
        for node in self.nodes if self.use_spares else []:
            if node["NodeID"] not in self.spares:
                self.spares[node["NodeID"]] = actor_on(node["NodeID"]).remote()
                self._starting.append(self.spares[node["NodeID"]].ready.remote())

    @classmethod
    def _place(cls, plan: Plan) -> list[dict[str, Any]]:
        """The Ray node of each stage (of its first device); an unknown placement is an error
        before anything loads."""
        return [cls._node(i, stage.placement) for i, stage in enumerate(plan.stages)]

    @classmethod
    def _device_nodes(cls, i: int, stage: StageSpec) -> list[dict[str, Any]]:
        """The Ray node of each of a stage's devices."""
        return [cls._node(i, placement) for placement, _ in stage.shares]

    @staticmethod
    def _node(i: int, placement: str) -> dict[str, Any]:
        alive = [n for n in ray.nodes() if n["Alive"]]
        key = ray.get_runtime_context().get_node_id() if placement == "local" else placement
        match = [n for n in alive if key in (n["NodeID"], n["NodeManagerAddress"])]
        if not match:
            known = ", ".join(f"{n['NodeManagerAddress']} ({n['NodeID'][:8]}…)" for n in alive)
            raise ShardwiseError(f"plan stage {i} is placed on unknown node '{placement}': "
                                 f"the cluster has {known}; use one of those or \"local\"")
        return match[0]

    @staticmethod
    def _cores(node: dict[str, Any]) -> int:
        return int(node["Resources"].get("CPU", os.cpu_count() or 1))

    @classmethod
    def _share(cls, node: dict[str, Any], nodes: list[dict[str, Any]]) -> int:
        """Stages on one node that run at once share its cores, so they never oversubscribe it."""
        return max(1, cls._cores(node) // sum(n["NodeID"] == node["NodeID"] for n in nodes))

    # --- the executor interface ---------------------------------------------------------------
    prefix_caching = speculation = True

    def add(self, seq_id: int, params: SamplingParams, generated: list[int] = (),
            prefix: CachedPrefix | None = None) -> None:
        self._context[seq_id] = len(prefix.tokens) if prefix else 0
        if self.verify_share:
            self._history[seq_id] = (list(prefix.tokens) if prefix else [], is_greedy(params))
        for stage in self.stages:  # an actor runs calls in the order one caller sent them
            stage.add.remote(seq_id, params, list(generated), prefix)

    def keep(self, seq_id: int, first: int, keys: list[bytes]) -> None:
        for stage in self.stages:
            stage.keep.remote(seq_id, first, keys)

    def evict(self, keys: list[bytes]) -> None:
        for stage in self.stages:
            stage.evict.remote(keys)

    def free(self, seq_id: int) -> None:
        self._context.pop(seq_id, None)
        self._history.pop(seq_id, None)
        for stage in self.stages:
            stage.free.remote(seq_id)

    def rewind(self, seq_id: int, length: int) -> None:
        self._context[seq_id] = length
        if seq_id in self._history:
            del self._history[seq_id][0][length:]
        for stage in self.stages:
            stage.rewind.remote(seq_id, length)

    def submit(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool]) -> ray.ObjectRef:
        overlapping = bool(self._steps)
        refs = []
        for stage, (alone, shared) in zip(self.stages, self._threads, strict=True):
            # each stage gets the previous one's output as a ref, never through the driver
            refs.append(stage.step.remote(seq_ids, chunks, sample, refs[-1] if refs else None,
                                          shared if overlapping else alone))
        work = Work(tuple((len(c), self._context.get(i, 0)) for i, c in zip(seq_ids, chunks, strict=True)))
        self._steps[refs[-1]] = (refs, work)
        for i, chunk in zip(seq_ids, chunks, strict=True):
            self._context[i] = self._context.get(i, 0) + len(chunk)
            if i in self._history:
                self._history[i][0].extend(chunk)
        if self._verifier is not None and random.random() < self.verify_share:
            row = random.randrange(len(seq_ids))
            tokens, greedy = self._history[seq_ids[row]]
            checked = Checked(list(tokens), len(chunks[row]), sum(map(len, chunks[:row])), row,
                              greedy and sample[row] == 1)
            self._checks[refs[-1]] = (self._verifier.check.remote(checked, *refs), self.plan, self.nodes)
        return refs[-1]

    def wait(self, handles: list[ray.ObjectRef]) -> int:
        if self.ready_to_move():
            raise self._move.drifted  # the scheduler moves to the new plan (see migrate() and recover())
        ready, _ = ray.wait(handles, num_returns=1, timeout=self.stage_timeout)
        if not ready:  # the oldest step is the one stuck: each stage runs its steps in order
            raise StageFailure(f"no step finished in {self.stage_timeout:.0f} s", handles[0], hung=True)
        return handles.index(ready[0])

    def result(self, handle: ray.ObjectRef) -> Sampled:
        check = self._checks.pop(handle, None)
        try:
            out = ray.get(handle)
        except ray.exceptions.RayTaskError as e:
            if not isinstance(e.cause, Exception) or isinstance(e.cause, ray.exceptions.RayError):
                raise StageFailure(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", handle) from None
            self._forget(handle)  # a stage raised: the step failed, but every stage lives
            raise StepError(f"a stage failed the step ({type(e.cause).__name__}: {e.cause})") from None
        except ray.exceptions.RayError as e:  # the actor, its node or an object it needed is gone
            raise StageFailure(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", handle) from None
        work = self._forget(handle)
        if check is not None:
            self._judge(*check, handle)
        if self.watch and work is not None and out.stage_seconds:
            verdict = self.watch.observe(work, out.stage_seconds, judge=self._settled())
            if verdict:
                self._judged(verdict)
        if self.watch and self.join_nodes and time.monotonic() - self._joins_checked > JOINS_CHECK_S:
            try:
                self._check_joins()
            except Exception as e:  # a newcomer's measuring never fails the step it runs beside
                log.warning("looking for nodes that joined failed: %s", e, exc_info=True)
                self.on_event("join failed", f"looking for nodes that joined failed ({type(e).__name__}: {e})")
        return out

    def _judge(self, check: ray.ObjectRef, plan: Plan, nodes: list[dict[str, Any]], handle: ray.ObjectRef) -> None:
        """Wait for a checked step's check (its tokens go out only once it passed). A stage on
        another node that failed it makes this step a StageFailure, and its node is trusted no more."""
        try:
            lie = ray.get(check, timeout=self.stage_timeout)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:  # (unchecked is no answer)
            raise ShardwiseError(f"the stages' results cannot be checked on this node ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[-1][:300]}): run without --verify-stages") from None
        if lie is None:
            return
        node, (a, b) = nodes[lie.stage], plan.stages[lie.stage].layers
        message = f"stage {lie.stage} (layers {a}-{b}) on node {node['NodeManagerAddress']} {lie.detail}"
        if node["NodeID"] == ray.get_runtime_context().get_node_id():  # ours: numerics, not a lie
            log.warning("%s, on the driver's own node: not acted on", message)
            return
        self.distrusted.add(node["NodeID"])
        self._joins[node["NodeID"]] = None  # (never offered back as a node that joined)
        raise StageFailure(f"{message}; its node is no longer trusted, and the model is planned over the others",
                           handle)  # (the scheduler tells of it, and recover() plans without the node)

    def _check_joins(self) -> None:
        """Start measuring each Ray node that joined; offer those measured to the watch (not
        while a move is under way: it would plan from where the stages no longer are)."""
        self._joins_checked = time.monotonic()
        for node in newcomers(self.watch.cluster, set(self._joins)):
            names = [d.name for d in self.watch.cluster.devices]
            name = next(n for n in (node.get("NodeName"), node["NodeManagerAddress"], node["NodeID"][:12])
                        if n and n not in names)
            stage_nodes = {self.watch.cluster.devices[d].name: n["NodeID"]
                           for members, nodes in zip(self.watch.members, self.device_nodes, strict=True)
                           for d, n in zip(members, nodes, strict=True)}
            self._joins[node["NodeID"]] = Join(node, name, self.watch.cluster, stage_nodes, str(self.model_path),
                                               self.spec.hidden_size).start()
            self.on_event("node joined", f"Ray node {name} joined: measuring its speed and links")
        for node_id, joining in self._joins.items():
            if joining is None or self._move:
                continue
            try:
                if not joining.done():
                    continue
                device, links, calibrated = joining.result()
            except (ray.exceptions.RayError, ShardwiseError) as e:
                self.on_event("join failed", f"node {joining.name} could not be measured ({str(e).splitlines()[0]})")
                self._joins[node_id] = None
                joining.close()
                continue
            self._joins[node_id] = None
            joining.close()
            verdict = self.watch.offer(device, links, calibrated)
            self.cluster = self.watch.cluster
            log.warning("%s", verdict.message)
            if verdict.plan is None:
                self.on_event("node offered", verdict.message)
            else:
                self.move_to(verdict.plan, verdict.message)

    def _forget(self, handle: ray.ObjectRef) -> Work | None:
        return self._steps.pop(handle)[1]

    def _settled(self) -> bool:
        """Whether no stage process starts beside the serving ones (a spare, a move's new stages):
        one takes the cores the watch judges the nodes' speeds by (so does a joining node's
        measuring, where it shares their machine)."""
        if self._starting:
            self._starting = ray.wait(self._starting, num_returns=len(self._starting), timeout=0)[1]
        return not self._starting and not self._move and not any(self._joins.values())

    def _judged(self, verdict: Verdict) -> None:
        """A node drifted: keep its corrected speed; with a new plan, move to it."""
        log.warning("%s", verdict.message)
        self.cluster = self.watch.cluster
        if verdict.plan is None:
            self.on_event("recalibrated", verdict.message)
        else:
            self.move_to(verdict.plan, verdict.message)

    def move_to(self, plan: Plan, why: str) -> None:
        """Move every stage to `plan`, the sequences with them (see migrate()). Where the nodes
        hold the old stages and the new at once, the new ones load while the old serve on, and
        wait() hands the move over once they are ready; else at the next wait(), the old
        stopping first."""
        plan.check_layers(self.spec)
        nodes = self._place(plan)
        self._drop_move()  # a newer plan replaces one still loading
        actors = loading = []
        try:
            new_nodes = [self._device_nodes(i, s) for i, s in enumerate(plan.stages)]
            self._check_memory(self.plan.stages + plan.stages, self.device_nodes + new_nodes)
            actors, loading = self._start_actors(list(plan.stages), nodes)
        except ShardwiseError:
            log.info("the nodes cannot hold the old stages and the new at once: the old stop first")
        self._move = Move(Drifted(why, plan), nodes, actors, loading)
        self.on_event("re-plan", f"{why}; " + ("the new stages load beside the old" if actors else
                                               "the stages stop for the move (the nodes cannot hold both)"))

    @property
    def moving(self) -> Drifted | None:
        """The move under way (its plan and why), raised by wait() once its stages are ready."""
        return self._move.drifted if self._move else None

    def ready_to_move(self, timeout: float = 0) -> bool:
        """Whether a move's new stages are loaded (waiting up to `timeout` seconds for them). A
        move whose stages failed to load is given up, the old stages serving on."""
        loading = self._move.loading if self._move else []
        if not self._move or (loading and ray.wait(loading, num_returns=len(loading), timeout=timeout)[1]):
            return False
        try:
            _get(loading)
        except (ray.exceptions.RayError, ShardwiseError) as e:
            why = str(e).strip().splitlines()[-1][:300]
            log.warning("the new stages failed to load (%s): the plan stays", why)
            self._drop_move()
            self.on_event("re-plan failed", f"the new stages failed to load ({why}); the plan stays")
            return False
        return True

    def _drop_move(self) -> None:
        """Forget a move not yet made, and kill the stages it started."""
        for actor in self._move.actors if self._move else []:
            ray.kill(actor, no_restart=True)
        self._move = None

    def timing(self) -> list[tuple[float, float]]:
        """Per stage, the median (predicted, measured) seconds of a step over the watch's last
        window (a tensor-parallel stage's: its slowest device's); [] when nothing is watched."""
        if not self.watch or not self.watch.medians:
            return []
        medians = iter(self.watch.medians)
        return [max((next(medians) for _ in members), key=lambda m: m[1]) for members in self.watch.members]

    def describe(self) -> list[dict[str, Any]]:
        return [{"layers": list(s.layers), "device": s.device, "node": node, "pid": pid}
                for s, node, pid in zip(self.plan.stages, self.node_ids, self.pids, strict=True)]

    # --- another pipeline beside this one (a disaggregated server's pools) ------------------------
    def holds(self, handle: ray.ObjectRef) -> bool:
        """Whether this step is one of this pipeline's in flight."""
        return handle in self._steps

    def hand_over(self, seq_ids: list[int], to: Pipeline) -> None:
        """Move these sequences to another pipeline of the same model (its own split of the
        layers): each stage exports their KV for its layers (the last, their samplers) and each
        of `to`'s stages takes in the layers it holds, through Ray's object store; then this one
        forgets them. Nothing waits: an actor runs one caller's calls in order, so `to`'s next
        step finds them in place (and a failed take-in fails that step)."""
        exports = [stage.export.remote(seq_ids) for stage in self.stages]
        for stage in to.stages:
            stage.adopt.remote(*exports)
        for seq_id in seq_ids:
            to._context[seq_id] = self._context.get(seq_id, 0)
            if seq_id in self._history:
                to._history[seq_id] = self._history[seq_id]
            self.free(seq_id)

    def forget_all(self) -> None:
        """Drop every sequence and the steps in flight (another pipeline lost a stage, and every
        sequence will be replayed)."""
        self._steps.clear()
        self._checks.clear()
        self._context.clear()
        self._history.clear()
        _get([stage.reset.remote() for stage in self.stages], timeout=self.stage_timeout)

    # --- moving and recovery ---------------------------------------------------------------------
    def migrate(self, plan: Plan) -> bool:
        """Move every stage to `plan` with its sequences: once the steps in flight have run, each
        old stage exports its sequences' KV (and the last, their samplers) and the new stages take
        in the layers they hold, so decoding carries on bit for bit, nothing replayed. False where
        that fails (a stage died, or a step did not finish), or with move_kv off: recover() then
        replays instead."""
        if not self.move_kv:
            return False
        started = time.perf_counter()
        steps = list(self._steps)
        if steps and ray.wait(steps, num_returns=len(steps), timeout=self.stage_timeout)[1]:
            return False
        drained = time.perf_counter()
        try:
            exports = [stage.export.remote(list(self._context)) for stage in self.stages]
            ray.wait(exports, num_returns=len(exports), timeout=self.stage_timeout, fetch_local=False)
            exported = time.perf_counter()
            self._restart(plan)
            _get([stage.adopt.remote(*exports) for stage in self.stages], timeout=self.stage_timeout)
        except (ray.exceptions.RayError, ShardwiseError, ValueError) as e:
            log.warning("could not move the sequences' KV to the new plan (%s): replaying them", e)
            return False
        log.info("moved %d sequences: steps in flight ran in %.2f s, exported in %.2f s, taken in in %.2f s",
                 len(self._context), drained - started, exported - drained, time.perf_counter() - exported)
        self._steps = {ref: (refs, None) for ref, (refs, _) in self._steps.items()}  # timed under the old plan
        self._keep_spares()  # (not before: a process starting takes cores from the move)
        return True

    def recover(self, failure: StageFailure) -> list[int]:
        """Replace the stages that died or hang, and clear the sequences of the rest (their KV
        also holds the steps that were in flight): on the same nodes while those live, else
        under a new plan. Returns the indices of the stages started afresh."""
        if isinstance(failure, Drifted):  # every stage lives, and moves to the new plan
            self._steps.clear()
            self._checks.clear()
            restarted = self._restart(failure.plan)
            self._keep_spares()
            return restarted
        lost = self._lost_stages(self._steps.get(failure.step, ([],))[0], failure.hung)
        self._steps.clear()
        self._checks.clear()
        if any(node["NodeID"] in self.distrusted for node in self.nodes):
            return self._replan()
        if self._nodes_alive():
            for i in lost:
                ray.kill(self.stages[i], no_restart=True)
            try:
                self._launch(lost)
                return lost
            except ray.exceptions.RayError as e:
                if self._nodes_alive(wait=self.stage_timeout):  # not a dying node: the replacement fails
                    raise ShardwiseError(f"a replacement pipeline stage failed to start ({type(e).__name__}): "
                                         "the node may be out of memory; check `ray status`") from None
        return self._replan()

    def _nodes_alive(self, wait: float = 0.0) -> bool:
        """Whether every stage's node lives; with `wait`, whether it still does after up to that
        many seconds (a node whose processes vanished counts as dead only once Ray's health
        checks say so)."""
        deadline = time.monotonic() + wait
        while True:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            if any(n["NodeID"] not in alive for n in self.nodes):
                return False
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.5)

    def _replan(self) -> list[int]:
        """A node died or failed a check: the planner splits the model anew over the devices left,
        and every stage starts afresh under its plan (a ShardwiseError saying what is short if
        nothing fits)."""
        alive = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in self.distrusted]
        cluster = self.cluster.on_nodes(alive) if self.cluster else Cluster.of_ray_nodes(alive)
        live = {n["NodeID"] for n in alive}
        self.spares = {node: spare for node, spare in self.spares.items() if node in live}
        try:
            plan, _ = plan_cluster(self.spec, cluster, self.objective, batch=self.batch, quant=self.dtype,
                                   kv_tokens=self.kv_tokens)
        except ShardwiseError as e:
            raise ShardwiseError(f"the model no longer fits on the nodes left (without those that died or failed "
                                 f"a check): {e}") from None
        return self._restart(plan)

    def _restart(self, plan: Plan) -> list[int]:
        """Every stage afresh under `plan` (into the warm spares where there are some, or the
        stages a move to it started already)."""
        started = self._move if self._move and self._move.drifted.plan is plan and self._move.actors else None
        if started:
            self._move = None
        self._drop_move()
        for actor in self.stages:
            ray.kill(actor, no_restart=True)
        self._start_plan(plan, started)
        return list(range(len(plan.stages)))

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

    def stats(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Each stage's Worker.stats(), with its Ray node (and, watched, its median predicted and
        measured step seconds)."""
        stats = _get([s.stats.remote() for s in self.stages], timeout)
        timing = [{"predicted_s": p, "measured_s": m} for p, m in self.timing()] or [{}] * len(stats)
        return [s | {"node": node} | t for s, node, t in zip(stats, self.node_ids, timing, strict=True)]

    def close(self) -> None:
        self._drop_move()
        for actor in [*self.stages, *self.spares.values(), self._source, self._verifier]:
            if actor is not None:
                ray.kill(actor)
        self.stages, self.spares, self._source, self._verifier = [], {}, None, None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


class Move(NamedTuple):
    """A move to a new plan not yet made: the stages it started (none where the nodes cannot
    hold the old and the new at once) and their refs that say when they are loaded."""

    drifted: Drifted  # its plan and why
    nodes: list[dict[str, Any]]
    actors: list[Any]
    loading: list[ray.ObjectRef]


def _get(refs: Any, timeout: float | None = None) -> Any:
    """ray.get, with a user mistake raised inside a stage surfacing as itself."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ShardwiseError):
            raise ShardwiseError(str(e.cause)) from None
        raise
