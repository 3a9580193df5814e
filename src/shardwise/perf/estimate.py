"""Estimates from operator rooflines: TTFT, TPOT, throughput and memory.

Each operator takes max(compute time, memory time) on its device, plus the
device's fixed per-operator overhead; collectives take their ring time on the
link between the devices sharing a stage. A deployment is a pipeline of stages,
each a device (or tp x ep identical devices, or a tensor-parallel group of any
devices, each taking its fraction of every layer) running a contiguous layer range:
one step's latency is the sum of the stages and the links between them; with
micro-batches in flight, throughput is set by the slowest stage or link. A device
that keeps up only a share of its speed (a CPU quota) runs a stage at full speed
when it idles between its turns, so a stream's token time is the larger of the
stages' burst times summed with the links, and the busiest node's sustained time.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec, check_layer_ranges, even_layer_ranges
from shardwise.model.tensor_split import split
from shardwise.perf.hardware import SAME_DEVICE, DeviceSpec, LinkSpec, dtype_bytes
from shardwise.perf.memory import kv_bytes, weight_bytes
from shardwise.perf.operators import (
    Operator,
    Precision,
    Work,
    collective,
    embedding_operators,
    head_operators,
    layer_operators,
)


@dataclass(frozen=True)
class TimedOperator:
    op: Operator
    count: int  # how many times the step runs it (once per layer)
    compute_s: float
    memory_s: float
    comm_s: float
    overhead_s: float

    @property
    def time_s(self) -> float:
        """One instance."""
        return max(self.compute_s, self.memory_s, self.comm_s) + self.overhead_s

    @property
    def total_s(self) -> float:
        return self.time_s * self.count

    @property
    def bound(self) -> str:
        return max((self.compute_s, "compute"), (self.memory_s, "memory"), (self.comm_s, "link"))[1]


def collective_time(op: Operator, link: LinkSpec, launch: float) -> float:
    """As the engine sums over a link it measured (CPU devices: each sends its part to every
    other at once): the measured fixed time and n-1 parts through each device's connection.
    Otherwise ring algorithms: all-reduce moves 2(n-1)/n of the message in 2(n-1) hops,
    all-gather, all-to-all and broadcast (n-1)/n of it in n-1 hops; plus the library's fixed
    start-up (`launch`)."""
    n = op.participants
    if n <= 1 or not op.message_bytes:
        return 0.0
    if link.collective_s and link.collective_bandwidth:
        return link.collective_s + (n - 1) * op.message_bytes / link.collective_bandwidth
    hops = 2 * (n - 1) if op.collective == "all-reduce" else n - 1
    return launch + hops * link.latency + hops / n * op.message_bytes / link.bandwidth


def time_operator(op: Operator, device: DeviceSpec, link: LinkSpec = SAME_DEVICE, count: int = 1) -> TimedOperator:
    if op.kind == "collective":
        return TimedOperator(op, count, 0.0, 0.0, collective_time(op, link, device.collective_s), 0.0)
    compute_eff, memory_eff = device.compute_efficiency, device.memory_efficiency
    if op.kind == "attention":
        compute_eff, memory_eff = compute_eff * device.attention_efficiency, memory_eff * device.attention_efficiency
    measured = device.matmul_efficiency_at(op.rows, op.weights) if op.kind == "matmul" else None
    if measured:
        compute_eff = memory_eff = measured
    compute = op.flops / (device.peak_flops(op.dtype) * compute_eff)
    memory = op.bytes / (device.bandwidth * memory_eff)
    return TimedOperator(op, count, compute, memory, 0.0, device.op_overhead_s)


@dataclass(frozen=True)
class Stage:
    """Layers [start, end) on one device, or on tp x ep identical devices joined by `link`, or
    on a tensor-parallel `group`: each device (the first is `device`) and its fraction of every
    layer's heads and columns, as the engine splits them (the first also runs the embedding and
    the LM head), joined by `link`."""

    device: DeviceSpec
    start: int
    end: int
    tp: int = 1
    ep: int = 1
    link: LinkSpec = SAME_DEVICE
    host: str | None = None  # stages on one host take turns on its cores (None: a host of its own)
    group: tuple[tuple[DeviceSpec, float], ...] = ()


@dataclass(frozen=True)
class Deployment:
    stages: tuple[Stage, ...]
    links: tuple[LinkSpec, ...] = ()  # links[i] hands hidden states from stage i to stage i + 1
    return_link: LinkSpec = SAME_DEVICE  # the sampled token ids back to the driver beside stage 0

    def __post_init__(self) -> None:
        if len(self.links) != len(self.stages) - 1:
            raise ShardwiseError(f"{len(self.stages)} stages need {len(self.stages) - 1} links, got {len(self.links)}")

    @classmethod
    def single(cls, spec: ModelSpec, device: DeviceSpec, tp: int = 1, ep: int = 1,
               link: LinkSpec = SAME_DEVICE) -> Deployment:
        return cls((Stage(device, 0, spec.num_layers, tp, ep, link),))

    @classmethod
    def pipeline(cls, spec: ModelSpec, devices: list[DeviceSpec], links: LinkSpec | list[LinkSpec],
                 layers: list[tuple[int, int]] | None = None, hosts: list[str | None] | None = None) -> Deployment:
        """Stages on `devices` in order, joined by `links` (one for all, or one per gap); layers:
        the ranges, by default the pipeline's even split; hosts: where each stage runs (stages
        on one host share its compute). Token ids return over the first link."""
        if layers is None:
            layers = even_layer_ranges(spec.num_layers, len(devices))
        hosts = hosts or [None] * len(devices)
        stages = tuple(Stage(d, a, b, host=h) for d, (a, b), h in zip(devices, layers, hosts, strict=True))
        links = [links] * (len(stages) - 1) if isinstance(links, LinkSpec) else list(links)
        return cls(stages, tuple(links), links[0] if links else SAME_DEVICE)

    def check(self, spec: ModelSpec) -> None:
        """The layer ranges as the pipeline checks a plan's, and tp / ep that divide the model (a
        tensor-parallel group: no more devices than heads)."""
        check_layer_ranges([(s.start, s.end) for s in self.stages], spec.num_layers)
        for s in self.stages:
            if s.group:
                split(spec, tuple(f for _, f in s.group))
                continue
            if spec.num_heads % s.tp or (spec.num_experts and spec.num_experts % s.ep):
                raise ShardwiseError(
                    f"tp={s.tp} must divide the {spec.num_heads} attention heads"
                    + (f" and ep={s.ep} the {spec.num_experts} experts" if spec.num_experts else "")
                )


def stage_operators(spec: ModelSpec, stage: Stage, work: Work, p: Precision) -> list[TimedOperator]:
    """Every operator a stage runs for one step, each timed once, with its count (a
    tensor-parallel group's: its slowest device's, and the collectives)."""
    return pacing(spec, stage, work, p)[1]


def pacing(spec: ModelSpec, stage: Stage, work: Work, p: Precision) -> tuple[DeviceSpec, list[TimedOperator]]:
    """The device whose time is the stage's, and the operators it runs for one step."""
    if not stage.group:
        return stage.device, _with_edges(spec, stage, work, p, stage.device,
                                         _layer_operators(spec, stage, work, p, stage.device, stage.tp))
    # each device computes its fraction of every layer (all at once: devices sharing a machine at
    # the speed they keep when crowded), and the two all-reduces in each layer hold every device
    # to the slowest; the first device's embedding and LM head come before and after the layers,
    # while the others wait for it (so it computes them alone, uncrowded)
    device, ops = max(_group_layers(spec, stage, work, p), key=lambda t: _total(t[1], t[0]))
    ops = _with_edges(spec, stage, work, p, stage.group[0][0], ops)
    n, ab = len(stage.group), dtype_bytes(p.activations)
    launcher = max((d for d, _ in stage.group), key=lambda d: d.collective_s)
    collectives = [time_operator(collective("all_reduce", "all-reduce", n, work.tokens * spec.hidden_size * ab),
                                 launcher, stage.link, 2 * (stage.end - stage.start))]
    # the others start their step when the first device's call reaches them: with the hidden
    # states, or at the first stage with the token ids, and then the embeddings
    called = work.tokens * (spec.hidden_size * ab if stage.start else 4)
    collectives.append(time_operator(collective("step_call", "broadcast", n, called), launcher, stage.link))
    if stage.start == 0:
        collectives.append(time_operator(
            collective("embedding_broadcast", "broadcast", n, work.tokens * spec.hidden_size * ab),
            launcher, stage.link))
    return device, ops + collectives


def _group_layers(spec: ModelSpec, stage: Stage, work: Work, p: Precision) -> list[tuple[DeviceSpec, list]]:
    """Each device of a tensor-parallel stage, as it runs crowded, with its operators for its
    fraction of every layer."""
    return [(device, _layer_operators(spec, stage, work, p, device, 1 / fraction))
            for device, fraction in crowded(stage.group)]


def crowded(group: tuple[tuple[DeviceSpec, float], ...]) -> tuple[tuple[DeviceSpec, float], ...]:
    """A group's devices as they run when all compute at once: those sharing a machine with
    another member at the share of their speed they keep then."""
    machines = Counter(device.machine for device, _ in group if device.machine)
    return tuple((device.slower(1 / device.crowded_share) if machines[device.machine] > 1 else device, fraction)
                 for device, fraction in group)


def _with_edges(spec: ModelSpec, stage: Stage, work: Work, p: Precision, device: DeviceSpec,
                layers: list[TimedOperator]) -> list[TimedOperator]:
    """The layers' operators after the embedding and before the LM head (with sampling), where
    the stage holds them, on `device`."""
    before = [time_operator(op, device) for op in embedding_operators(spec, work, p)] if stage.start == 0 else []
    after = ([time_operator(op, device, stage.link) for op in head_operators(spec, work, p, stage.tp)]
             if stage.end == spec.num_layers else [])
    return before + layers + after


def _layer_operators(spec: ModelSpec, stage: Stage, work: Work, p: Precision, device: DeviceSpec,
                     tp: float) -> list[TimedOperator]:
    """One device's operators for a 1/tp share of each of the stage's layers (a group's
    collectives are counted by pacing())."""
    # layers alike (the same attention window) are timed once, counted as often as they occur
    alike = defaultdict(list)
    for i in range(stage.start, stage.end):
        alike[spec.window(i)].append(i)
    return [time_operator(op, device, stage.link, len(layers))
            for layers in alike.values()
            for op in layer_operators(spec, work, p, tp, stage.ep, layers[0])
            if not (stage.group and op.kind == "collective")]


def _total(operators: list[TimedOperator], device: DeviceSpec) -> float:
    return sum(t.total_s for t in operators) + device.step_overhead_s


def stage_time(spec: ModelSpec, stage: Stage, work: Work, p: Precision) -> float:
    return _total(*reversed(pacing(spec, stage, work, p)))


def device_times(spec: ModelSpec, stage: Stage, work: Work, p: Precision) -> list[float]:
    """Each device's own seconds of compute for one step, without the sums that wait for the
    others: a tensor-parallel group's share of every layer on each device (crowded as in
    pacing()), and the first's embedding and LM head."""
    if not stage.group:
        return [stage_time(spec, stage, work, p)]
    return [_total(_with_edges(spec, stage, work, p, stage.group[0][0], ops) if k == 0 else ops, device)
            for k, (device, ops) in enumerate(_group_layers(spec, stage, work, p))]


@dataclass(frozen=True)
class StepTime:
    stages: list[float]  # per stage, from idle (at burst speed, as long as the burst lasts)
    links: list[float]  # between stages, then the return of token ids
    operators: list[list[TimedOperator]] = field(default_factory=list)  # per stage, for breakdowns and plots
    hosts: list[str | None] = field(default_factory=list)  # per stage; None: a host of its own
    sustained: list[float] = field(default_factory=list)  # per stage, on a node busy all the time
    # per stage, the share of its speed it keeps while the deployment's other hosts on its machine
    # compute too (1.0: none there), as they do with micro-batches in flight
    crowded: list[float] = field(default_factory=list)

    @property
    def latency(self) -> float:
        """One micro-batch through every stage and link."""
        return sum(self.stages) + sum(self.links)

    @property
    def bottleneck(self) -> float:
        """The busiest host or link per micro-batch with micro-batches in flight: stages that share
        a host take turns on it, at the speed it keeps up, and hosts sharing a machine compute at once."""
        busy = self.sustained or self.stages
        return self._busiest([t / c for t, c in zip(busy, self.crowded or [1.0] * len(busy), strict=True)])

    def _busiest(self, stage_seconds: list[float]) -> float:
        return max(shared_host_busy(stage_seconds, self.hosts) + self.links)

    def cycle(self, micro_batches: int) -> float:
        """Time for every micro-batch to take one step, when they follow each other round the
        pipeline (one alone: no stage computes beside another)."""
        if micro_batches == 1:
            return max(self.latency, self._busiest(self.sustained or self.stages))
        return max(self.latency, micro_batches * self.bottleneck)


def step_time(spec: ModelSpec, deployment: Deployment, work: Work, p: Precision) -> StepTime:
    hidden = work.tokens * spec.hidden_size * dtype_bytes(p.activations)
    paced = [pacing(spec, s, work, p) for s in deployment.stages]
    operators = [ops for _, ops in paced]
    burst = [_total(ops, device) for device, ops in paced]
    links = [link.time(hidden) for link in deployment.links] + [deployment.return_link.time(4 * work.rows)]
    on = list(zip((device for device, _ in paced), burst, strict=True))
    return StepTime([d.step_seconds(t) for d, t in on], links, operators, [s.host for s in deployment.stages],
                    [d.busy_seconds(t) for d, t in on], crowded_shares(deployment))


def crowded_shares(deployment: Deployment) -> list[float]:
    """Per stage, the share of its speed its device keeps while the deployment's other hosts on its
    machine compute at once (a tensor-parallel group's crowding is its own: in pacing())."""
    hosts_on = defaultdict(set)
    for k, s in enumerate(deployment.stages):
        if s.device.machine and not s.group:
            hosts_on[s.device.machine].add(("own", k) if s.host is None else s.host)
    return [s.device.crowded_in_flight if not s.group and len(hosts_on[s.device.machine]) > 1 else 1.0
            for s in deployment.stages]


def shared_host_busy(stage_seconds: list[float], hosts: list | None) -> list[float]:
    """Busy seconds per host: the stages' own seconds, summed where they share a host."""
    busy: dict[Any, float] = {}
    for k, (seconds, host) in enumerate(zip(stage_seconds, hosts or [None] * len(stage_seconds), strict=True)):
        key = ("own", k) if host is None else host
        busy[key] = busy.get(key, 0.0) + seconds
    return list(busy.values())


@dataclass(frozen=True)
class Draft:
    """Speculative decoding: gamma tokens drafted in a step that drafts, of which the fraction
    `acceptance` is accepted (accepted over drafted, as the engine's /metrics counts them), in
    the share `drafting` of the steps (prompt lookup drafts only where it finds a match; a step
    without drafts is a plain one). spec: the draft model (None: prompt lookup, whose drafting
    costs nothing next to a step); weights: the draft's weight format (None: the model's, e.g.
    "int4" drafting with the model's own weights)."""

    spec: ModelSpec | None
    gamma: int = 4
    acceptance: float = 0.7
    weights: str | None = None
    drafting: float = 1.0

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens a step: the model's own token plus accepted drafts."""
        return 1 + self.drafting * self.gamma * self.acceptance


@dataclass
class Estimate:
    ttft_s: float
    tpot_s: float
    e2e_s: float
    throughput_tok_s: float  # generated tokens per second over whole requests
    decode_tok_s: float  # generated tokens per second while decoding
    prefill_tok_s: float
    memory: dict[str, float]  # bytes by part, over all devices
    stages: list[dict[str, Any]]  # per stage: device, layers, memory, capacity, step times
    max_batch: int  # the largest batch whose KV cache and activations fit everywhere
    breakdown: dict[str, dict[str, float]]  # prefill / decode: seconds per operator name, links
    inputs: dict[str, Any]
    operators: dict[str, list[TimedOperator]] = field(default_factory=dict, repr=False)  # stage 0's, for plots

    @property
    def fits(self) -> bool:
        return all(s["fits"] for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("operators")
        data["fits"] = self.fits
        return data


def estimate(spec: ModelSpec, deployment: Deployment, *, batch: int = 1, input_tokens: int = 512,
             output_tokens: int = 128, precision: Precision | None = None, chunk: int | None = None,
             draft: Draft | None = None, micro_batches: int | None = None, cached_tokens: int = 0) -> Estimate:
    """Serve `batch` requests of input_tokens prompt and output_tokens generated tokens.
    cached_tokens: how many of each prompt's first tokens the prefix cache holds (prefill runs
    only the rest, its attention reading the cached keys).

    Prefill runs the prompts as micro-batches through the pipeline (chunked: one prompt in
    chunks of `chunk` tokens beside batch - 1 running decodes); decode is timed at the mean
    context, input + output / 2, where attention costs are linear in context."""
    deployment.check(spec)
    if min(batch, input_tokens, output_tokens) < 1:
        raise ShardwiseError("batch, input and output tokens must each be at least 1")
    if chunk is not None and chunk < 1:
        raise ShardwiseError("the prefill chunk must be at least 1 token")
    if not 0 <= cached_tokens < input_tokens:
        raise ShardwiseError(f"cached tokens must be 0 up to the prompt's {input_tokens} - 1 (its last token always "
                             f"runs), got {cached_tokens}")
    first = deployment.stages[0].device
    p = precision or Precision(first.default_dtype, first.default_dtype, first.default_dtype)
    m = micro_batches or min(batch, len(deployment.stages))
    ub = math.ceil(batch / m)
    context = input_tokens + output_tokens // 2

    if chunk:
        ttft, pos = 0.0, cached_tokens
        while pos < input_tokens:
            n = min(chunk, input_tokens - pos)
            mixed = Work(((n, pos),)) + Work.decode(batch - 1, context) if batch > 1 else Work(((n, pos),))
            ttft += step_time(spec, deployment, mixed, p).latency
            pos += n
        # the step reported and sized for memory: the first chunk, after the cached tokens
        prefill_work = Work(((min(chunk, input_tokens - cached_tokens), cached_tokens),))
        prefill = step_time(spec, deployment, prefill_work, p)
    else:
        prefill_work = Work.prefill(ub, input_tokens, cached_tokens)
        prefill = step_time(spec, deployment, prefill_work, p)
        ttft = prefill.latency + (m - 1) * prefill.bottleneck

    decode = step_time(spec, deployment, Work.decode(ub, context), p)
    tpot = decode.cycle(m)
    draft_prefill = 0.0  # a draft model's own prefill of the prompts, before its first drafts
    if draft:
        proposing = 0.0
        if draft.spec is not None:  # drafted on the first stage's device, at the draft's precision
            dp = replace(p, weights=draft.weights) if draft.weights else p
            draft_stage = Stage(first, 0, draft.spec.num_layers)
            only = deployment.stages[0]
            alone = len(deployment.stages) == 1 and only.tp * only.ep == 1 and not only.group
            if not (draft.weights and alone):  # (the model's own weights beside it copy its KV of the prompt)
                draft_prefill = stage_time(draft.spec, draft_stage, Work.prefill(batch, input_tokens), dp)
            proposing = draft.gamma * stage_time(draft.spec, draft_stage, Work.decode(batch, context), dp)
        verifying = step_time(spec, deployment, Work.decode(ub, context, new=draft.gamma + 1), p).cycle(m)
        tpot = (draft.drafting * (proposing + verifying) + (1 - draft.drafting) * tpot) / draft.tokens_per_step

    e2e = ttft + draft_prefill + (output_tokens - 1) * tpot
    stages = _stage_reports(spec, deployment, p, batch, ub, input_tokens + output_tokens, prefill_work,
                            prefill, decode)
    memory = {part: sum(s["memory"][part] * s["devices"] for s in stages)
              for part in ("weights", "kv_cache", "activations", "total")}
    return Estimate(
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        throughput_tok_s=batch * output_tokens / e2e,
        decode_tok_s=batch / tpot,
        prefill_tok_s=(1 if chunk else batch) * (input_tokens - cached_tokens) / ttft,  # chunked: the joining one
        memory=memory,
        stages=stages,
        max_batch=min(s["max_batch"] for s in stages),
        breakdown={"prefill": _breakdown(deployment, prefill), "decode": _breakdown(deployment, decode)},
        inputs={"model": spec.name, "batch": batch, "input_tokens": input_tokens, "cached_tokens": cached_tokens,
                "output_tokens": output_tokens,
                "precision": asdict(p), "micro_batches": m, "chunk": chunk,
                "draft": {"model": draft.spec.name if draft.spec else "ngram", "weights": draft.weights,
                          "gamma": draft.gamma, "acceptance": draft.acceptance, "drafting": draft.drafting}
                if draft else None},
        operators={"prefill": prefill.operators[0], "decode": decode.operators[0]},
    )


def _breakdown(deployment: Deployment, step: StepTime) -> dict[str, float]:
    """Seconds per operator name for one step of one micro-batch, over all stages."""
    seconds: dict[str, float] = defaultdict(float)
    for stage, operators in zip(deployment.stages, step.operators, strict=True):
        for t in operators:
            seconds[t.op.name] += t.total_s
        seconds["step_overhead"] += stage.device.step_overhead_s
    seconds["links"] = sum(step.links)
    return {k: v for k, v in seconds.items() if v}


def stage_memory(spec: ModelSpec, stage: Stage, p: Precision, sequences: int, tokens_per_sequence: int,
                 prefill: Work) -> dict[str, float]:
    """Bytes on each device of a stage: its weights, the KV cache of `sequences` sequences, and
    the largest activation working set of a prefill step (plus fp32 logits at the last stage)."""
    layers = (stage.start, stage.end)
    tp = 1 / stage.group[0][1] if stage.group else stage.tp  # (a group's first device: its fraction)
    weights = weight_bytes(spec, layers, p.weights, tp, stage.ep)
    kv = kv_bytes(spec, layers, sequences * tokens_per_sequence, p.kv, tp)
    acts = max(op.activation_bytes for op in layer_operators(spec, prefill, p, tp, stage.ep))
    if stage.end == spec.num_layers:
        acts += prefill.rows * spec.vocab_size * 4.0  # fp32 logits
    return {"weights": weights, "kv_cache": kv, "activations": acts, "total": weights + kv + acts}


def _stage_reports(spec: ModelSpec, deployment: Deployment, p: Precision, batch: int, ub: int,
                   tokens_per_sequence: int, prefill_work: Work, prefill: StepTime,
                   decode: StepTime) -> list[dict[str, Any]]:
    reports = []
    for i, s in enumerate(deployment.stages):
        mem = stage_memory(spec, s, p, batch, tokens_per_sequence, prefill_work)
        per_sequence = (mem["kv_cache"] + mem["activations"] / ub) / batch
        room = s.device.memory_bytes - mem["weights"]
        reports.append({
            "device": s.device.name,
            "devices": len(s.group) or s.tp * s.ep,
            "layers": [s.start, s.end],
            "memory": mem,
            "capacity": s.device.memory_bytes,
            "fits": mem["total"] <= s.device.memory_bytes,
            "max_batch": max(0, int(room // per_sequence)) if room > 0 else 0,
            "prefill_s": prefill.stages[i],
            "decode_s": decode.stages[i],
        })
    return reports
