"""The planner's core against exhaustive search (hypothesis), on plain cost tables."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise import ShardwiseError
from shardwise.planner import CostTable, solve, split_client_server, split_frontier
from tests.conftest import cli

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exhaustive(t: CostTable, objective: str, most: int | None = None) -> float | None:
    """Every ordered choice of distinct devices (at most `most`) and every cut of the layers among them."""
    best = None
    for k in range(1, min(t.devices, t.layers, most or t.devices) + 1):
        for order in itertools.permutations(range(t.devices), k):
            if t.source is not None and order[0] != t.source:
                continue
            if len({t.hosts[d] for d in order}) < len(order):  # one stage a host at most
                continue
            for cuts in itertools.combinations(range(1, t.layers), k - 1):
                bounds = (0, *cuts, t.layers)
                ranges = list(zip(bounds, bounds[1:], strict=False))
                if any(t.memory[a:b].sum() > t.capacity[d] for d, (a, b) in zip(order, ranges, strict=True)):
                    continue
                value = evaluate(t, [(d, a, b) for d, (a, b) in zip(order, ranges, strict=True)], objective)
                best = value if best is None else min(best, value)
    return best


def evaluate(t: CostTable, stages: list[tuple[int, int, int]], objective: str) -> float:
    """Latency: the stages' steps from idle (burst speed for as long as the burst lasts, then the
    sustained share of it) plus the moves, or the busiest stage at its sustained speed, whichever
    is larger. Throughput: k stages split the batch into k micro-batches in flight (a table
    without a split: each does 1/k of the work), and the cycle is one micro-batch's way round or
    k times the busiest stage (sustained, and crowded where another stage's host is on its
    machine) or move, whichever is larger; with fewer rows than stages, k = rows."""
    k = min(len(stages), t.rows or len(stages)) if objective == "throughput" else 1
    compute = [t.compute[d][a:b].sum() / k for d, a, b in stages]
    busy = [(c + t.task[d]) / t.share[d] for c, (d, _, _) in zip(compute, stages, strict=True)]
    if k > 1:
        busy = [b / (t.crowded[d] if any(t.machines[e] == t.machines[d] and t.hosts[e] != t.hosts[d]
                                         for e, _, _ in stages) else 1.0) for b, (d, _, _) in zip(busy, stages,
                                                                                                  strict=True)]
    walls = [c if c <= t.burst[d] else t.burst[d] + (c - t.burst[d]) / t.share[d]
             for c, (d, _, _) in zip(compute, stages, strict=True)]
    moves = [t.transfer[u][v] for (u, _, _), (v, _, _) in zip(stages, stages[1:], strict=False)]
    if t.return_to_source:
        moves.append(t.transfer[stages[-1][0]][t.source])
    if objective == "latency":
        return max(sum(walls) + sum(moves), *busy)
    return max(sum(walls) + sum(moves), *(k * b for b in busy), *(k * m for m in moves))


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
    # some devices sharing a host (CPUs of one node): they hold one stage between them
    hosts = [draw(st.integers(0, devices - 1)) for _ in range(devices)] if draw(st.booleans()) else None
    share = burst = task = None
    if draw(st.booleans()):  # devices under a CPU quota: fast in bursts, a share of that when busy
        share = [draw(st.sampled_from([1.0, 0.5, 0.3, 0.25])) for _ in range(devices)]
        burst = [draw(st.sampled_from([np.inf, 2.0, 5.0])) for _ in range(devices)]
        task = [draw(st.sampled_from([0.0, 0.5, 1.0])) for _ in range(devices)]  # a stage's call, per step
        if devices > 1 and compute[1] == compute[0]:
            share[1], burst[1], task[1] = share[0], burst[0], task[0]
    machines = crowded = None
    if draw(st.booleans()):  # every device on one machine (a lab's nodes): hosts there crowd each other
        machines = [0] * devices
        crowded = [draw(st.sampled_from([1.0, 0.8, 0.5])) for _ in range(devices)]
    rows = draw(st.one_of(st.none(), st.integers(1, 3)))  # (fewer sequences than stages: fewer micro-batches)
    return CostTable(compute, [float(draw(st.integers(1, 5))) for _ in range(layers)], capacity, transfer,
                     source, source is not None and draw(st.booleans()), hosts, share, burst, task, machines, crowded,
                     rows)


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
@given(tables(), st.sampled_from(["latency", "throughput"]), st.sampled_from([1.05, 1.3, 2.0]))
def test_a_plan_of_more_stages_must_pay_the_gain(table, objective, gain):
    """With a gain, the plan of fewest stages within that factor of the optimum: every plan of
    fewer stages is worse than optimum * gain."""
    best = exhaustive(table, objective)
    if best is None:
        return
    result = solve(table, objective, gain)
    stages = len(result.stages)
    assert result.value <= best * gain + 1e-9
    assert result.value == pytest.approx(exhaustive(table, objective, most=stages), abs=1e-9)
    fewer = exhaustive(table, objective, most=stages - 1) if stages > 1 else None
    assert fewer is None or fewer > best * gain
    assert evaluate(table, result.stages, objective) == pytest.approx(result.value, abs=1e-9)


@SETTINGS
@given(tables(), st.sampled_from(["latency", "throughput"]), st.integers(0, 6), st.integers(1, 20))
def test_more_devices_or_memory_never_worsen_the_optimum(table, objective, speed, extra):
    try:
        before = solve(table, objective).value
    except ShardwiseError:
        return
    roomier = CostTable(table.compute, table.memory, table.capacity + extra, table.transfer, table.source,
                        table.return_to_source, table.hosts, table.share, table.burst, table.task, table.machines,
                        table.crowded, table.rows)
    assert solve(roomier, objective).value <= before + 1e-9
    d = table.devices
    transfer = np.zeros((d + 1, d + 1))
    transfer[:d, :d] = table.transfer
    transfer[d, :d] = transfer[:d, d] = 1.0
    bigger = CostTable(np.vstack([table.compute, np.full(table.layers, float(speed))]), table.memory,
                       np.append(table.capacity, float(extra)), transfer, table.source, table.return_to_source,
                       np.append(table.hosts, table.devices), np.append(table.share, 0.5),
                       np.append(table.burst, 1.0), np.append(table.task, 0.5),
                       np.append(table.machines, table.devices), np.append(table.crowded, 1.0), table.rows)
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


def test_stages_sharing_a_host_take_turns_on_it():
    """Two CPU devices of one node: the DP puts one stage there; a baseline that puts two there
    is charged their sum (they take turns on the cores) in throughput, not the larger one."""
    from shardwise.planner.baselines import evaluate as evaluate_baseline

    t = CostTable(np.ones((3, 6)), np.ones(6), np.full(3, 6.0), np.zeros((3, 3)), hosts=[0, 0, 1])
    result = solve(t, "throughput")  # two micro-batches of half the work each: 3 layers a node, twice
    assert len({t.hosts[d] for d, _, _ in result.stages}) == len(result.stages) and result.value == 3.0
    assert evaluate_baseline(t, [(0, 0, 2), (1, 2, 4), (2, 4, 6)], "throughput") == 4.0  # 2 x (1 + 1) there
    assert evaluate_baseline(t, [(0, 0, 2), (1, 2, 4), (2, 4, 6)], "latency") == 6.0


def test_identical_devices_are_grouped_and_still_each_used_once():
    # 6 identical devices, each holding 2 of 12 layers: all six must be used, in some order
    t = CostTable(np.ones((6, 12)), np.ones(12), np.full(6, 2.0), np.ones((6, 6)) - np.eye(6))
    result = solve(t, "throughput")
    assert sorted(d for d, _, _ in result.stages) == list(range(6))
    assert result.value == pytest.approx(2.0 + 5.0)  # a micro-batch's way round: 6 x 2/6 layers, 5 hand-overs


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


CLUSTER = """
source: laptop
return_to_source: true
default_link: ethernet-10g
devices:
  - {name: laptop, type: m2-max, memory_gb: 24}
  - {name: gpu, type: rtx-4090, count: 2, node: 10.0.0.7}
  - {name: old, type: rtx-3090, node: 10.0.0.8}
  - {name: pi, type: raspberry-pi-5}
links:
  - {from: gpu-0, to: gpu-1, link: pcie4}
"""


def test_cluster_file_to_cost_table_charges_the_ends_where_they_run(tmp_path):
    from shardwise.model.catalog import load_spec
    from shardwise.perf.hardware import load_link
    from shardwise.planner.topology import Cluster, cost_table

    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    cluster = Cluster.load(path)
    assert [d.name for d in cluster.devices] == ["laptop", "gpu-0", "gpu-1", "old", "pi"]
    assert cluster.link("gpu-1", "gpu-0") == load_link("pcie4") and cluster.link("pi", "old").name == "ethernet-10g"
    spec = load_spec("llama-3.1-8b")
    table = cost_table(spec, cluster, batch=4, quant="int4", kv_tokens=4096)
    assert table.source == 0 and table.return_to_source
    # identical middle layers; layer 0 carries the embedding, the last the (large-vocabulary) head
    gpu = table.compute[1]
    assert gpu[1] == pytest.approx(gpu[5]) and gpu[-1] > 1.5 * gpu[5] and gpu[0] > gpu[5]
    # the head is kept at 8 bits (blocks of 32 with an fp16 scale) where the layers are int4
    assert table.memory[-1] - table.memory[5] == pytest.approx(spec.vocab_size * spec.hidden_size * 1.0625,
                                                               rel=0.01)
    assert table.compute[4].sum() > 10 * table.compute[1].sum()  # a Raspberry Pi is slow
    assert table.transfer[1, 2] < table.transfer[1, 3]  # PCIe beats 10 GbE


def test_plan_cli_beats_or_matches_every_baseline_and_writes_a_plan(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    out, png = tmp_path / "plan.json", tmp_path / "gantt.png"
    result = cli("plan", "--model", "llama-3.1-70b", "--cluster", str(path), "--objective", "throughput",
                 "--batch", "8", "--quant", "int4", "--json", "--out", str(out), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    # (the optimum: the DP's plan, or the plan of more stages it declined for gaining under 10 %)
    optimum = (summary["declined"] or summary["dp"])["value"]
    assert summary["dp"]["value"] <= 1.1 * optimum
    for name, row in summary["baselines"].items():
        assert row["value"] is None or row["value"] >= optimum - 1e-12, name
    assert "pi" not in summary["dp"]["layout"]  # a device that only slows things down is left out
    plan = json.loads(out.read_text())
    assert plan["stages"][0]["layers"][0] == 0 and plan["stages"][-1]["layers"][1] == 80
    assert png.read_bytes()[:4] == b"\x89PNG"
    split = cli("plan", "--model", "llama-3.1-8b", "--client", "m2-max", "--server", "h100", "--sla", "20ms",
                "--json")
    assert split.returncode == 0, split.stderr
    best = json.loads(split.stdout)["best"]
    assert best["latency_s"] <= 0.020 and 0 < best["server_share"] < 1


@pytest.mark.parametrize("args, message", [
    (["--model", "llama-2-7b", "--cluster", "/nonexistent.yaml"], "does not exist"),
    (["--model", "llama-2-7b"], "give --cluster"),
    (["--model", "llama-2-7b", "--client", "m2-max", "--server", "h100"], "needs --client, --server and --sla"),
    (["--model", "llama-2-7b", "--client", "m2-max", "--server", "h100", "--sla", "1ms"], "no split meets"),
    (["--model", "llama-2-7b", "--client", "m2-max", "--server", "h100", "--sla", "fast"], "cannot read the time"),
])
def test_plan_cli_errors_are_one_line(args, message):
    result = cli("plan", *args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_plan_from_this_machines_profile_runs_with_the_default_tokens(machine_profile, tmp_path, llm,
                                                                      ray_session):
    """End to end: profile -> cluster file -> plan (memory forces a split: a pipeline, or one stage
    split between the devices where the planner finds that faster) -> pipeline, same greedy tokens."""
    from shardwise import LLM, SamplingParams
    from tests.conftest import TEXT_PROMPTS

    path = tmp_path / "cluster.yaml"
    path.write_text(f"""
devices:
  - {{name: half-a, profile: {machine_profile}, memory_gb: 0.45, node: local}}
  - {{name: half-b, profile: {machine_profile}, memory_gb: 0.45, node: local}}
""")
    out = tmp_path / "plan.json"
    result = cli("plan", "--model", "smollm2-135m", "--cluster", str(path), "--kv-tokens", "1024",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    assert sum(len(stage.get("devices") or [stage]) for stage in plan["stages"]) == 2, plan
    params = SamplingParams(max_tokens=16, temperature=0.0)
    expected = [o.token_ids for o in llm.generate(TEXT_PROMPTS, params)]
    pipeline = LLM(plan=str(out), dtype="float32")
    try:
        assert [o.token_ids for o in pipeline.generate(TEXT_PROMPTS, params)] == expected
    finally:
        pipeline.close()
