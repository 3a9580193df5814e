"""From a model and a cluster file to the planner's cost tables, and from a result to a Plan.

A cluster file (YAML):

    source: laptop                # optional: the first stage runs here (the driver's device)
    return_to_source: true        # optional: the sampled token travels back to it
    default_link: ethernet-1g     # catalog name, or {bandwidth_gbs: 1.25, latency_us: 50}
    devices:
      - name: laptop
        profile: this-machine.json    # a `shardwise profile` file (FILE#DEVICE for one of several) ...
        memory_gb: 8                  # memory available to shardwise (default: the whole device)
        node: local                   # Ray node: "local", a node id or an IP address
      - name: gpu
        type: rtx-4090                # ... or a catalog device
        node: 10.0.0.7
        device: cuda                  # torch device on that node (default: cuda for GPUs, else cpu)
        count: 2                      # identical devices: gpu-0, gpu-1
    links:
      - {from: laptop, to: gpu, link: ethernet-1g}   # or bandwidth_gbs / latency_us (/ latency_bytes); both ways

Per-layer costs come from the estimator for one decode step at the given batch and
context (at burst speed, each device's sustained share beside them); the embedding is
charged to layer 0 (always in the first stage) and the final norm, LM head and sampling
to the last layer (always in the last stage), so their weight counts exactly where it
runs. A stage's fixed step overhead is charged to layer 0 for the first stage and to the
transfer into each later stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec
from shardwise.perf.estimate import Stage, stage_time, time_operator
from shardwise.perf.hardware import SAME_DEVICE, DeviceSpec, LinkSpec, dtype_bytes, load_device, load_link
from shardwise.perf.memory import stage_bytes
from shardwise.perf.operators import (
    Precision,
    Work,
    embedding_operators,
    head_operators,
    layer_operators,
)
from shardwise.planner import baselines
from shardwise.planner.partition import STAGE_GAIN, CostTable, PlanResult, solve
from shardwise.planner.plan import DEFAULT_KV_TOKENS, Plan, StageSpec, TensorDevice, read_file

DEFAULT_LINK = "ethernet-1g"


@dataclass(frozen=True)
class ClusterDevice:
    name: str
    spec: DeviceSpec
    memory_bytes: float
    node: str = "local"
    torch_device: str = "cpu"


@dataclass
class Cluster:
    devices: list[ClusterDevice]
    links: dict[tuple[str, str], LinkSpec] = field(default_factory=dict)
    default_link: LinkSpec = field(default_factory=lambda: load_link(DEFAULT_LINK))
    source: str | None = None
    return_to_source: bool = False

    def link(self, a: str, b: str) -> LinkSpec:
        if a == b:
            return SAME_DEVICE
        return self.links.get((a, b)) or self.links.get((b, a)) or self.default_link

    def hosts(self) -> list[int]:
        """A number per device; CPU devices placed on one Ray node share it (they share its cores).
        ("local" is not taken as one node: a cluster file planned without Ray names no nodes.)"""
        keys = [(d.node, "cpu") if d.spec.kind == "cpu" and d.node != "local" else (d.node, d.name)
                for d in self.devices]
        return [keys.index(key) for key in keys]

    def machines(self) -> tuple[list[int], list[float]]:
        """A number per device's machine (unknown: one of its own), and the share of its speed each
        keeps while another host there runs micro-batches at once (1.0 where none is)."""
        keys = [d.spec.machine or ("device", i) for i, d in enumerate(self.devices)]
        numbers, hosts = [keys.index(key) for key in keys], self.hosts()
        shared = [len({h for h, m in zip(hosts, numbers, strict=True) if m == n}) > 1 for n in numbers]
        return numbers, [d.spec.crowded_in_flight if s else 1.0 for d, s in zip(self.devices, shared, strict=True)]

    def index(self, name: str) -> int:
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise ShardwiseError(f"the cluster has no device '{name}': it has {', '.join(d.name for d in self.devices)}")

    @classmethod
    def load(cls, path: str | Path) -> Cluster:
        return cls.from_dict(read_file(path, "cluster", yaml.safe_load, yaml.YAMLError, "YAML"), base=Path(path).parent)

    @classmethod
    def from_dict(cls, data: Any, base: Path | None = Path(".")) -> Cluster:
        """base: where "profile" paths are relative to; None takes catalog devices only (a cluster
        that a remote user sent must never open files here)."""
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list) or not data["devices"]:
            raise ShardwiseError('a cluster file needs a non-empty "devices" list')
        devices = []
        for i, d in enumerate(data["devices"]):
            if not isinstance(d, dict) or "name" not in d or ("type" in d) == ("profile" in d):
                raise ShardwiseError(f'cluster device {i} needs a "name" and exactly one of "type" (a catalog '
                                     'device) or "profile" (a `shardwise profile` file)')
            unknown = set(d) - {"name", "type", "profile", "memory_gb", "node", "device", "count"}
            if unknown:
                raise ShardwiseError(f"cluster device '{d['name']}' has unknown fields {sorted(unknown)}")
            if "profile" in d and base is None:
                raise ShardwiseError(f'cluster device \'{d["name"]}\' names a "profile" file: here only catalog '
                                     'devices ("type") are taken; use `shardwise plan` for profile files')
            spec = load_device(str(d["type"]), files=False) if "type" in d else load_device(str(base / d["profile"]))
            memory = float(d.get("memory_gb", spec.memory_bytes / 1e9)) * 1e9
            torch_device = d.get("device", "cuda" if spec.kind == "gpu" else "cpu")
            count = int(d.get("count", 1))
            names = [str(d["name"])] if count == 1 else [f"{d['name']}-{k}" for k in range(count)]
            devices += [ClusterDevice(n, spec, memory, str(d.get("node", "local")), torch_device) for n in names]
        if len({d.name for d in devices}) != len(devices):
            raise ShardwiseError("cluster device names must be unique")
        cluster = cls(devices, default_link=_link(data.get("default_link", DEFAULT_LINK)),
                      source=data.get("source"), return_to_source=bool(data.get("return_to_source", False)))
        for link in data.get("links") or []:
            if not isinstance(link, dict) or "from" not in link or "to" not in link:
                raise ShardwiseError('each cluster link needs "from" and "to"')
            cluster.index(link["from"]), cluster.index(link["to"])
            cluster.links[(link["from"], link["to"])] = _link(link.get("link", link))
        if cluster.source is not None:
            cluster.index(cluster.source)
        return cluster

    def on_nodes(self, alive: list[dict[str, Any]]) -> Cluster:
        """The devices whose Ray node is among `alive` (ray.nodes() entries; "local" always is)."""
        keys = {"local"} | {n["NodeID"] for n in alive} | {n["NodeManagerAddress"] for n in alive}
        devices = [d for d in self.devices if d.node in keys]
        if not devices:
            raise ShardwiseError("no device of the cluster file is on a live Ray node: nothing can run the model")
        source = self.source if self.source in {d.name for d in devices} else None
        return Cluster(devices, self.links, self.default_link, source, self.return_to_source and source is not None)

    @classmethod
    def of_ray_nodes(cls, nodes: list[dict[str, Any]]) -> Cluster:
        """Ray nodes described as a cluster file would, for planning without one: each node one
        CPU device with the memory Ray gives it, all alike in speed (a cluster file says better)."""
        cpu = load_device("x86-cpu")
        workers = [n for n in nodes if n["Resources"].get("CPU", 0) > 0] or nodes  # (a --num-cpus=0 head runs none)
        return cls([ClusterDevice(f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}", cpu,
                                  float(n["Resources"].get("memory", cpu.memory_bytes)), n["NodeID"])
                    for n in workers])


def cluster_file(profile: dict[str, Any], profile_path: str) -> dict[str, Any]:
    """A cluster file (as Cluster.load reads) for the nodes a `shardwise profile --address` measured:
    each node a device of its profile, on its Ray node (by IP), offering the memory Ray gives it;
    the links between nodes as measured."""
    devices = [{"name": d["name"], "profile": f"{profile_path}#{d['name']}", "memory_gb": d["memory_bytes"] / 1e9,
                "node": node["node"]} for d, node in zip(profile["devices"], profile["nodes"], strict=True)]
    links = [{"from": link["from"], "to": link["to"], "bandwidth_gbs": link["bandwidth"] / 1e9,
              "latency_us": link["latency"] * 1e6, "latency_bytes": link.get("latency_bytes", 0.0),
              "step_bytes": link.get("step_bytes", 0.0), "step_gbs": link.get("step_bandwidth", 0.0) / 1e9,
              "all_reduce_us": link.get("collective_s", 0.0) * 1e6,
              "all_reduce_gbs": link.get("collective_bandwidth", 0.0) / 1e9}
             for link in profile["links"] if link["from"] != link["to"]]
    return {"devices": devices, "links": links}


def _link(value: Any) -> LinkSpec:
    if isinstance(value, str):
        return load_link(value)
    try:
        return LinkSpec("custom", float(value["bandwidth_gbs"]) * 1e9, float(value.get("latency_us", 0)) * 1e-6,
                        latency_bytes=float(value.get("latency_bytes", 0)),
                        step_bytes=float(value.get("step_bytes", 0)),
                        step_bandwidth=float(value.get("step_gbs", 0)) * 1e9,
                        collective_s=float(value.get("all_reduce_us", 0)) * 1e-6,
                        collective_bandwidth=float(value.get("all_reduce_gbs", 0)) * 1e9)
    except (TypeError, KeyError, ValueError):
        raise ShardwiseError("a link is a catalog name or {bandwidth_gbs: ..., latency_us: ...}") from None


def layer_memory(spec: ModelSpec, p: Precision, kv_tokens: int) -> np.ndarray:
    """Bytes per layer, as the pipeline checks them: weights and a KV budget, the embedding on
    layer 0 and the final norm and head on the last (a tied head is counted there too: the last
    stage holds its own copy unless it is also the first)."""
    return np.array([stage_bytes(spec, (i, i + 1), p.weights, kv_tokens, p.kv) for i in range(spec.num_layers)])


def cost_table(spec: ModelSpec, cluster: Cluster, *, batch: int = 1, context: int = 512,
               quant: str | None = None, kv_tokens: int = DEFAULT_KV_TOKENS) -> CostTable:
    """Seconds per layer on each device for one decode step of `batch` sequences at `context`,
    weights at `quant` (default: each device's own dtype); split m ways, one micro-batch's."""
    work = Work.decode(batch, context)
    n = spec.num_layers
    compute = np.zeros((len(cluster.devices), n))
    overhead = np.zeros(len(cluster.devices))
    for i, d in enumerate(cluster.devices):
        p = precision(d.spec, quant)
        by_window = {}  # layers differ only in their attention window: time each kind once
        for layer in range(n):
            window = spec.window(layer)
            if window not in by_window:
                by_window[window] = sum(time_operator(op, d.spec).time_s
                                        for op in layer_operators(spec, work, p, layer=layer))
            compute[i, layer] = by_window[window]
        compute[i, 0] += sum(time_operator(op, d.spec).time_s for op in embedding_operators(spec, work, p))
        compute[i, -1] += sum(time_operator(op, d.spec).time_s for op in head_operators(spec, work, p))
        overhead[i] = d.spec.step_overhead_s
        compute[i, 0] += overhead[i]
    p0 = precision(cluster.devices[0].spec, quant)
    hidden = batch * spec.hidden_size * dtype_bytes(p0.activations)
    names = [d.name for d in cluster.devices]
    transfer = np.array([[0.0 if a == b else cluster.link(a, b).time(hidden) + overhead[j]
                          for j, b in enumerate(names)] for a in names])
    if cluster.return_to_source:  # token ids back: no stage starts there, so no overhead
        s = cluster.index(cluster.source)
        for a, name in enumerate(names):
            transfer[a, s] = 0.0 if a == s else cluster.link(name, names[s]).time(4 * batch)
    return CostTable(compute, layer_memory(spec, p0, kv_tokens), [d.memory_bytes for d in cluster.devices],
                     transfer, None if cluster.source is None else cluster.index(cluster.source),
                     cluster.return_to_source, cluster.hosts(), [d.spec.sustained_share for d in cluster.devices],
                     [np.inf if d.spec.burst_s is None else d.spec.burst_s for d in cluster.devices],
                     [d.spec.task_cpu_s for d in cluster.devices], *cluster.machines(), batch,
                     cache(lambda k: cost_table(spec, cluster, batch=-(-batch // k), context=context, quant=quant,
                                                kv_tokens=kv_tokens)))


def precision(device: DeviceSpec, quant: str | None) -> Precision:
    """Weights at `quant` (default: the device's own dtype); activations and KV at the device's."""
    return Precision(quant or device.default_dtype, device.default_dtype, device.default_dtype)


def to_plan(result: PlanResult, cluster: Cluster, group: TensorGroup | None = None) -> Plan:
    """The plan of a DP result; with `group`, its last device index stands for that
    tensor-parallel group (its members out of the table)."""
    def stage(d: int, a: int, b: int) -> StageSpec:
        if group is not None and d == len(group.others):
            first = cluster.devices[group.members[0]]
            return StageSpec((a, b), first.node, first.torch_device, devices=tuple(
                TensorDevice(cluster.devices[m].node, f) for m, f in zip(group.members, group.fractions, strict=True)))
        device = cluster.devices[group.others[d] if group is not None else d]
        return StageSpec((a, b), device.node, device.torch_device)

    return Plan(tuple(stage(*s) for s in result.stages))


@dataclass(frozen=True)
class TensorGroup:
    """Devices of the cluster that split a stage's every layer (tensor parallelism) in these
    fractions (by their speed), and the devices left for the other stages."""

    members: tuple[int, ...]
    fractions: tuple[float, ...]
    others: tuple[int, ...]

    def name(self, cluster: Cluster) -> str:
        return "+".join(f"{cluster.devices[m].name} ({f:.0%})" for m, f in zip(self.members, self.fractions,
                                                                             strict=True))


def tensor_groups(spec: ModelSpec, cluster: Cluster, table: CostTable) -> list[TensorGroup]:
    """The groups worth costing: the k devices fastest at the whole model, for k = 2 up to all
    (at most as many as the model has heads), each device's fraction in proportion to its speed.
    (The first also runs the embedding and LM head, but the others wait for it then: each
    layer's all-reduces hold the devices together, so a smaller share for it gains nothing.)"""
    speed = 1 / (table.compute.sum(axis=1) / table.share)
    order = [int(d) for d in np.argsort(-speed, kind="stable")]
    groups = []
    for k in range(2, min(len(order), spec.num_heads) + 1):
        members = tuple(order[:k])
        if table.source is not None and table.source in members[1:]:  # the first stage's device leads
            members = (table.source, *(m for m in members if m != table.source))
        fractions = tuple(float(speed[m] / speed[list(members)].sum()) for m in members)
        groups.append(TensorGroup(members, fractions, tuple(d for d in range(table.devices) if d not in members)))
    return groups


def with_group(spec: ModelSpec, cluster: Cluster, table: CostTable, group: TensorGroup, *, batch: int,
               context: int, quant: str | None) -> CostTable:
    """The cost table with the group's members replaced by one device: the group, whose layer
    takes its slowest member's fraction of it and the two all-reduces on the slowest link
    between members (the estimator's tensor-parallel stage), whose memory is the members'
    (each holding its fraction), whose share of its speed kept when busy is what its slowest
    member at its own sustained speed makes of it, and whose stages start and end on its first
    member."""
    members = [cluster.devices[m] for m in group.members]
    link = max((cluster.link(a.name, b.name) for a in members for b in members if a is not b),
               key=lambda link: (link.latency, -link.bandwidth))
    work = Work.decode(batch, context)
    p = precision(members[0].spec, quant)

    def layers(specs: list[DeviceSpec]) -> np.ndarray:
        """Each layer's seconds: what it adds to the group's time for the layers from 0 (so the
        costs a stage pays once a step, its overhead and its call to the others, are layer 0's)."""
        pair = tuple(zip(specs, group.fractions, strict=True))
        return np.diff([stage_time(spec, Stage(specs[0], 0, end, link=link, group=pair), work, p)
                        for end in range(1, spec.num_layers + 1)], prepend=0.0)

    row = layers([d.spec for d in members])
    kept = layers([d.spec.slower(1 / d.spec.sustained_share) for d in members])  # (each busy all the time)
    keep, lead = list(group.others), group.members[0]
    ends = keep + [lead]
    transfer = table.transfer[np.ix_(ends, ends)]
    return CostTable(
        np.vstack([table.compute[keep], row]), table.memory,
        [*table.capacity[keep], min(table.capacity[m] / f for m, f in zip(group.members, group.fractions,
                                                                          strict=True))],
        transfer, None if table.source is None else ends.index(table.source), table.return_to_source,
        [*table.hosts[keep], table.hosts[lead]], [*table.share[keep], row.sum() / kept.sum()],
        [*table.burst[keep], min(table.burst[list(group.members)])],
        [*table.task[keep], max(table.task[list(group.members)])],
        [*table.machines[keep], table.machines[lead]], [*table.crowded[keep], min(table.crowded[list(group.members)])],
        table.rows)  # (its micro-batches: the same sequences, split evenly)


def stage_estimates(cluster: Cluster, table: CostTable, stages: list[tuple[int, int, int]],
                    group: TensorGroup | None = None) -> list[dict[str, Any]]:
    """Per stage: device, node, layers, memory and predicted compute (from idle, and on a node busy
    all the time: the share of its speed it keeps up); and the transfer to the next. (group: as
    to_plan's.)"""
    rows = []
    for k, (d, a, b) in enumerate(stages):
        nxt = stages[k + 1][0] if k + 1 < len(stages) else (table.source if table.return_to_source else None)
        if group is not None and d == len(group.others):
            name, node = group.name(cluster), "+".join(cluster.devices[m].node for m in group.members)
        else:
            device = cluster.devices[group.others[d] if group is not None else d]
            name, node = device.name, device.node
        rows.append({"device": name, "node": node, "layers": [a, b],
                     "memory_bytes": float(table.memory[a:b].sum()), "capacity_bytes": float(table.capacity[d]),
                     "compute_s": float(table.compute[d, a:b].sum()), "share": float(table.share[d]),
                     "busy_s": float(table.busy(d, table.compute[d, a:b].sum())),
                     "transfer_s": float(table.transfer[d, nxt]) if nxt is not None else 0.0})
    return rows


def planning_batch(objective: str, batch: int | None = None, running: int | None = None) -> int:
    """The sequences decoding at once a plan is costed for: as asked, else one stream for latency
    and a server's full running batch for throughput (`running`, default max_num_seqs; split into
    micro-batches by the plan)."""
    from shardwise.config import EngineConfig

    if batch is not None:
        return batch
    return (running or EngineConfig.max_num_seqs) if objective == "throughput" else 1


@dataclass(frozen=True)
class Planned:
    """The planner's plans over a cluster: the DP's best pipeline (`result`, under `table`'s costs)
    and its best plan with a tensor-parallel stage (`tensor`, for `group`, under `grouped`'s)."""

    table: CostTable
    result: PlanResult
    group: TensorGroup | None = None
    tensor: PlanResult | None = None
    grouped: CostTable | None = None

    @property
    def pays(self) -> bool:
        """Whether the tensor-parallel plan beats the pipeline by the gain a stage must bring."""
        return self.tensor is not None and self.tensor.value * STAGE_GAIN < self.result.value

    @property
    def value(self) -> float:
        return self.tensor.value if self.pays else self.result.value

    def plan(self, cluster: Cluster) -> Plan:
        return to_plan(self.tensor, cluster, self.group) if self.pays else to_plan(self.result, cluster)


def best_plans(spec: ModelSpec, cluster: Cluster, objective: str, *, batch: int, context: int = 512,
               quant: str | None = None, kv_tokens: int = DEFAULT_KV_TOKENS) -> Planned:
    """The DP's plan over the cluster, and over each tensor-parallel group worth costing."""
    table = cost_table(spec, cluster, batch=batch, context=context, quant=quant, kv_tokens=kv_tokens)
    best = Planned(table, solve(table, objective, STAGE_GAIN))
    for group in tensor_groups(spec, cluster, table):
        grouped = with_group(spec, cluster, table, group, batch=batch, context=context, quant=quant)
        try:
            found = solve(grouped, objective, STAGE_GAIN)
        except ShardwiseError:  # (nothing fits with this group)
            continue
        if any(d == len(group.others) for d, _, _ in found.stages) and (
                best.tensor is None or found.value < best.tensor.value):
            best = Planned(table, best.result, group, found, grouped)
    return best


def plan_devices(cluster: Cluster, plan: Plan) -> list[list[int]]:
    """Per stage, the cluster device each of its devices runs on (by node and torch device); a
    ValueError for a device on no device of the cluster."""
    found: list[int] = []
    members = []
    for stage in plan.stages:
        mine = []
        for placement, _ in stage.shares:
            matches = [i for i, d in enumerate(cluster.devices)
                       if d.node == placement and d.torch_device == stage.device]
            if not matches:
                raise ValueError(f"stage on {placement}/{stage.device} is on no device of the cluster")
            mine.append(next((i for i in matches if i not in found), matches[0]))
            found.append(mine[-1])
        members.append(mine)
    return members


def plan_value(spec: ModelSpec, cluster: Cluster, plan: Plan, objective: str, *, batch: int, context: int = 512,
               quant: str | None = None, kv_tokens: int = DEFAULT_KV_TOKENS) -> float | None:
    """A plan's seconds per step as the planner costs it (None: a stage does not fit); a ValueError
    for a plan it cannot cost: more than one tensor-parallel stage, or a device of the cluster
    holding two of a plan's devices where one is in a tensor-parallel stage."""
    members = plan_devices(cluster, plan)
    table = cost_table(spec, cluster, batch=batch, context=context, quant=quant, kv_tokens=kv_tokens)
    split = [k for k, m in enumerate(members) if len(m) > 1]
    if not split:
        stages = [(m[0], *s.layers) for m, s in zip(members, plan.stages, strict=True)]
        return baselines.evaluate(table, stages, objective)
    flat = [d for m in members for d in m]
    if len(split) > 1 or len(set(flat)) < len(flat):
        raise ValueError("the planner costs one tensor-parallel stage, on devices of the cluster no other "
                         "of the plan's devices is on")
    stage = plan.stages[split[0]]
    group = TensorGroup(tuple(members[split[0]]), tuple(f for _, f in stage.shares),
                        tuple(d for d in range(len(cluster.devices)) if d not in members[split[0]]))
    grouped = with_group(spec, cluster, table, group, batch=batch, context=context, quant=quant)
    return baselines.evaluate(grouped, [(len(group.others) if len(m) > 1 else group.others.index(m[0]), *s.layers)
                              for m, s in zip(members, plan.stages, strict=True)], objective)


def plan_cluster(spec: ModelSpec, cluster: Cluster, objective: str = "latency", *, batch: int | None = None,
                 context: int = 512, quant: str | None = None,
                 kv_tokens: int = DEFAULT_KV_TOKENS) -> tuple[Plan, dict[str, Any]]:
    """The DP's plan, and a summary with its stages and the baselines' values under the same costs
    (batch: planning_batch's default)."""
    batch = planning_batch(objective, batch)
    best = best_plans(spec, cluster, objective, batch=batch, context=context, quant=quant, kv_tokens=kv_tokens)
    table, result, tensor = best.table, best.result, best.tensor
    stages = (stage_estimates(cluster, best.grouped, tensor.stages, best.group) if best.pays
              else stage_estimates(cluster, table, result.stages))
    flops = [d.spec.peak_flops(d.spec.default_dtype) for d in cluster.devices]
    others = {"even (vLLM)": baselines.even(table), "memory-proportional (exo, llama.cpp)":
              baselines.memory_proportional(table), "FLOPS-proportional (Cake)":
              baselines.flops_proportional(table, flops), "greedy fastest-first": baselines.greedy_fastest(table)}

    def layout(st: list[tuple[int, int, int]], group: TensorGroup | None = None) -> str:
        def name(d: int) -> str:
            if group is None:
                return cluster.devices[d].name
            return group.name(cluster) if d == len(group.others) else cluster.devices[group.others[d]].name
        return ", ".join(f"{name(d)}:{a}-{b}" for d, a, b in st)

    summary = {
        "model": spec.name, "objective": objective, "batch": batch, "context": context, "quant": quant,
        "stages": stages,
        "dp": {"value": result.value, "layout": layout(result.stages)},
        "tensor_parallel": None if tensor is None else {
            "value": tensor.value, "layout": layout(tensor.stages, best.group), "pays": best.pays, "gain": STAGE_GAIN,
            "pipeline_value": result.value},
        "declined": None if result.declined is None else {"value": result.declined.value, "gain": STAGE_GAIN,
                                                          "layout": layout(result.declined.stages)},
        "baselines": {name: {"value": baselines.evaluate(table, st, objective), "layout": layout(st)}
                      for name, st in others.items()},
    }
    if best.pays:
        summary["dp"] = {"value": tensor.value, "layout": summary["tensor_parallel"]["layout"]}
        summary["declined"] = None
    return best.plan(cluster), summary


def split_for_client(spec: ModelSpec, client: DeviceSpec, server: DeviceSpec, link: LinkSpec, sla: float, *,
                     client_memory: float | None = None, batch: int = 1, context: int = 512,
                     quant: str | None = None, kv_tokens: int = DEFAULT_KV_TOKENS) -> dict[str, Any]:
    """SplitLLM's question on a real model: which layers may the server hand to the client?"""
    from shardwise.planner.collaborative import split_client_server, split_frontier

    pair = Cluster([ClusterDevice("client", client, client_memory or client.memory_bytes),
                    ClusterDevice("server", server, server.memory_bytes)], {("client", "server"): link})
    table = cost_table(spec, pair, batch=batch, context=context, quant=quant, kv_tokens=kv_tokens)
    args = (list(table.compute[0]), list(table.compute[1]), float(table.transfer[0, 1]), list(table.memory),
            float(table.capacity[0]))
    best = split_client_server(*args, sla)
    everything = float(table.compute[1].sum())

    def row(r) -> dict[str, Any]:
        return {"server_work_s": r.server_work, "latency_s": r.latency, "client_memory_bytes": r.client_memory,
                "server_share": r.server_work / everything if everything else 0.0, "placement": r.placement}

    return {"model": spec.name, "sla_s": sla, "best": row(best), "frontier": [row(r) for r in split_frontier(*args)]}
