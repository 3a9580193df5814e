"""Measure one device into a DeviceSpec (cluster_profile.py does every Ray node and link).

Three kinds of figures: the raw roofline (matmul FLOP/s at the dtypes the engine
uses, streaming-read bandwidth), the engine's matmul efficiency by row count, and
the engine's real step times for a model (whole model and half of it, prefill and
decode, so per-layer costs follow). The step times then fit the efficiencies and
fixed overheads that turn the raw roofline into the engine's own.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from shardwise.engine.sampling import SamplingParams
from shardwise.engine.shard import ShardModel, resolve_device
from shardwise.engine.worker import Worker
from shardwise.model.spec import ModelSpec
from shardwise.perf.estimate import Stage, stage_operators
from shardwise.perf.hardware import DeviceSpec, LinkSpec, canonical_dtype
from shardwise.perf.operators import Precision, Work

# The engine work profile measures: prefill of one prompt, and decode steps at a cached context,
# spread over the range users run (and apart from the points benchmarks check it on).
PREFILL_TOKENS = (24, 96, 384)
DECODE_BATCHES = (2, 6, 24)
DECODE_CONTEXT = 64
Progress = Callable[[str], None]


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, best: bool = False) -> float:
    """Median (or, with best=True, fastest) seconds of fn over repeats, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats)


def read_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a streaming reduction over a buffer far larger than any cache."""
    x = torch.ones(nbytes // 4, device=device)
    return nbytes / timed(lambda: x.sum(), device, repeats)


MATMUL_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CACHE_BUSTING_BYTES = 256 << 20


def matmul_efficiency(spec: ModelSpec, raw: DeviceSpec, device: torch.device, dtype: str,
                      repeats: int = 7) -> list[list[float]]:
    """For each row count, the share of the roofline that the engine's matmuls reach on one
    layer's weight shapes (ideal roofline time / measured time). The fastest of several runs:
    on a shared machine noise only ever slows a run down, and one slow point would bend the
    whole curve the estimator interpolates."""
    from shardwise.engine.shard import DTYPES
    from shardwise.model.layers import linear

    h, i = spec.hidden_size, spec.intermediate_size
    shapes = [(spec.q_size + 2 * spec.kv_size, h), (h, spec.q_size), (2 * i, h), (h, i)]  # (out, in)
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    # enough layers' weights that they stream from memory, as in a real step, not from cache
    copies = max(1, min(16, math.ceil(CACHE_BUSTING_BYTES / (sum(n * k for n, k in shapes) * itemsize))))
    shapes = shapes * copies
    weights = [torch.randn(n, k, device=device, dtype=DTYPES[dtype]) for n, k in shapes]
    curve = []
    for rows in MATMUL_ROWS:
        inputs = [torch.randn(rows, k, device=device, dtype=DTYPES[dtype]) for _, k in shapes]
        seconds = timed(lambda ins=inputs: [linear(x, w) for x, w in zip(ins, weights, strict=True)],
                         device, repeats, best=True)
        ideal = sum(max(2 * rows * n * k / raw.flops[raw.default_dtype],
                        (n * k + rows * (n + k)) * itemsize / raw.bandwidth) for n, k in shapes)
        curve.append([rows, min(1.0, ideal / seconds)])
    return curve


def memory_capacity(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def engine_steps(spec: ModelSpec, weights, device: torch.device, dtype: str | None,
                 progress: Progress, repeats: int = 3) -> list[dict[str, Any]]:
    """Real step times of the whole model and of its first half, for each work point."""
    samples = []
    for layers in (spec.num_layers, spec.num_layers // 2):
        worker = Worker(ShardModel(spec, (0, layers), weights=weights, device=device, dtype=dtype))
        samples += _worker_steps(worker, layers, device, progress, repeats)
    return samples


def _worker_steps(worker: Worker, layers: int, device: torch.device, progress: Progress,
                  repeats: int) -> list[dict[str, Any]]:
    samples, ids = [], itertools.count()

    def prefill(tokens: int) -> None:
        seq = next(ids)
        worker.add(seq, SamplingParams(temperature=0))
        worker.step([seq], [[1] * tokens], [True])
        worker.free(seq)

    for tokens in PREFILL_TOKENS:
        progress(f"prefill {tokens} tokens, {layers} layers")
        samples.append({"layers": layers, "batch": 1, "new": tokens, "context": 0,
                        "seconds": timed(lambda n=tokens: prefill(n), device, repeats)})
    for batch in DECODE_BATCHES:
        progress(f"decode batch {batch}, {layers} layers")
        seqs = [next(ids) for _ in range(batch)]
        for seq in seqs:
            worker.add(seq, SamplingParams(temperature=0))
        worker.step(seqs, [[1] * DECODE_CONTEXT] * batch, [True] * batch)
        samples.append({"layers": layers, "batch": batch, "new": 1, "context": DECODE_CONTEXT,
                        "seconds": timed(lambda s=seqs: worker.step(s, [[1]] * len(s), [True] * len(s)),
                                          device, 2 * repeats)})
        for seq in seqs:
            worker.free(seq)
    return samples


def _work(sample: dict[str, Any]) -> Work:
    return Work(((sample["new"], sample["context"]),) * sample["batch"])


def fit(spec: ModelSpec, raw: DeviceSpec, samples: list[dict[str, Any]], precision: Precision) -> DeviceSpec:
    """The efficiencies and overheads that best predict the measured steps, in least relative
    squares: a grid over compute, memory and attention efficiency (matmuls follow their measured
    curve), and at each point the per-operator and per-step overheads solved linearly (>= 0)."""
    grid = np.geomspace(0.05, 1.0, 24)
    ce, me, ae = (g.reshape(-1) for g in np.meshgrid(grid, grid, grid, indexing="ij"))
    measured = np.array([s["seconds"] for s in samples])
    roof = np.zeros((len(ce), len(samples)))
    op_counts = np.zeros(len(samples))
    for j, s in enumerate(samples):
        for t in stage_operators(spec, Stage(raw, 0, s["layers"]), _work(s), precision):
            if t.op.kind == "collective":
                continue
            op_counts[j] += t.count
            if t.op.kind == "matmul":  # already at its measured efficiency
                roof[:, j] += t.count * max(t.compute_s, t.memory_s)
            else:
                scale = ae if t.op.kind == "attention" else 1.0
                roof[:, j] += t.count * np.maximum(t.compute_s / (ce * scale), t.memory_s / (me * scale))
    a = np.stack([op_counts / measured, 1 / measured], 1)
    best = (float("inf"), 0, np.zeros(2))
    for i in range(len(ce)):
        overhead = _nonnegative_lstsq(a, 1 - roof[i] / measured)
        err = float(((a @ overhead + roof[i] / measured - 1) ** 2).sum())
        if err < best[0]:
            best = (err, i, overhead)
    _, i, (op_overhead, step_overhead) = best
    return DeviceSpec(**{**raw.to_dict(), "compute_efficiency": float(ce[i]), "memory_efficiency": float(me[i]),
                         "attention_efficiency": float(ae[i]), "op_overhead_s": float(op_overhead),
                         "step_overhead_s": float(step_overhead)})


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a x - b| over x >= 0, for two unknowns: the free solution, or the best with one at zero."""
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    if (x >= 0).all():
        return x
    candidates = [np.zeros(2)] + [np.eye(2)[k] * max(0.0, float(a[:, k] @ b / (a[:, k] @ a[:, k]))) for k in range(2)]
    return min(candidates, key=lambda c: float(((a @ c - b) ** 2).sum()))


def per_layer(samples: list[dict[str, Any]], layers: int) -> list[dict[str, Any]]:
    """Per-layer seconds at each work point: (whole model - first half) / the layers in between."""
    full = {(s["batch"], s["new"], s["context"]): s["seconds"] for s in samples if s["layers"] == layers}
    half = {(s["batch"], s["new"], s["context"]): s["seconds"] for s in samples if s["layers"] == layers // 2}
    between = layers - layers // 2
    return [{"batch": b, "new": n, "context": c, "seconds": (full[k] - half[k]) / between}
            for k in full for b, n, c in [k] if k in half]


def profile_device(model: str, device: str = "cpu", dtype: str | None = None, name: str | None = None,
                   progress: Progress = lambda _: None, quick: bool = False) -> DeviceSpec:
    """Measure this machine's device: roofline, engine steps for `model`, and the fit.
    quick: each point timed about a third as often (~3x faster, noisier)."""
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
    progress("matmul efficiency by rows")
    raw = DeviceSpec(**{**raw.to_dict(), "matmul_efficiency": matmul_efficiency(spec, raw, dev, dtype,
                                                                          repeats=3 if quick else 7)})
    samples = engine_steps(spec, weights, dev, dtype, progress, repeats=1 if quick else 3)
    progress("fitting efficiencies and overheads")
    precision = Precision(short, short, short)
    fitted = fit(spec, raw, samples, precision)
    fitted.measured.update({"model": model, "steps": samples, "per_layer": per_layer(samples, spec.num_layers)})
    return fitted


def link_from_round_trips(small: tuple[int, float], large: tuple[int, float], name: str) -> LinkSpec:
    """A link from the round-trip times of a small and a large message (bytes, seconds), each
    answered with a tiny acknowledgement: the size difference gives the bandwidth, and half
    of the small round trip the per-message latency."""
    bandwidth = (large[0] - small[0]) / max(large[1] - small[1], 1e-9)
    return LinkSpec(name, bandwidth, small[1] / 2, source="shardwise profile")
