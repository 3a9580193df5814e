"""Drift: each node's measured speed against the estimator's, while serving; a new plan when it pays.

Every pipeline step brings back its stages' seconds of compute with its tokens (a
tensor-parallel stage's, each device's own, without the sums that wait for the others), and
the estimator predicts each of them for that step's work (decodes at their cached context)
from the cluster file's profiles. The first window calibrates: the ratio all nodes
share (the estimator's own error for this model and dtype) scales every node's profile, used
or not, so a node left out of the plan is not left looking faster than the rest. After that,
a node whose measured seconds stay beyond a threshold of the predicted (or below it, while
the node is busy) in both halves of a window has drifted: another tenant took its cores, its
quota or clock changed, or its profile missed how it behaves under load. Its profile is
scaled by the ratio of the window's later half (re-measured in place, by the work it serves,
not by a benchmark that would take its cores from the requests) and the planner plans again
over the corrected cluster. When that plan beats the running one by REPLAN_GAIN, the pipeline
moves to it; otherwise it keeps its plan and predicts with the corrected speeds. Either way
the window starts afresh, so decisions are at least a window apart. A node that joins the Ray
cluster is offered the same way (offer): its device and links join the cluster, and the
planner plans again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from shardwise.model.spec import ModelSpec
from shardwise.perf.estimate import Stage, device_times
from shardwise.perf.hardware import LinkSpec
from shardwise.perf.operators import Work
from shardwise.planner.plan import Plan
from shardwise.planner.topology import (
    Cluster,
    ClusterDevice,
    best_plans,
    plan_devices,
    plan_value,
    planning_batch,
    precision,
)

REPLAN_GAIN = 1.15  # a new plan must be predicted this much faster than the running one to move
MIN_STEPS = 8  # steps a window needs before it judges
WARMUP_S = 1.0  # a plan's first decode steps run cold (caches, thread pools): not judged
BUSY = 0.8  # share of the window a node computed for, to count as busy
CHECK_EVERY_S = 1.0  # how often the window is judged (medians over it are not free)


@dataclass(frozen=True)
class Verdict:
    """A node drifted: `plan` is where to move (None: keep the running plan), `message` says why."""

    plan: Plan | None
    message: str


class DriftWatch:
    def __init__(self, spec: ModelSpec, cluster: Cluster, plan: Plan, *, quant: str | None, objective: str,
                 kv_tokens: int, threshold: float, window_s: float, batch: int | None = None):
        self.spec, self.cluster, self.quant = spec, cluster, quant
        self.batch = planning_batch(objective, batch)  # (what it plans for)
        self.calibrated = False  # until the first window has scaled every profile by what all nodes share
        self.bias = 1.0  # by how much it scaled them (a node that joins later is scaled alike)
        self.objective, self.kv_tokens = objective, kv_tokens
        self.threshold, self.window_s = threshold, window_s
        self.follow(plan)

    def follow(self, plan: Plan) -> None:
        """Watch `plan` (just started) from a fresh window (a ValueError for a plan the planner
        cannot cost, which is not watched)."""
        # its seconds per step as the planner costs it at the speeds now known (None: it does not fit)
        self.value = plan_value(self.spec, self.cluster, plan, self.objective, batch=self.batch, quant=self.quant,
                                kv_tokens=self.kv_tokens)
        self.plan = plan
        self.members = plan_devices(self.cluster, plan)  # per stage, the cluster device of each of its devices
        self.devices = [d for members in self.members for d in members]  # what a step's seconds are of
        self.hosts = [self.cluster.hosts()[d] for d in self.devices]
        self.samples: deque[tuple[float, list[float], list[float]]] = deque()  # (time, predicted, measured)
        self.since: float | None = None  # when decode steps start to count (after a warm-up)
        self._checked = time.monotonic()
        self.medians: list[tuple[float, float]] = []  # per device: (predicted, measured) over the last window

    def predict(self, work: Work) -> list[float]:
        """Each device's predicted seconds of compute for one step of `work`, at its node's
        sustained speed (a node under a quota that idles between steps runs them faster: see
        observe)."""
        predicted = []
        for stage, members in zip(self.plan.stages, self.members, strict=True):
            specs = [self.cluster.devices[d].spec for d in members]
            group = tuple(zip(specs, (f for _, f in stage.shares), strict=True)) if stage.devices else ()
            times = device_times(self.spec, Stage(specs[0], *stage.layers, group=group), work,
                                 precision(specs[0], self.quant))
            predicted += [t / spec.sustained_share for t, spec in zip(times, specs, strict=True)]
        return predicted

    def observe(self, work: Work, measured: tuple[float, ...], judge: bool = True) -> Verdict | None:
        """Record one step; a Verdict once a node has drifted for a window. Only decode steps
        count, from WARMUP_S after the plan's first: prompt chunks (and the replays after a
        re-plan) are the estimator's weaker side, and would pass its error off as a node's.
        judge=False: processes starting beside the stages take the nodes' cores; the step counts
        for the medians, and the next verdict waits for a full window after the last such step."""
        if any(new != 1 for new, _ in work.sequences):
            return None
        now = time.monotonic()
        self.since = self.since or now + WARMUP_S
        if now < self.since:
            return None
        self.samples.append((now, self.predict(work), list(measured)))
        while self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        if not judge:
            self.since = now
        if now - self._checked < CHECK_EVERY_S:
            return None
        self._checked = now
        predicted, taken = (np.array([s[k] for s in self.samples]) for k in (1, 2))
        self.medians = list(zip(np.median(predicted, 0).tolist(), np.median(taken, 0).tolist(), strict=True))
        if now - self.since < self.window_s or len(self.samples) < MIN_STEPS:
            return None
        # per host, its stages' seconds against the predicted, in each half of the window: sums, as a
        # node under a CPU quota runs some steps at full speed and stalls in others; only what both
        # halves show is sustained (a change caught mid-window would be corrected by half of it)
        recent = np.array([t >= now - self.window_s / 2 for t, _, _ in self.samples])
        ratios, busy = {}, {}
        for host in set(self.hosts):
            mine = [k for k, h in enumerate(self.hosts) if h == host]
            ratios[host] = [float(taken[rows][:, mine].sum() / max(predicted[rows][:, mine].sum(), 1e-9))
                            for rows in (~recent, recent)]
            busy[host] = taken[:, mine].sum() / self.window_s >= BUSY
        # the first window calibrates: what every node shares (the estimator's error for this model and
        # dtype) scales every node's profile, used or not; each node's own difference is drift
        bias = 1.0 if self.calibrated else float(taken.sum() / max(predicted.sum(), 1e-9))
        self.calibrated, self.bias = True, self.bias * bias
        # faster counts only from a busy node: one that idles between its steps runs them in bursts
        # above the sustained speed its profile measured, and would not if given more
        drifted = {h: then / bias for h, (earlier, then) in ratios.items()
                   if min(earlier, then) / bias > self.threshold
                   or (max(earlier, then) / bias < 1 / self.threshold and busy[h])}
        return self._judge(drifted, bias) if drifted or bias != 1.0 else None

    def _judge(self, drifted: dict[int, float], bias: float) -> Verdict:
        """Correct the nodes' speeds; plan again; move if the new plan pays."""
        hosts = self.cluster.hosts()
        what = "; ".join(([f"the stages ran {bias:.2f}x the estimator's time (every node's profile scaled by it)"]
                          if bias != 1.0 else []) +
                         [f"{self._name(h)} ran {r:.2f}x the predicted time" for h, r in drifted.items()])
        # the shared error scales every speed; a node's own drift is what it keeps up when busy
        self.cluster = replace(self.cluster, devices=[
            replace(d, spec=d.spec.slower(bias).sustaining(drifted.get(host, 1.0)))
            for d, host in zip(self.cluster.devices, hosts, strict=True)])
        return self._replan(f"{what} for {self.window_s:.0f} s", "speeds corrected")

    def offer(self, device: ClusterDevice, links: dict[tuple[str, str], LinkSpec], calibrated: bool) -> Verdict:
        """A node joined: its device and its links to the others join the cluster (its profile
        scaled as the others' were, unless it is theirs already: `calibrated`); plan again."""
        spec = device.spec if calibrated else device.spec.slower(self.bias)
        self.cluster = replace(self.cluster, devices=[*self.cluster.devices, replace(device, spec=spec)],
                               links={**self.cluster.links, **links})
        return self._replan(f"node {device.name} joined", "offered to the planner")

    def _replan(self, what: str, done: str) -> Verdict:
        """Plan over the cluster as it now is; a Verdict to move if that beats the running plan."""
        self.follow(self.plan)  # a fresh window, with the corrected speeds
        running = self.value
        best = best_plans(self.spec, self.cluster, self.objective, batch=self.batch, quant=self.quant,
                          kv_tokens=self.kv_tokens)
        plan = best.plan(self.cluster)
        same = [(s.layers, s.shares) for s in plan.stages] == [(s.layers, s.shares) for s in self.plan.stages]
        keep = same or (running is not None and best.value * REPLAN_GAIN > running)
        unit = "per token" if self.objective == "latency" else f"per step of {self.batch} sequences"
        values = f"{best.value * 1e3:.1f} ms {unit}"
        values += "" if running is None else f" against {running * 1e3:.1f} now"
        if keep:
            return Verdict(None, f"{what}: {done}, the plan stays (a new plan would give {values})")
        return Verdict(plan, f"{what}: re-planning for {values}")

    def _name(self, host: int) -> str:
        names = sorted({d.name for d, h in zip(self.cluster.devices, self.cluster.hosts(), strict=True) if h == host})
        return f"node {'+'.join(names)}"
