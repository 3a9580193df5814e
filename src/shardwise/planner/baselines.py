"""How others split a model, evaluated by the same cost model as the DP.

even (vLLM's pipeline parallelism), memory-proportional (exo, llama.cpp RPC),
FLOPS-proportional (Cake), and greedy fastest-first (fill the fastest device's
memory, then the next). Each uses every device (greedy: as many as it needs),
in the cluster's order with the source first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shardwise.perf.estimate import shared_host_busy
from shardwise.perf.hardware import from_idle
from shardwise.planner.partition import CostTable

Stages = list[tuple[int, int, int]]


def evaluate(table: CostTable, stages: Stages, objective: str) -> float | None:
    """The plan's seconds per step under the table's costs (as the DP counts them); None if a stage
    does not fit. Latency: one stream's stages from idle and the hand-overs, or the busiest node;
    throughput: a micro-batch in flight per node, each a share of the batch (partition's docstring)."""
    if any(table.memory[a:b].sum() > table.capacity[d] * (1 + 1e-12) for d, a, b in stages):
        return None
    hosts = [int(table.hosts[d]) for d, _, _ in stages]
    in_flight = table.in_flight(len(set(hosts))) if objective == "throughput" else 0
    table = table.micro(max(in_flight, 1))
    compute = [float(table.compute[d, a:b].sum()) for d, a, b in stages]
    moves = [float(table.transfer[u, v]) for (u, _, _), (v, _, _) in zip(stages, stages[1:], strict=False)]
    if table.return_to_source:
        moves.append(float(table.transfer[stages[-1][0], table.source]))
    busy = [table.busy(d, c) for c, (d, _, _) in zip(compute, stages, strict=True)]
    if in_flight > 1:  # (hosts of one machine compute at once)
        busy = [b / c for b, c in zip(busy, table.crowding(stages), strict=True)]
    walls = [float(from_idle(c, table.burst[d], table.share[d])) for c, (d, _, _) in zip(compute, stages, strict=True)]
    return max(sum(walls) + sum(moves), *(max(in_flight, 1) * b for b in shared_host_busy(busy, hosts)),
               *(in_flight * m for m in moves))


def _order(table: CostTable) -> list[int]:
    rest = [d for d in range(table.devices) if d != table.source]
    return rest if table.source is None else [table.source, *rest]


def proportional(table: CostTable, weights: Sequence[float]) -> Stages:
    """Contiguous ranges sized in proportion to weights (largest remainders; each device >= 1 layer,
    the smallest-weight devices dropped when there are more devices than layers)."""
    order = _order(table)
    order = sorted(order, key=lambda d: -weights[d])[: table.layers]
    order = [d for d in _order(table) if d in order]
    w = np.array([weights[d] for d in order], dtype=float)
    w = w / w.sum() if w.sum() > 0 else np.full(len(order), 1 / len(order))
    spare = table.layers - len(order)
    share = w * spare
    counts = np.floor(share).astype(int) + 1
    for i in np.argsort(-(share - np.floor(share)))[: table.layers - counts.sum()]:
        counts[i] += 1
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [(d, int(a), int(b)) for d, a, b in zip(order, bounds, bounds[1:], strict=False)]


def even(table: CostTable) -> Stages:
    return proportional(table, [1.0] * table.devices)


def memory_proportional(table: CostTable) -> Stages:
    return proportional(table, list(table.capacity))


def flops_proportional(table: CostTable, flops: Sequence[float]) -> Stages:
    return proportional(table, flops)


def greedy_fastest(table: CostTable) -> Stages:
    """Fastest device first (least compute for the whole model), as many layers as fit, then the next."""
    order = sorted(range(table.devices), key=lambda d: table.compute[d].sum())
    if table.source is not None:
        order = [table.source] + [d for d in order if d != table.source]
    stages, start = [], 0
    for d in order:
        end = start
        while end < table.layers and table.memory[start:end + 1].sum() <= table.capacity[d]:
            end += 1
        if end > start:
            stages.append((d, start, end))
            start = end
        if start == table.layers:
            break
    if start < table.layers:  # out of memory: the rest on the last device, reported as not fitting
        d, a, _ = stages[-1] if stages else (order[0], 0, 0)
        stages[-1:] = [(d, a, table.layers)]
    return stages
