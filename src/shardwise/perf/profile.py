"""Measure one device into a DeviceSpec (cluster_profile.py does every Ray node and link).

Three kinds of figures: the raw roofline (matmul FLOP/s at the dtypes the engine
uses, streaming-read bandwidth), the engine's matmul efficiency by row count, and
the engine's real step times for a model (whole model and half of it, prefill and
decode, so per-layer costs follow). The step times then fit the efficiencies and
fixed overheads that turn the raw roofline into the engine's own.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from shardwise.cache import cache_dir
from shardwise.engine.kv_cache import BLOCK_SIZE, KVCache
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.shard import ShardModel, resolve_device
from shardwise.engine.worker import Worker
from shardwise.model.spec import ModelSpec
from shardwise.perf.estimate import Stage, stage_operators
from shardwise.perf.hardware import DeviceSpec, LinkSpec, canonical_dtype, dtype_bytes
from shardwise.perf.operators import Precision, Work
from shardwise.quant.quantized import BITS, quantize

# The engine work profile measures: prefill of one prompt, and decode steps at a cached context,
# spread over the range users run (and apart from the points benchmarks check it on).
PREFILL_TOKENS = (12, 24, 48, 96, 192, 384)
DECODE_BATCHES = (2, 4, 12, 24)
DECODE_CONTEXT = 64
# and some batches again at a longer context: attention's cost grows with it, the rest does not,
# so only two contexts tell attention's speed apart from the other small operators'
LONG_CONTEXT, LONG_CONTEXT_BATCHES = 384, (4, 12)
Progress = Callable[[str], None]


# A sample of a profile runs its work back to back for at least this long: several CFS periods
# (100 ms), so that a CPU quota (a cgroup's, a burstable or shared machine's) shows in it. A sample
# shorter than one period never meets the quota: such a node measures as fast as an unthrottled one.
SUSTAINED_S = 0.25


def seconds(fn: Callable[[], Any], device: torch.device, at_least: float = 0.0) -> float:
    """Seconds a call of fn takes: one call, or as many back to back as fill `at_least` seconds.
    Where calls stall (a quota's budget spent until its next period), only whole periods count:
    from the end of the first stalled call to the end of the last. A sample of a few periods
    otherwise gains or loses up to one budget by where in its period it began."""
    ends, start = [], time.perf_counter()
    while not ends or ends[-1] - start < at_least:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends.append(time.perf_counter())
    spans = np.diff([start, *ends])
    stalled = stalls(spans)
    return whole_periods(spans, stalled) if len(stalled) >= 2 else (ends[-1] - start) / len(ends)


def stalls(spans) -> np.ndarray:
    """Which of back-to-back calls' durations stalled: far longer than the typical call (a quota's
    budget spent, the call waited for the next period)."""
    spans = np.asarray(spans)
    return np.flatnonzero(spans > 3 * np.median(spans))


def whole_periods(spans, stalled: np.ndarray) -> float:
    """Seconds per call over whole quota periods: from the end of the first stalled call to the
    end of the last (at least two stalls)."""
    first, last = stalled[0], stalled[-1]
    return float(sum(spans[first + 1:last + 1])) / float(last - first)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, at_least: float = 0.0) -> float:
    """Median seconds of fn over repeats (each sustained for at_least seconds), after one warm-up."""
    fn()
    return statistics.median(seconds(fn, device, at_least) for _ in range(repeats))


def timed_in_rounds(fns: list[Callable[[], Any]], device: torch.device, rounds: int,
                    progress: Progress = lambda _: None, what: str = "") -> list[float]:
    """Median seconds of each fn, sustained (SUSTAINED_S), once per round after a warm-up. On a
    shared machine slow spells come in bursts: a burst then slows one round of every point, which
    the median drops, instead of every repeat of one point, which would bend the curve the fit
    follows."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(rounds):
        progress(f"{what}, round {r + 1}/{rounds}")
        for fn, spent in zip(fns, times, strict=True):
            spent.append(seconds(fn, device, SUSTAINED_S))
    return [statistics.median(spent) for spent in times]


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats, SUSTAINED_S)


def read_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a streaming reduction over a buffer far larger than any cache."""
    x = torch.ones(nbytes // 4, device=device)
    return nbytes / timed(lambda: x.sum(), device, repeats, SUSTAINED_S)


FULL_SHARE = 0.85  # a sustained share above this is noise on a free device, not a quota
REST_S = 0.3  # idle long enough for a quota to refill (CFS: its budget returns every 100 ms period)


STREAMED_BYTES = 64 << 20  # a unit of work read from memory: a few ms, a decode step's kind


def decode_rate(seconds: float, rows: int, nbytes: int = STREAMED_BYTES) -> float:
    """Units per second over `seconds` (whole CFS periods: a quota slows it as it slows a stage kept
    busy) of decode work: `rows` hidden states through `nbytes` of fp32 weights."""
    side = math.isqrt(nbytes // 4)
    weight, x = torch.ones(side, side), torch.ones(rows, side)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.nn.functional.linear(x, weight)
        done += 1
    return done / (time.perf_counter() - start)


def burst_and_share(device: torch.device, repeats: int = 5,
                    nbytes: int = STREAMED_BYTES) -> tuple[float, float | None]:
    """(sustained share, burst seconds): how much of its speed from idle the device keeps up when
    busy all the time, and how long that speed lasts. After each rest a unit of work (a streaming
    read of a few ms) runs back to back for a few periods, each unit timed: the units before the
    first stall are the burst (a CFS quota's budget per period), their median its speed; the whole
    periods after it, the sustained speed. Each rest's share pairs its own burst and sustained
    speed, so a host busy at one moment slows both (the share is the burst speed's divisor: its
    error is every burst figure's). (1.0, None) where the device keeps its speed: a free CPU, a GPU."""
    if device.type != "cpu":
        return 1.0, None
    x = torch.ones(nbytes // 4, device=device)
    shares, bursts = [], []
    for _ in range(repeats):
        time.sleep(REST_S)
        spans = []
        while sum(spans) < REST_S:
            spans.append(seconds(lambda: x.sum(), device))
        stalled = stalls(spans)
        if len(stalled) < 2:  # (no quota met: no stall, or no whole period after one)
            shares.append(1.0)
            continue
        first = stalled[0]
        if first == 0:  # (the rest did not refill the budget: no burst to time)
            continue
        shares.append(float(statistics.median(spans[:first])) / whole_periods(spans, stalled))
        bursts.append(sum(spans[:first]) + statistics.median(spans) / 2)  # (and half the unit it stalled in)
    share = min(1.0, statistics.median(shares or [1.0]))
    if share > FULL_SHARE or not bursts:
        return 1.0, None
    return share, statistics.median(bursts)


MATMUL_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
FORMAT_ROWS = (1, 2, 4, 8, 16, 24, 32)
MEASURED_FORMATS = ("int4",)  # the quantised format users run (int8 is estimated with the float curve)
CACHE_BUSTING_BYTES = 256 << 20


def engine_matmuls(spec: ModelSpec, raw: DeviceSpec, device: torch.device, dtype: str, rounds: int = 5,
                   progress: Progress = lambda _: None, quick: bool = False) -> DeviceSpec:
    """The engine's matmuls on one layer's weight shapes at each row count: raw's roofline raised
    to the best rates they reach (a streaming product can read faster than a reduction, a model's
    GEMM run faster than a square one), and their efficiency by rows against it (median times,
    as the engine's steps are timed); then the same products with the weights in each quantised
    format of MEASURED_FORMATS (their blocks are read with less bandwidth, but unpacked at a
    cost), each format's efficiency against the same roofline, at FORMAT_ROWS (decode and
    verification steps; past them a format's products run as float GEMMs). quick: every other
    row count."""
    step = 2 if quick else 1
    rows, flops, nbytes, times = _product_times(spec, device, dtype, None, MATMUL_ROWS[::step], rounds, progress)
    peak = max(raw.flops[raw.default_dtype], *(f / t for f, t in zip(flops, times, strict=True)))
    bandwidth = max(raw.bandwidth, *(b / t for b, t in zip(nbytes, times, strict=True)))

    def curve(rows: list[int], flops: list[float], nbytes: list[float], times: list[float]) -> list[list[float]]:
        return [[n, max(f / peak, b / bandwidth) / t] for n, f, b, t in zip(rows, flops, nbytes, times, strict=True)]

    formats = {name: curve(*_product_times(spec, device, dtype, BITS[name], FORMAT_ROWS[::step], rounds, progress))
               for name in MEASURED_FORMATS}
    return DeviceSpec(**{**raw.to_dict(), "flops": {**raw.flops, raw.default_dtype: peak}, "bandwidth": bandwidth,
                         "matmul_efficiency": curve(rows, flops, nbytes, times), "format_matmul_efficiency": formats})


def _product_times(spec: ModelSpec, device: torch.device, dtype: str, bits: int | None, row_counts: tuple[int, ...],
                   rounds: int, progress: Progress) -> tuple[list[int], list[float], list[float], list[float]]:
    """At each row count, the FLOPs, bytes and median seconds of one layer's products, the
    weights float (bits None) or in blocks of `bits`."""
    from shardwise.engine.shard import DTYPES
    from shardwise.model.product import product

    h, i = spec.hidden_size, spec.intermediate_size
    shapes = [(spec.q_size + 2 * spec.kv_size, h), (h, spec.q_size), (2 * i, h), (h, i)]  # (out, in)
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    stored = dtype_bytes(f"int{bits}") if bits else itemsize
    # enough layers' weights that they stream from memory, as in a real step, not from cache
    copies = max(1, min(16, math.ceil(CACHE_BUSTING_BYTES / (sum(n * k for n, k in shapes) * stored))))
    shapes = shapes * copies

    def weight(n: int, k: int):
        w = torch.randn(n, k, device=device, dtype=DTYPES[dtype])
        return product(quantize(w, bits) if bits else w)  # (blocks on w's device)

    weights = [weight(n, k) for n, k in shapes]
    flops = [sum(2 * rows * n * k for n, k in shapes) for rows in row_counts]
    nbytes = [sum(n * k * stored + rows * (n + k) * itemsize for n, k in shapes) for rows in row_counts]
    products = []
    for rows in row_counts:
        inputs = [torch.randn(rows, k, device=device, dtype=DTYPES[dtype]) for _, k in shapes]
        products.append(lambda ins=inputs: [w(x) for x, w in zip(ins, weights, strict=True)])
    times = timed_in_rounds(products, device, rounds, progress, f"int{bits} matmuls" if bits else "matmuls")
    return list(row_counts), flops, nbytes, times


SUMS_A_BLOCK = 50


def time_all_reduces(group: Any, size: int, rounds: int, between: int = 0) -> float:
    """Seconds of an all-reduce of `size` floats in `group`, every device calling at once (after
    20 that warm the connections): the median of the means of blocks of SUMS_A_BLOCK (a mean,
    since a collective's rare slow wake-ups count in a step's time; the median of blocks, since a
    shared machine's busy moment can hold up every sum of one block: on the lab, the mean of one
    block of 50 read 0.12 to 0.61 ms from one minute to the next, the mean of 200 0.14-0.20 ms).
    between: floats each device reads before each sum, as a layer's work comes between a step's
    sums (devices that compute the same work finish it apart: a sum waits for the later, and a
    device wakes from its work, not from a poll)."""
    x, work = torch.zeros(size), torch.ones(between)
    times = []
    for i in range(rounds + 20):
        work.sum()
        started = time.perf_counter()
        group.all_reduce(x)
        if i >= 20:
            times.append(time.perf_counter() - started)
    return statistics.median(statistics.fmean(times[i:i + SUMS_A_BLOCK]) for i in range(0, len(times), SUMS_A_BLOCK))


def _all_reduces(rank: int, port: int, size: int, rounds: int, out: Any) -> None:
    """One of two processes timing all-reduces of `size` floats (the first reports them)."""
    from shardwise.engine.collective import TensorGroup

    torch.set_num_threads(1)
    group = TensorGroup(rank, 2, ("127.0.0.1", port), "127.0.0.1", torch.device("cpu"))
    seconds = time_all_reduces(group, size, rounds)
    if rank == 0:
        out.put(seconds)
    group.close()


def collective_seconds(hidden: int, rounds: int = 200) -> float:
    """The fixed cost of one collective between two processes on this CPU (a tensor-parallel
    layer runs two): the engine's all-reduce of one token's hidden state, the mean of `rounds`."""
    import torch.multiprocessing as mp

    from shardwise.engine.collective import open_store

    store, port = open_store("127.0.0.1")
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_all_reduces, args=(rank, port, hidden, rounds, out)) for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        return float(out.get(timeout=120))
    finally:
        for process in processes:
            process.join(timeout=30)
        del store


def memory_capacity(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def engine_steps(spec: ModelSpec, weights, device: torch.device, dtype: str | None, progress: Progress,
                 rounds: int = 5) -> list[dict[str, Any]]:
    """Real step times of the whole model and of its first half, for each work point."""
    whole = ShardModel(spec, weights=weights, device=device, dtype=dtype)
    samples, steps = [], []
    decodes = [(b, DECODE_CONTEXT) for b in DECODE_BATCHES] + [(b, LONG_CONTEXT) for b in LONG_CONTEXT_BATCHES]
    blocks = sum(b * -(-(c + 1) // BLOCK_SIZE) for b, c in decodes) + -(-max(PREFILL_TOKENS) // BLOCK_SIZE)
    for shard in (whole, whole.view(0, spec.num_layers // 2)):
        # every point's KV at once, allocated once: a pool grown by doubling copies itself (three
        # times its size for a moment), more than a small node's memory may hold
        shard.kv = KVCache(len(shard.blocks), spec.num_kv_heads, spec.head_dim, shard.dtype, device, blocks)
        for sample, step in _step_points(Worker(shard), len(shard.blocks), decodes):
            samples.append(sample)
            steps.append(step)
    spent = timed_in_rounds(steps, device, rounds, progress, "engine steps")
    return [sample | {"seconds": t} for sample, t in zip(samples, spent, strict=True)]


def _step_points(worker: Worker, layers: int,
                 decodes: list[tuple[int, int]]) -> list[tuple[dict[str, Any], Callable[[], Any]]]:
    """(work point, one step of it) for prefills of one prompt and decode steps of a batch at
    DECODE_CONTEXT (and LONG_CONTEXT) cached tokens (each step's token is rewound, so repeats
    keep the context). The decodes' context is only counted as cached, not prefilled: what a
    decode step costs depends on how many cached tokens it reads, not on their values, and
    prefilling thousands of tokens took a quick profile's longest stretch (minutes on a
    throttled node)."""
    points, ids = [], itertools.count()

    def prefill(tokens: int) -> None:
        seq = next(ids)
        worker.add(seq, SamplingParams(temperature=0))
        worker.step([seq], [[1] * tokens], [True])
        worker.free(seq)

    def decode(seqs: list[int], context: int) -> None:
        worker.step(seqs, [[1]] * len(seqs), [True] * len(seqs))
        for seq in seqs:
            worker.rewind(seq, context)

    for tokens in PREFILL_TOKENS:
        points.append(({"layers": layers, "batch": 1, "new": tokens, "context": 0},
                       lambda n=tokens: prefill(n)))
    for batch, context in decodes:
        seqs = [next(ids) for _ in range(batch)]
        for seq in seqs:
            worker.add(seq, SamplingParams(temperature=0))
            worker.shard.kv.reserve(seq, context)
            worker.shard.kv.advance(seq, context)
        points.append(({"layers": layers, "batch": batch, "new": 1, "context": context},
                       lambda s=seqs, c=context: decode(s, c)))
    return points


def _work(sample: dict[str, Any]) -> Work:
    return Work(((sample["new"], sample["context"]),) * sample["batch"])


def fit(spec: ModelSpec, raw: DeviceSpec, samples: list[dict[str, Any]], precision: Precision) -> DeviceSpec:
    """The efficiencies and overheads that best predict the measured steps, in least relative
    squares: a grid over compute, memory and attention efficiency; at each point, solved linearly
    (>= 0), how much slower than alone matmuls run inside a step (their measured curve, scaled),
    and the per-operator and per-step overheads."""
    grid = np.geomspace(0.05, 1.0, 24)
    ce, me, ae = (g.reshape(-1) for g in np.meshgrid(grid, grid, grid, indexing="ij"))
    measured = np.array([s["seconds"] for s in samples])
    roof = np.zeros((len(ce), len(samples)))  # operators other than matmuls, at each grid point
    matmuls, op_counts = np.zeros(len(samples)), np.zeros(len(samples))
    for j, s in enumerate(samples):
        for t in stage_operators(spec, Stage(raw, 0, s["layers"]), _work(s), precision):
            if t.op.kind == "collective":
                continue
            op_counts[j] += t.count
            if t.op.kind == "matmul":  # at its measured efficiency
                matmuls[j] += t.count * max(t.compute_s, t.memory_s)
            else:
                scale = ae if t.op.kind == "attention" else 1.0
                roof[:, j] += t.count * np.maximum(t.compute_s / (ce * scale), t.memory_s / (me * scale))
    a = np.stack([matmuls, op_counts, np.ones(len(samples))], 1) / measured[:, None]
    best = (float("inf"), 0, np.zeros(3))
    for i in range(len(ce)):
        solution, residual = nnls(a, 1 - roof[i] / measured)
        if residual < best[0]:
            best = (residual, i, solution)
    _, i, (slowdown, op_overhead, step_overhead) = best
    slowdown = max(slowdown, 1e-3)

    def inside_a_step(curve: list[list[float]]) -> list[list[float]]:
        return [[rows, float(efficiency / slowdown)] for rows, efficiency in curve]

    return DeviceSpec(**{**raw.to_dict(), "compute_efficiency": float(ce[i]), "memory_efficiency": float(me[i]),
                         "attention_efficiency": float(ae[i]), "op_overhead_s": float(op_overhead),
                         "step_overhead_s": float(step_overhead), "matmul_efficiency": inside_a_step(
                             raw.matmul_efficiency), "format_matmul_efficiency": {
                             name: inside_a_step(curve) for name, curve in raw.format_matmul_efficiency.items()}})


def per_layer(samples: list[dict[str, Any]], layers: int) -> list[dict[str, Any]]:
    """Per-layer seconds at each work point: (whole model - first half) / the layers in between.
    A point whose difference is not positive is left out: at a few tokens half a small model's
    layers take less time than the machine's noise, and a negative time per layer means nothing."""
    full = {(s["batch"], s["new"], s["context"]): s["seconds"] for s in samples if s["layers"] == layers}
    half = {(s["batch"], s["new"], s["context"]): s["seconds"] for s in samples if s["layers"] == layers // 2}
    between = layers - layers // 2
    return [{"batch": b, "new": n, "context": c, "seconds": (full[k] - half[k]) / between}
            for k in full for b, n, c in [k] if k in half and full[k] > half[k]]


def profile_device(model: str, device: str = "cpu", dtype: str | None = None, name: str | None = None,
                   progress: Progress = lambda _: None, quick: bool = False) -> DeviceSpec:
    """Measure this machine's device: roofline, engine steps for `model`, the fit, and how much
    of its speed it keeps up when busy (a CPU quota: DeviceSpec.sustained_share).
    quick: one round of every measurement instead of five, and half the matmul row counts
    (faster, noisier)."""
    from shardwise.engine.shard import DTYPES, default_dtype
    from shardwise.model.registry import resolve
    from shardwise.model.weights import open_weights

    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    short = canonical_dtype(dtype)
    progress("matmul FLOP/s")
    repeats = 2 if quick else 5
    flops = {short: matmul_flops(dev, DTYPES[dtype], repeats=repeats)}
    if dtype != "float32":
        flops["fp32"] = matmul_flops(dev, torch.float32, repeats=repeats)
    progress("memory bandwidth")
    bandwidth = read_bandwidth(dev, repeats=repeats)
    label = name or (torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.node() or "this-machine")
    raw = DeviceSpec(name=label, kind="gpu" if dev.type == "cuda" else "cpu", memory_bytes=memory_capacity(dev),
                     bandwidth=bandwidth, flops=flops, default_dtype=short,
                     source=f"shardwise profile, {platform.machine()}, torch {torch.__version__}, "
                            f"{torch.get_num_threads()} threads")
    weights = open_weights(resolve(model))
    spec = weights.spec
    rounds = 1 if quick else 5
    raw = engine_matmuls(spec, raw, dev, dtype, rounds, progress, quick)
    samples = engine_steps(spec, weights, dev, dtype, progress, rounds)
    progress("fitting efficiencies and overheads")
    precision = Precision(short, short, short)
    progress("burst and sustained speed")
    share, burst = burst_and_share(dev)  # (five rests, quick or not: the share divides every figure)
    # every figure above was measured sustained; the device's own are its speed in bursts
    fitted = replace(fit(spec, raw, samples, precision).slower(share), sustained_share=share, burst_s=burst)
    if dev.type == "cpu":  # (GPUs: NCCL's launch, the default; two processes on one GPU tell nothing)
        progress("collectives between processes")
        fitted = replace(fitted, collective_s=collective_seconds(spec.hidden_size))
    fitted.measured.update({"model": model, "steps": samples, "per_layer": per_layer(samples, spec.num_layers)})
    _keep(fitted, dev)
    return fitted


def _keep(spec: DeviceSpec, dev: torch.device) -> None:
    """The machine's last profile of each device stays on it (what `cluster status` shows)."""
    kept = cache_dir() / "profiles" / f"{str(dev).replace(':', '')}.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(spec.to_dict()))


def link_from_hand_overs(sizes: list[tuple[int, float]], name: str) -> LinkSpec:
    """A link from the times of handing messages of three sizes over as a pipeline does, through
    its driver (bytes, seconds, smallest first; Probe.hand_overs): half of the smallest one's the
    latency, its bytes in it (a decode step's hidden state: on a slow link its framing costs more
    than its bytes); the size differences give the bandwidth up to a micro-batch's decode step
    and beyond it (a prefill chunk's). A hand-over's time holds the driver's round trip to each
    of the two nodes; a pipeline's step pays one to each stage's node, which its links and the
    return to the driver, at half a hand-over each, add up to."""
    small, step, large = sizes
    return LinkSpec(name, _rate_between(step, large), small[1] / 2, source="shardwise profile",
                    latency_bytes=small[0], step_bytes=step[0], step_bandwidth=_rate_between(small, step))


def _rate_between(smaller: tuple[int, float], larger: tuple[int, float]) -> float:
    """Bytes/s of the difference between two timed messages (bytes, seconds); huge where the larger
    took no longer (no cost within noise)."""
    return (larger[0] - smaller[0]) / max(larger[1] - smaller[1], 1e-9)


def collective_on_link(small: tuple[int, float], large: tuple[int, float], amid_work: float) -> dict[str, float]:
    """A link's all-reduce figures (as LinkSpec holds them) from the times of a small and a large
    one back to back (bytes each device sends, seconds), whose size difference gives the
    bandwidth, and of the small one amid work (time_all_reduces' `between`, as a step's sums
    come), whose remainder is the fixed time."""
    bandwidth = _rate_between(small, large)
    return {"collective_s": max(amid_work - small[0] / bandwidth, 1e-7), "collective_bandwidth": bandwidth}
