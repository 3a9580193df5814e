"""DriftWatch on its own: the estimator's predictions for a plan's stages against step times fed
to it (real time passes; only the waits are shortened)."""

from __future__ import annotations

import time

import pytest

from shardwise.cluster import drift
from shardwise.cluster.drift import DriftWatch
from shardwise.model.catalog import load_spec
from shardwise.perf.operators import Work
from shardwise.planner.topology import Cluster, plan_cluster

SPEC = load_spec("smollm2-135m")
DECODE = Work.decode(8, 100)


@pytest.fixture
def watch(monkeypatch):
    monkeypatch.setattr(drift, "WARMUP_S", 0.0)
    monkeypatch.setattr(drift, "CHECK_EVERY_S", 0.05)
    cluster = Cluster.from_dict({"devices": [{"name": "a", "type": "x86-cpu", "node": "10.0.0.1"},
                                             {"name": "b", "type": "x86-cpu", "node": "10.0.0.2"}]})
    plan, _ = plan_cluster(SPEC, cluster, "throughput", quant="int4")
    assert len(plan.stages) == 2
    return DriftWatch(SPEC, cluster, plan, quant="int4", objective="throughput", kv_tokens=4096, threshold=1.5,
                      window_s=0.4)


def feed(watch: DriftWatch, slower: list[float], seconds: float, judge: bool = True) -> list:
    """Steps whose stages take `slower` times the predicted, for `seconds`; the verdicts given."""
    verdicts, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        taken = tuple(p * f for p, f in zip(watch.predict(DECODE), slower, strict=True))
        verdicts.append(watch.observe(DECODE, taken, judge))
        time.sleep(0.01)
    return [v for v in verdicts if v]


def test_a_shared_error_calibrates_every_node_and_keeps_the_plan(watch):
    first = feed(watch, [3.0, 3.0], 0.6)
    assert len(first) == 1 and first[0].plan is None and "3.00x the estimator's time" in first[0].message
    assert feed(watch, [1.0, 1.0], 0.6) == []  # calibrated: the same speeds are no drift


def test_a_node_that_slows_down_moves_layers_off_it(watch):
    feed(watch, [1.0, 1.0], 0.6)
    layers_on_a = watch.plan.stages[0].layers
    verdicts = feed(watch, [4.0, 1.0], 0.6)
    assert len(verdicts) == 1 and verdicts[0].plan is not None, verdicts
    assert "node a ran 4.00x" in verdicts[0].message
    moved = {s.placement: s.layers[1] - s.layers[0] for s in verdicts[0].plan.stages}
    assert moved["10.0.0.1"] < layers_on_a[1] - layers_on_a[0]


def test_prompt_steps_and_a_node_idling_faster_are_not_drift(watch):
    prefill = Work.prefill(2, 64)
    for _ in range(20):
        assert watch.observe(prefill, (1.0, 1.0)) is None  # far off, but not a decode step
    feed(watch, [1.0, 1.0], 0.6)
    assert feed(watch, [1.0, 0.3], 0.6) == []  # b runs in bursts while idle: not busy, not counted


def test_steps_beside_a_starting_process_show_but_are_not_judged(watch):
    """While a stage process starts beside the stages (a spare, a move's), steps count for the
    medians shown, not for a verdict; one comes a full window after the last of them."""
    feed(watch, [1.0, 1.0], 0.6)
    assert feed(watch, [4.0, 1.0], 0.6, judge=False) == []
    assert watch.medians and watch.medians[0][1] > 3 * watch.medians[0][0]
    assert feed(watch, [4.0, 1.0], 0.3) == []  # less than a window since
    assert len(feed(watch, [4.0, 1.0], 0.3)) == 1


def test_a_node_that_joins_is_planned_in_when_it_pays_and_scaled_as_the_others(watch):
    """A node offered while serving: with a fast link, a third node of the same speed pays (the
    throughput plan spreads over three); one whose link crawls does not. A newcomer that copies
    a calibrated twin's figures keeps them; a profiled one is scaled as the others were."""
    from dataclasses import replace

    from shardwise.perf.hardware import LinkSpec, load_device
    from shardwise.planner.topology import ClusterDevice

    feed(watch, [2.0, 2.0], 0.6)  # calibrated: every profile scaled by 2
    twin = watch.cluster.devices[0]
    lan = {("c", d.name): LinkSpec("lan", 1.25e9, 50e-6) for d in watch.cluster.devices}
    joined = watch.offer(replace(twin, name="c", node="10.0.0.3"), lan, calibrated=True)
    assert joined.plan is not None and len(joined.plan.stages) == 3, joined.message
    assert "node c joined: re-planning" in joined.message
    assert watch.cluster.devices[-1].spec == twin.spec
    watch.follow(joined.plan)  # (as the pipeline does once it moved)
    crawl = {("d", d.name): LinkSpec("dial-up", 1e3, 0.1) for d in watch.cluster.devices}
    kept = watch.offer(ClusterDevice("d", load_device("x86-cpu"), 8e9, "10.0.0.4"), crawl, calibrated=False)
    assert kept.plan is None and "node d joined: offered to the planner, the plan stays" in kept.message
    assert watch.cluster.devices[-1].spec.bandwidth == pytest.approx(load_device("x86-cpu").bandwidth / 2)


def test_a_tensor_parallel_stage_is_judged_by_device_and_its_work_moves_off_a_slow_one(monkeypatch):
    """Each device of a stage split between two nodes reports its own seconds (not the sums that
    wait for the other): the one that slows down is named, and the new plan gives it less work."""
    from shardwise.planner.plan import Plan

    monkeypatch.setattr(drift, "WARMUP_S", 0.0)
    monkeypatch.setattr(drift, "CHECK_EVERY_S", 0.05)
    cluster = Cluster.from_dict({"devices": [{"name": n, "type": "x86-cpu", "node": f"10.0.0.{i}"}
                                             for i, n in enumerate("ab", 1)], "default_link": "infiniband-ndr"})
    plan = Plan.from_dict({"stages": [{"layers": [0, 30], "placement": "10.0.0.1", "devices": [
        {"placement": "10.0.0.1", "share": 1}, {"placement": "10.0.0.2", "share": 1}]}]})
    watch = DriftWatch(SPEC, cluster, plan, quant="int4", objective="latency", kv_tokens=4096, threshold=1.5,
                       window_s=0.4)
    first, second = watch.predict(DECODE)
    assert first > second > 0  # (the first device also runs the embedding and the LM head)
    assert feed(watch, [1.0, 1.0], 0.6) == []
    verdicts = feed(watch, [1.0, 4.0], 0.6)
    assert len(verdicts) == 1 and "node b ran 4.00x" in verdicts[0].message, verdicts
    moved = verdicts[0].plan

    def share_of_b(p: Plan) -> float:
        return sum((s.layers[1] - s.layers[0]) * f for s in p.stages for node, f in s.shares if node == "10.0.0.2")

    assert moved is not None and share_of_b(moved) < share_of_b(plan) - 3, moved
