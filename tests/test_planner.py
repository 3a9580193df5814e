"""The planner's core against exhaustive search (hypothesis), on plain cost tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise import ShardwiseError
from shardwise.planner import CostTable, solve, split_client_server, split_frontier

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exhaustive(t: CostTable, objective: str) -> float | None:
    """Every ordered choice of distinct devices and every cut of the layers among them."""
    best = None
    for k in range(1, min(t.devices, t.layers) + 1):
        for order in itertools.permutations(range(t.devices), k):
            if t.source is not None and order[0] != t.source:
                continue
            for cuts in itertools.combinations(range(1, t.layers), k - 1):
                bounds = (0, *cuts, t.layers)
                ranges = list(zip(bounds, bounds[1:], strict=False))
                if any(t.memory[a:b].sum() > t.capacity[d] for d, (a, b) in zip(order, ranges, strict=True)):
                    continue
                compute = [t.compute[d][a:b].sum() for d, (a, b) in zip(order, ranges, strict=True)]
                moves = [t.transfer[u][v] for u, v in zip(order, order[1:], strict=False)]
                if t.return_to_source:
                    moves.append(t.transfer[order[-1]][t.source])
                value = sum(compute) + sum(moves) if objective == "latency" else max(compute + moves)
                best = value if best is None else min(best, value)
    return best


def evaluate(t: CostTable, stages: list[tuple[int, int, int]], objective: str) -> float:
    compute = [t.compute[d][a:b].sum() for d, a, b in stages]
    moves = [t.transfer[u][v] for (u, _, _), (v, _, _) in zip(stages, stages[1:], strict=False)]
    if t.return_to_source:
        moves.append(t.transfer[stages[-1][0]][t.source])
    return sum(compute) + sum(moves) if objective == "latency" else max(compute + moves)


@st.composite
def tables(draw):
    devices, layers = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    small = st.integers(0, 6).map(float)
    compute = [[draw(small) for _ in range(layers)] for _ in range(devices)]
    capacity = [float(draw(st.integers(1, 20))) for _ in range(devices)]
    if devices > 1 and draw(st.booleans()):  # two identical devices, to exercise grouping
        compute[1], capacity[1] = list(compute[0]), capacity[0]
    transfer = [[0.0 if u == v else draw(small) for v in range(devices)] for u in range(devices)]
    if devices > 1 and draw(st.booleans()):
        for w in range(devices):  # make device 1 link exactly like device 0
            if w > 1:
                transfer[1][w], transfer[w][1] = transfer[0][w], transfer[w][0]
        transfer[1][0] = transfer[0][1]
    source = draw(st.one_of(st.none(), st.integers(0, devices - 1)))
    return CostTable(compute, [float(draw(st.integers(1, 5))) for _ in range(layers)], capacity, transfer,
                     source, source is not None and draw(st.booleans()))


@SETTINGS
@given(tables(), st.sampled_from(["latency", "throughput"]))
def test_dp_equals_exhaustive_search(table, objective):
    expected = exhaustive(table, objective)
    if expected is None:
        with pytest.raises(ShardwiseError, match="no plan fits"):
            solve(table, objective)
        return
    result = solve(table, objective)
    assert result.value == pytest.approx(expected, abs=1e-9)
    # the stages are a real plan with that value: contiguous, distinct devices, fitting, from the source
    assert result.stages[0][1] == 0 and result.stages[-1][2] == table.layers
    assert all(a < b for _, a, b in result.stages)
    assert all(s[2] == t[1] for s, t in zip(result.stages, result.stages[1:], strict=False))
    assert len({d for d, _, _ in result.stages}) == len(result.stages)
    assert all(table.memory[a:b].sum() <= table.capacity[d] for d, a, b in result.stages)
    assert table.source is None or result.stages[0][0] == table.source
    assert evaluate(table, result.stages, objective) == pytest.approx(result.value, abs=1e-9)


@SETTINGS
@given(tables(), st.sampled_from(["latency", "throughput"]), st.integers(0, 6), st.integers(1, 20))
def test_more_devices_or_memory_never_worsen_the_optimum(table, objective, speed, extra):
    try:
        before = solve(table, objective).value
    except ShardwiseError:
        return
    roomier = CostTable(table.compute, table.memory, table.capacity + extra, table.transfer, table.source,
                        table.return_to_source)
    assert solve(roomier, objective).value <= before + 1e-9
    d = table.devices
    transfer = np.zeros((d + 1, d + 1))
    transfer[:d, :d] = table.transfer
    transfer[d, :d] = transfer[:d, d] = 1.0
    bigger = CostTable(np.vstack([table.compute, np.full(table.layers, float(speed))]), table.memory,
                       np.append(table.capacity, float(extra)), transfer, table.source, table.return_to_source)
    assert solve(bigger, objective).value <= before + 1e-9


def test_memory_tight_tables_and_clear_errors():
    # the fast device holds only 2 of 4 layers: the DP must split, not overfill it
    t = CostTable(compute=[[1, 1, 1, 1], [5, 5, 5, 5]], memory=[1, 1, 1, 1], capacity=[2, 4],
                  transfer=[[0, 1], [1, 0]])
    assert solve(t).stages == [(0, 0, 2), (1, 2, 4)] or solve(t).stages == [(1, 0, 2), (0, 2, 4)]
    assert solve(t).value == 2 + 10 + 1
    with pytest.raises(ShardwiseError, match="layer 1 alone needs"):
        solve(CostTable([[1, 1]], [1e9, 5e9], [2e9], [[0]]))
    with pytest.raises(ShardwiseError, match="need 6.00 GB.*offer 4.00 GB"):
        solve(CostTable([[1, 1, 1], [1, 1, 1]], [2e9, 2e9, 2e9], [2e9, 2e9], [[0, 1], [1, 0]]))
    with pytest.raises(ShardwiseError, match="per layer"):
        CostTable([[1, 1]], [1], [1], [[0]])
    with pytest.raises(ShardwiseError, match="objective"):
        solve(CostTable([[1]], [1], [1], [[0]]), "cost")


def test_identical_devices_are_grouped_and_still_each_used_once():
    # 6 identical devices, each holding 2 of 12 layers: all six must be used, in some order
    t = CostTable(np.ones((6, 12)), np.ones(12), np.full(6, 2.0), np.ones((6, 6)) - np.eye(6))
    result = solve(t, "throughput")
    assert sorted(d for d, _, _ in result.stages) == list(range(6))
    assert result.value == 2.0


def exhaustive_split(client, server, switch, memory, capacity, sla):
    best = None
    for sides in itertools.product(("client", "server"), repeat=len(client)):
        path = ("client", *sides, "client")
        latency = sum(c if s == "client" else v for c, v, s in zip(client, server, sides, strict=True))
        latency += switch * sum(a != b for a, b in zip(path, path[1:], strict=False))
        work = sum(v for v, s in zip(server, sides, strict=True) if s == "server")
        mem = sum(m for m, s in zip(memory, sides, strict=True) if s == "client")
        if mem <= capacity and latency <= sla and (best is None or work < best):
            best = work
    return best


@SETTINGS
@given(st.integers(1, 10).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 9).map(float), min_size=n, max_size=n),
    st.lists(st.integers(0, 4).map(float), min_size=n, max_size=n),
    st.integers(0, 5).map(float),
    st.lists(st.integers(0, 4).map(float), min_size=n, max_size=n),
    st.integers(0, 20).map(float),
    st.integers(0, 60).map(float))))
def test_client_server_split_equals_exhaustive_search(case):
    client, server, switch, memory, capacity, sla = case
    expected = exhaustive_split(client, server, switch, memory, capacity, sla)
    if expected is None:
        with pytest.raises(ShardwiseError, match="no split"):
            split_client_server(client, server, switch, memory, capacity, sla)
        return
    r = split_client_server(client, server, switch, memory, capacity, sla)
    assert r.server_work == pytest.approx(expected)
    assert r.latency <= sla + 1e-9 and r.client_memory <= capacity
    assert exhaustive_split(client, server, switch, memory, capacity, r.latency) == pytest.approx(r.server_work)


def test_split_frontier_trades_server_work_for_latency():
    client, server = [4.0] * 6, [1.0] * 6
    frontier = split_frontier(client, server, switch=2.0, memory=[1.0] * 6, client_capacity=6)
    assert frontier[0].placement == ["server"] * 6 and frontier[0].latency == 6 + 4
    assert frontier[-1].server_work == 0 and frontier[-1].latency == 24
    assert all(a.latency < b.latency and a.server_work > b.server_work for a, b in zip(frontier, frontier[1:],
                                                                                          strict=False))
    with pytest.raises(ShardwiseError, match="SLA of 5.0 ms"):
        split_client_server(client, server, 2.0, [1.0] * 6, 6, sla=0.005)
