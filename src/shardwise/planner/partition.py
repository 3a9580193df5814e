"""Choose devices and contiguous layer ranges by dynamic programming.

The core works on plain numbers (a CostTable), so it can be checked against
exhaustive search independently of the estimator.

State: which devices are used so far (as a count per group of identical devices,
so a subset when every device differs), the device of the last stage, and how many
layers are covered. A transition appends one stage: an unused device v running
layers [l, b), allowed only if those layers' memory fits v. Keeping the used set
in the state is what makes the memory check exact: every device runs at most one
range, so each device's capacity is checked once, against exactly its layers.

Latency  = sum of stage compute + transfers between stages (+ the return to the source), or
the busiest stage's sustained time where a device keeps up only a share of its burst speed
(a CPU quota), whichever is larger: a threshold search on the latter around the additive DP.
Throughput: a plan of k stages (each on a node of its own) splits a step's batch into
m = min(k, rows) micro-batches in flight, and takes the larger of one micro-batch's way round
(its stages' walls and hand-overs, at its rows) and m times the busiest stage (sustained, and
crowded: hosts that share a machine compute at once, at the share of their speed they keep
then) or hand-over: the same threshold search, for each k.
Devices that share a host (CPU devices of one node) hold at most one stage between them.
With a gain above 1, the plan of fewest stages within that factor of the best wins.

Complexity: O(prod(n_g + 1) * G^2 * L * W) time for G groups of n_g identical devices,
L layers and W the most layers any device can hold (W <= L; O(2^D * D^2 * L * W) for D
distinct devices), vectorised over the used-set states of one size at a time; memory
O(prod(n_g + 1) * G * L).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from shardwise.errors import ShardwiseError
from shardwise.perf.hardware import from_idle

Objective = Literal["latency", "throughput"]
CHUNK = 256  # states per vectorised block: bounds the [states, L, L] temporaries


@dataclass
class CostTable:
    compute: Sequence[Sequence[float]]  # seconds, compute[d][l] for device d, layer l
    memory: Sequence[float]  # bytes each layer needs (weights + KV budget)
    capacity: Sequence[float]  # bytes available on each device
    transfer: Sequence[Sequence[float]]  # seconds to hand hidden states from device u to v
    source: int | None = None  # the first stage runs on this device
    return_to_source: bool = False  # the sampled token travels back to the source
    hosts: Sequence[int] | None = None  # devices with one host number share compute (CPUs of one node)
    # per device: the share of its speed it keeps up when busy (compute is at burst speed), and how
    # long a burst from idle lasts (None: every device 1.0 and unlimited; see DeviceSpec)
    share: Sequence[float] | None = None
    burst: Sequence[float] | None = None
    task: Sequence[float] | None = None  # per device: CPU seconds a stage's call costs its node per step
    # per device: its machine (devices of one machine on different hosts compute on its cores at once
    # when micro-batches are in flight) and the share of its speed it keeps then (None: a machine each)
    machines: Sequence[int] | None = None
    crowded: Sequence[float] | None = None
    # the sequences a step decodes (None: as many as there are stages), which a plan of k stages splits
    # into min(k, rows) micro-batches in flight, and the table for one of m (None: its work divides evenly)
    rows: int | None = None
    split: Callable[[int], CostTable] | None = None

    def __post_init__(self) -> None:
        self.compute = np.asarray(self.compute, dtype=float)
        self.memory = np.asarray(self.memory, dtype=float)
        self.capacity = np.asarray(self.capacity, dtype=float)
        self.transfer = np.asarray(self.transfer, dtype=float)
        if self.compute.ndim != 2 or 0 in self.compute.shape:
            raise ShardwiseError("compute must be a devices x layers table with at least one of each")
        devices, layers = self.compute.shape
        if self.memory.shape != (layers,):
            raise ShardwiseError(f"memory needs one entry per layer ({layers}), got {self.memory.shape[0]}")
        if self.capacity.shape != (devices,):
            raise ShardwiseError(f"capacity needs one entry per device ({devices}), got {self.capacity.shape[0]}")
        if self.transfer.shape != (devices, devices):
            raise ShardwiseError(f"transfer must be {devices} x {devices} (device to device)")
        for name, table in (("compute", self.compute), ("memory", self.memory), ("capacity", self.capacity),
                            ("transfer", self.transfer)):
            if np.isnan(table).any() or (table < 0).any():
                raise ShardwiseError(f"{name} must hold non-negative numbers")
        if self.source is not None and not 0 <= self.source < devices:
            raise ShardwiseError(f"source {self.source} is not a device index (0..{devices - 1})")
        if self.return_to_source and self.source is None:
            raise ShardwiseError("return_to_source needs a source device")
        self.hosts = np.arange(devices) if self.hosts is None else np.asarray(self.hosts, dtype=int)
        if self.hosts.shape != (devices,):
            raise ShardwiseError(f"hosts needs one entry per device ({devices})")
        self.share = np.ones(devices) if self.share is None else np.asarray(self.share, dtype=float)
        self.burst = np.full(devices, np.inf) if self.burst is None else np.asarray(self.burst, dtype=float)
        if self.share.shape != (devices,) or not ((self.share > 0) & (self.share <= 1)).all():
            raise ShardwiseError(f"share needs one entry in (0, 1] per device ({devices})")
        if self.burst.shape != (devices,) or (np.isnan(self.burst) | (self.burst <= 0)).any():
            raise ShardwiseError(f"burst needs one positive entry per device ({devices})")
        self.task = np.zeros(devices) if self.task is None else np.asarray(self.task, dtype=float)
        if self.task.shape != (devices,) or (np.isnan(self.task) | (self.task < 0)).any():
            raise ShardwiseError(f"task needs one non-negative entry per device ({devices})")
        self.machines = np.arange(devices) if self.machines is None else np.asarray(self.machines, dtype=int)
        self.crowded = np.ones(devices) if self.crowded is None else np.asarray(self.crowded, dtype=float)
        if self.machines.shape != (devices,):
            raise ShardwiseError(f"machines needs one entry per device ({devices})")
        if self.crowded.shape != (devices,) or not ((self.crowded > 0) & (self.crowded <= 1)).all():
            raise ShardwiseError(f"crowded needs one entry in (0, 1] per device ({devices})")

    def busy(self, device: int, seconds):
        """A stage's seconds per step on its device when busy all the time: its work (`seconds` at
        burst speed) and its call's own CPU, at the share of its speed the device keeps up."""
        return (seconds + self.task[device]) / self.share[device]

    def crowding(self, stages: Sequence[tuple[int, int, int]]) -> list[float]:
        """Per stage of a plan with micro-batches in flight, the share of its speed its device keeps:
        crowded where another of the plan's hosts computes on its machine."""
        def mates(d: int) -> bool:
            return any(self.machines[e] == self.machines[d] and self.hosts[e] != self.hosts[d] for e, _, _ in stages)
        return [float(self.crowded[d]) if mates(d) else 1.0 for d, _, _ in stages]

    def in_flight(self, stages: int) -> int:
        """Micro-batches in flight on a plan of that many stages (on nodes of their own)."""
        return stages if self.rows is None else min(stages, self.rows)

    def micro(self, m: int) -> CostTable:
        """This table for one of `m` micro-batches a step's batch is split into (m = 1: itself)."""
        if m == 1:
            return self
        return self.split(m) if self.split else replace(self, compute=self.compute / m, split=None)

    @property
    def devices(self) -> int:
        return self.compute.shape[0]

    @property
    def layers(self) -> int:
        return self.compute.shape[1]


@dataclass(frozen=True)
class PlanResult:
    value: float  # seconds per step of the batch: one token's latency, or the cycle of the micro-batches in flight
    stages: list[tuple[int, int, int]]  # (device, start, end): half-open layer ranges in pipeline order
    objective: str
    declined: PlanResult | None = None  # the best plan, where it had more stages and did not pay the gain


# What the planner asks of each further stage: a predicted gain above the estimator's error on real
# clusters (a smaller one may not be there when run), since a stage adds a hand-over and a node to lose
STAGE_GAIN = 1.1


def groups_of_identical(table: CostTable) -> list[list[int]]:
    """Devices interchangeable in every respect (compute, capacity, links to others and to each
    other) form a group; the source always stands alone."""
    groups: list[list[int]] = []
    for d in range(table.devices):
        for group in groups:
            if d != table.source and group[0] != table.source and _same(table, group[0], d):
                group.append(d)
                break
        else:
            groups.append([d])
    return groups


def _same(t: CostTable, u: int, v: int) -> bool:
    others = [w for w in range(t.devices) if w not in (u, v)]
    shared = (t.hosts == t.hosts[u]).sum() > 1 or (t.hosts == t.hosts[v]).sum() > 1
    return bool(np.array_equal(t.compute[u], t.compute[v]) and t.capacity[u] == t.capacity[v]
                and t.share[u] == t.share[v] and t.burst[u] == t.burst[v] and t.task[u] == t.task[v]
                and t.crowded[u] == t.crowded[v]
                and ((t.machines == t.machines[u]).sum() == 1 and (t.machines == t.machines[v]).sum() == 1
                     or t.machines[u] == t.machines[v])
                and (t.hosts[u] == t.hosts[v] or not shared)
                and np.array_equal(t.transfer[u, others], t.transfer[v, others])
                and np.array_equal(t.transfer[others, u], t.transfer[others, v])
                and t.transfer[u, v] == t.transfer[v, u])


def solve(table: CostTable, objective: Objective = "latency", gain: float = 1.0) -> PlanResult:
    """The best plan; with gain > 1, the plan of fewest stages within `gain` of the best (a split
    that is predicted to pay less than that pays within the estimator's error, and each stage
    adds a hand-over and a node to lose)."""
    if objective not in ("latency", "throughput"):
        raise ShardwiseError(f"unknown objective '{objective}': use latency or throughput")
    if objective == "throughput":
        return _most_tokens(table, gain)
    best = _solve(table, objective, table.devices)
    plans = {len(best.stages): best}

    def within(most: int) -> bool:  # (the best plan of at most `most` stages only improves with more)
        try:
            plans[most] = plans.get(most) or _solve(table, objective, most)
        except ShardwiseError:  # (no plan of so few stages fits)
            return False
        return plans[most].value <= best.value * gain

    lo, hi = 1, len(best.stages)  # the fewest stages within the gain: a binary search
    while gain > 1 and lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if within(mid) else (mid + 1, hi)
    return best if hi == len(best.stages) else replace(plans[hi], declined=best)


def _solve(table: CostTable, objective: Objective, most: int) -> PlanResult:
    """The best plan of at most `most` stages, for one stream's latency."""
    groups = groups_of_identical(table)
    wall, busy = _walls(table, groups)
    return _result(table, groups, *_least_max(table, groups, wall, busy, most), objective)


def _result(table: CostTable, groups: list[list[int]], value: float, stages: list[tuple[int, int, int]],
            objective: Objective) -> PlanResult:
    """The plan with each group's stages on its own devices."""
    if not np.isfinite(value):
        raise ShardwiseError(_infeasible(table))
    free = [list(g) for g in groups]
    return PlanResult(float(value), [(free[g].pop(0), a, b) for g, a, b in stages], objective)


def _most_tokens(table: CostTable, gain: float) -> PlanResult:
    """Throughput: the best number k of stages (and of micro-batches in flight), and with a gain
    the fewest within it. The best is sought the most promising k first (by a lower bound), and a
    k whose bound is above the best found is not searched; then the fewest stages within the
    gain, from one up, the same way."""
    groups = groups_of_identical(table)
    counts = range(1, min(table.layers, len(set(table.hosts.tolist()))) + 1)
    bounds = {k: _in_flight_bound(table, groups, k) for k in counts}
    found = {}

    def search(k: int, above: float) -> None:  # k's best plan, unless it is above `above`
        if bounds[k] <= above and k not in found:
            plan = _in_flight(table, groups, k, bounds[k], cap=above)
            if np.isfinite(plan[0]):
                found[k] = plan
            else:  # (none of k stages within `above`: that is a bound on them)
                bounds[k] = above

    def best() -> float:
        return min((value for value, _ in found.values()), default=np.inf)

    for k in sorted(counts, key=bounds.get):
        search(k, np.nextafter(best(), 0))
    if not found:
        raise ShardwiseError(_infeasible(table))
    value = best()
    for k in counts:
        search(k, value * gain)
        if k in found and found[k][0] <= value * gain:
            break
    fewest, most = found[k], min(found.values(), key=lambda plan: plan[0])
    result = _result(table, groups, *fewest, "throughput")
    return result if fewest[0] == most[0] else replace(result, declined=_result(table, groups, *most, "throughput"))


def _walls(table: CostTable, groups: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """[group, l, b]: layers [l, b) there as a step from idle (burst speed while the burst lasts),
    and when busy all the time (sustained)."""
    first = [g[0] for g in groups]
    burst = np.stack([_stage_costs(table, d) for d in first])
    wall = from_idle(burst, table.burst[first][:, None, None], table.share[first][:, None, None])
    return wall, np.stack([table.busy(d, costs) for d, costs in zip(first, burst, strict=True)])


def _in_flight(table: CostTable, groups: list[list[int]], k: int, floor: float = 0.0,
               cap: float = np.inf) -> tuple[float, list[tuple[int, int, int]]]:
    """The least cycle of plans of exactly k stages with m = min(k, rows) micro-batches in flight:
    one micro-batch's way round, or m times the busiest stage or hand-over. With several in
    flight, stages on hosts of one machine compute at once, crowded (as if they all were: exact
    where every machine holds one host, or every host shares one machine). inf: none within cap."""
    m, micro, wall, busy = _in_flight_costs(table, groups, k)
    return _least_max(micro, groups, wall, busy, k, in_flight=m, exactly=True, floor=floor, cap=cap)


def _in_flight_costs(table: CostTable, groups: list[list[int]],
                     k: int) -> tuple[int, CostTable, np.ndarray, np.ndarray]:
    """For plans of k stages: the micro-batches in flight m, the table of one, and [group, l, b]
    its walls and m times its busy times (crowded where several are in flight)."""
    m = table.in_flight(k)
    micro = table.micro(m)
    wall, busy = _walls(micro, groups)
    if m > 1:
        busy = busy / micro.crowded[[g[0] for g in groups]][:, None, None]
    return m, micro, wall, m * busy


def _in_flight_bound(table: CostTable, groups: list[list[int]], k: int) -> float:
    """A lower bound on _in_flight's cycle: the least way round, and the least m times the busiest
    stage or hand-over, each over plans of k stages on which a device may hold any number of
    them (_relaxed: no used set, so no DP over the sets of devices)."""
    m, micro, wall, busy = _in_flight_costs(table, groups, k)
    round_trip = _relaxed(micro, groups, wall, np.add, k)
    busiest = _relaxed(replace(micro, transfer=micro.transfer * m), groups, busy, np.maximum, k)
    return max(round_trip, busiest)


def _relaxed(table: CostTable, groups: list[list[int]], stage: np.ndarray, combine, k: int) -> float:
    """A lower bound on _dp(..., k, exactly=True): the least combined cost of exactly k stages,
    where a group may hold any number of them. stage[g, l, b] as in _dp."""
    tr = _group_transfers(table, groups)
    starts = np.array([table.source is None or g[0] == table.source for g in groups])
    reach = np.where(starts[:, None], stage[:, 0, :], np.inf)  # [g, b]: layers [0, b), the last stage on g
    for _ in range(k - 1):
        into = combine(reach[:, None, :], tr[:, :, None]).min(0)  # [g, l]: handed over to g after l layers
        reach = combine(into[:, :, None], stage).min(1)
    ends = reach[:, -1]
    if table.return_to_source:
        ends = combine(ends, tr[:, _source_group(table, groups)])
    return float(ends.min())


def _least_max(table: CostTable, groups: list[list[int]], wall: np.ndarray, busy: np.ndarray, most: int,
               in_flight: int = 0, exactly: bool = False, floor: float = 0.0,
               cap: float = np.inf) -> tuple[float, list[tuple[int, int, int]]]:
    """Least max(sum of stage walls + transfers, the busiest stage's busy time, in_flight x the
    longest transfer). One stream (in_flight 0): its token time, where a node under a quota must
    fit each token's work into its share; micro-batches in flight (on exactly `most` stages): the
    cycle of them all. The sum is additive, the max is not: the DP minimises the sum under a
    ceiling on every stage's busy time and transfer, and a binary search finds the ceiling where
    the two terms cross; floor: a lower bound on the least max; cap: the most it may be (inf where
    it is more)."""
    moves = _group_transfers(table, groups) * in_flight
    source = _source_group(table, groups)

    def peak(stages: list[tuple[int, int, int]]) -> float:  # the plan's busiest stage or hand-over
        hops = [moves[u, v] for (u, _, _), (v, _, _) in zip(stages, stages[1:], strict=False)]
        if table.return_to_source and stages:
            hops.append(moves[stages[-1][0], source])
        return max([busy[g, a, b] for g, a, b in stages] + hops + [0.0])

    def under(ceiling: float, cap: float) -> tuple[float, list[tuple[int, int, int]]]:
        fast = replace(table, transfer=np.where(table.transfer * in_flight <= ceiling, table.transfer, np.inf))
        total, stages = _dp(fast, groups, np.where(busy <= ceiling, wall, np.inf), np.add, most, exactly, cap)
        return max(total, peak(stages)), stages

    if not in_flight and (table.share == 1).all() and not table.task.any():  # (busy time: its part of the sum)
        return _dp(table, groups, wall, np.add, most, cap=cap)
    value, stages = best = under(np.inf, cap)
    worst = peak(stages)
    if not np.isfinite(value) or worst < value:  # bound by the sum, which no ceiling lowers
        return best
    # (the best plan's busiest part lies between the floor and this plan's value)
    ceilings = np.unique(np.concatenate([busy[busy <= value], table.transfer[table.transfer * in_flight <= value]
                                         * in_flight]))
    if not len(ceilings):
        return best
    hi = len(ceilings) - 1  # the least ceiling the plan under it stays within (none below the floor)
    lo = min(int(np.searchsorted(ceilings, floor)), hi)
    # (whether a plan is within a ceiling: any that is not is cut off as soon as its sum passes it)
    if under(ceilings[lo], ceilings[lo])[0] <= ceilings[lo]:  # (often the floor itself)
        hi = lo
    while lo < hi:
        mid = (lo + hi) // 2
        value = under(ceilings[mid], ceilings[mid])[0]
        lo, hi = (lo, mid) if value <= ceilings[mid] else (mid + 1, hi)
    within = min(under(ceilings[lo], ceilings[lo]), best, key=lambda c: c[0])
    return min(within, under(ceilings[lo - 1], within[0]) if lo else within, key=lambda c: c[0])


def _dp(table: CostTable, groups: list[list[int]], stage: np.ndarray, combine, most: int,
        exactly: bool = False, cap: float = np.inf) -> tuple[float, list[tuple[int, int, int]]]:
    """The least combined cost of at most (exactly) `most` contiguous stages over every layer, and
    its stages as (group, start, end); stage[g, l, b]: layers [l, b) on group g (inf where not
    allowed). inf: no plan, or none within cap (costs only grow as stages are added, so a partial
    plan past it is dropped, and a used set left with none is not extended)."""
    # Devices that share a host hold one stage between them: two stages there would take turns on
    # its compute (the same busy time as one stage holding both ranges, plus a hand-over).
    host_of = [int(table.hosts[g[0]]) for g in groups]
    sizes = np.array([1 if len(set(table.hosts[g].tolist())) == 1 and len(g) > 1 else len(g) for g in groups])
    n_groups, n_layers = len(groups), table.layers
    tr = _group_transfers(table, groups)
    bands = [_band(costs) for costs in stage]

    # used-set states: a count per group, numbered in mixed radix; only those of at most `most` stages
    # are kept (at `at`: the position of each number among them)
    radix = sizes + 1
    strides = np.concatenate([[1], np.cumprod(radix)[:-1]])
    counts = np.indices(radix[::-1]).reshape(n_groups, -1).T[:, ::-1]
    number = np.flatnonzero(counts.sum(1) <= most)
    at = np.full(len(counts), -1)
    at[number] = np.arange(len(number))
    counts = counts[number]
    used = counts.sum(1)
    best = np.full((len(counts), n_groups, n_layers + 1), np.inf)  # (used set, last group, layers covered)
    start_of = np.zeros(best.shape, dtype=np.int32)  # where the last stage starts
    prev_of = np.zeros(best.shape, dtype=np.int32)  # the group of the stage before it
    for g in range(n_groups):  # the first stage starts at layer 0, on the source if there is one
        if table.source is None or groups[g][0] == table.source:
            best[at[strides[g]], g] = stage[g, 0]

    for k in range(1, min(int(used.max()), n_layers, most)):  # a stage holds at least one layer
        level = np.flatnonzero(used == k)
        best[level] = np.where(best[level] <= cap, best[level], np.inf)
        level = level[np.isfinite(best[level]).any((1, 2))]
        for v in range(n_groups):
            movable = level[counts[level, v] < sizes[v]]
            neighbours = [u for u in range(n_groups) if u != v and host_of[u] == host_of[v]]
            if neighbours:  # a host already holding a stage takes no second
                movable = movable[counts[movable][:, neighbours].sum(1) == 0]
            for chunk in np.array_split(movable, len(movable) // CHUNK + 1):
                if len(chunk):
                    _extend(best, start_of, prev_of, chunk, at[number[chunk] + strides[v]], v, tr[:, v], bands[v],
                            combine)

    stages_of = (used == most) if exactly else (used <= most)  # (a state's stages: its devices)
    finals = np.where(stages_of[:, None], best[:, :, n_layers], np.inf)
    if table.return_to_source:
        finals = combine(finals, tr[:, _source_group(table, groups)][None, :])
    finals[finals > cap] = np.inf
    if not np.isfinite(finals).any():
        return np.inf, []
    state, last = (int(x) for x in np.unravel_index(np.argmin(finals), finals.shape))
    stages = []
    b = n_layers
    while True:  # walk back stage by stage
        a = int(start_of[state, last, b])
        stages.append((last, a, b))
        if a == 0:
            break
        state, last, b = at[number[state] - strides[last]], int(prev_of[state, last, b]), a
    return float(finals.min()), stages[::-1]


def _extend(best, start_of, prev_of, states, targets, v, into_v, band_v, combine) -> None:
    """Append a stage on group v to each state in `states` (all of one size), into `targets`.
    band_v[l, w]: the cost of layers [l, l + w + 1) on v (inf where they do not fit)."""
    n_layers = best.shape[2] - 1
    entering = combine(best[states], into_v[None, :, None])  # [states, from group u, layers covered l]
    arrive, via = entering.min(1), entering.argmin(1)  # the best hand-over into v after l layers
    value = np.full((len(states), n_layers + 1), np.inf)
    start = np.zeros(value.shape, dtype=np.int32)
    for w in range(min(band_v.shape[1], n_layers - 1)):  # a stage of w + 1 layers: [l, b = l + w + 1)
        ends = slice(w + 2, n_layers + 1)
        candidate = combine(arrive[:, 1:n_layers - w], band_v[None, 1:n_layers - w, w])
        better = candidate < value[:, ends]
        value[:, ends] = np.where(better, candidate, value[:, ends])
        start[:, ends] = np.where(better, np.arange(1, n_layers - w)[None, :], start[:, ends])
    better = value < best[targets, v]
    best[targets, v] = np.where(better, value, best[targets, v])
    start_of[targets, v] = np.where(better, start, start_of[targets, v])
    prev_of[targets, v] = np.where(better, np.take_along_axis(via, start, 1), prev_of[targets, v])


def _source_group(table: CostTable, groups: list[list[int]]) -> int | None:
    return next((i for i, g in enumerate(groups) if g[0] == table.source), None)


def _group_transfers(table: CostTable, groups: list[list[int]]) -> np.ndarray:
    """Transfer from group to group; within a group, between two of its (distinct) devices."""
    out = np.zeros((len(groups), len(groups)))
    for i, a in enumerate(groups):
        for j, b in enumerate(groups):
            if i != j:
                out[i, j] = table.transfer[a[0], b[0]]
            elif len(a) > 1:
                out[i, j] = table.transfer[a[0], a[1]]
    return out


def _stage_costs(table: CostTable, device: int) -> np.ndarray:
    """[l, b]: compute of layers [l, b) on the device; inf where empty or where they do not fit."""
    n = table.layers
    compute = np.concatenate([[0.0], np.cumsum(table.compute[device])])
    memory = np.concatenate([[0.0], np.cumsum(table.memory)])
    cost = compute[None, :] - compute[:, None]
    fits = (memory[None, :] - memory[:, None]) <= table.capacity[device] * (1 + 1e-12)
    empty = np.arange(n + 1)[None, :] <= np.arange(n + 1)[:, None]
    return np.where(fits & ~empty, cost, np.inf)


def _band(costs: np.ndarray) -> np.ndarray:
    """[l, w]: the cost of layers [l, l + w + 1), only as wide as the longest stage that fits
    (memory bounds the band, and with it the DP's work)."""
    n = costs.shape[0] - 1
    lengths = np.arange(n + 1)[None, :] - np.arange(n + 1)[:, None]
    widest = int(lengths[np.isfinite(costs)].max(initial=0))
    band = np.full((n + 1, widest), np.inf)
    for w in range(widest):
        band[: n - w, w] = np.diagonal(costs, offset=w + 1)
    return band


def _infeasible(table: CostTable) -> str:
    gb = 1e9
    largest = int(np.argmax(table.memory))
    if table.memory[largest] > table.capacity.max():
        return (f"no plan fits: layer {largest} alone needs {table.memory[largest] / gb:.2f} GB, more than any "
                f"device offers (largest {table.capacity.max() / gb:.2f} GB); add a larger device or quantise")
    if table.memory.sum() > table.capacity.sum():
        return (f"no plan fits: the layers need {table.memory.sum() / gb:.2f} GB, the devices offer "
                f"{table.capacity.sum() / gb:.2f} GB in all; add devices or memory, or quantise")
    if table.source is not None and table.memory[0] > table.capacity[table.source]:
        return (f"no plan fits: the source device {table.source} cannot hold even layer 0 "
                f"({table.memory[0] / gb:.2f} GB > {table.capacity[table.source] / gb:.2f} GB)")
    return ("no plan fits: the devices' memory cannot be split into contiguous ranges that hold every layer "
            f"({table.memory.sum() / gb:.2f} GB needed, {table.capacity.sum() / gb:.2f} GB offered); "
            "add devices or memory, or quantise")
