"""Profile every node of a Ray cluster, and the links between them.

Without a cluster address the local machine is measured in this process and the
"link" is the Ray hop between two stages on it, which is what a local pipeline pays.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardwise.cluster.ray_session import join
from shardwise.engine.collective import TensorGroup, open_store
from shardwise.model.spec import ModelSpec
from shardwise.perf.profile import (
    Progress,
    burst_and_share,
    collective_on_link,
    decode_rate,
    link_from_hand_overs,
    profile_device,
    time_all_reduces,
    timed,
)

HOP_TOKENS = (1, 16, 512)  # hidden states of a decode step, of a micro-batch's one and of a prefill chunk
SUM_TOKENS = (1, 64)  # a tensor-parallel decode step's all-reduce, and a larger one for the bandwidth


@ray.remote(num_cpus=0)
class Probe:
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def receive(self, x: np.ndarray) -> int:
        return x.shape[0]

    def cpu_seconds(self) -> float:
        """This process's CPU time, all its threads (Ray's among them)."""
        return time.process_time()

    def machine(self) -> str:
        """This boot of this machine: Ray nodes that share it share its cores and memory bandwidth."""
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()

    def threads(self) -> int:
        return torch.get_num_threads()

    def speed_kept(self) -> tuple[float, float | None]:
        """(the share of its speed this node keeps up when busy, how long a burst lasts)."""
        return burst_and_share(torch.device("cpu"))

    def decode_rate(self, seconds: float, rows: int) -> float:
        return decode_rate(seconds, rows)

    def profile(self, model: str, device: str, name: str, quick: bool) -> dict[str, Any]:
        return profile_device(model, device, name=name, quick=quick).to_dict()

    def emit(self, tokens: int, hidden: int) -> np.ndarray:
        """A stage's output: hidden states of `tokens` tokens."""
        return np.zeros((tokens, hidden), np.float32)

    def hand_overs(self, sender: Probe, receiver: Probe, hidden: int,
                   repeats: int = 20) -> tuple[list[tuple[int, float]], float]:
        """As the driver of a pipeline, from this probe on its node: median seconds to hand
        `receiver` a hidden-state array of each size that `sender` made, and hear back; and the
        CPU seconds each small call cost `receiver` (what a stage's call costs its node). A
        pipeline passes each stage's output on by reference: Ray returns a small output to its
        caller, which sends it into the next call (two messages, through the driver), and a
        large one goes node to node once the driver learns it is ready. (A round trip between
        the two nodes alone misses the driver: half the messages.)"""
        out, cpu = [], 0.0
        for tokens in HOP_TOKENS:
            ray.get(receiver.receive.remote(sender.emit.remote(tokens, hidden)))
            times, before = [], ray.get(receiver.cpu_seconds.remote())
            for _ in range(repeats):
                start = time.perf_counter()
                ray.get(receiver.receive.remote(sender.emit.remote(tokens, hidden)))
                times.append(time.perf_counter() - start)
            if tokens == HOP_TOKENS[0]:  # (the count call's own cost is in it too: one more call)
                cpu = (ray.get(receiver.cpu_seconds.remote()) - before) / (repeats + 1)
            out.append((tokens * hidden * 4, statistics.median(times)))
        return out, cpu

    def open_group(self) -> tuple[str, int]:
        """A two-device group's rendezvous on this node (its address), for all_reduce_seconds."""
        host = ray.util.get_node_ip_address()
        self.store, port = open_store(host)
        return host, port

    def all_reduce_seconds(self, rank: int, address: tuple[str, int], hidden: int, between: int,
                           rounds: int) -> list[float]:
        """As one of a tensor-parallel stage's two devices (the first opened the group): the
        seconds of the engine's all-reduce of each of SUM_TOKENS tokens' hidden states, back to
        back; then of the first amid work (a read of `between` floats before each)."""
        group = TensorGroup(rank, 2, tuple(address), ray.util.get_node_ip_address(), torch.device("cpu"),
                            store=self.store if rank == 0 else None)
        try:
            return [*(time_all_reduces(group, tokens * hidden, rounds) for tokens in SUM_TOKENS),
                    time_all_reduces(group, SUM_TOKENS[0] * hidden, rounds, between=between)]
        finally:
            group.close()
            self.store = None


SUMS_TIMED = 200  # each size's all-reduces on a link, quick or not: four blocks, a fraction of a second each


def collective_link(first: Probe, second: Probe, spec: ModelSpec) -> dict[str, float]:
    """The engine's all-reduce between the nodes of two probes, as LinkSpec's collective figures;
    amid work: before each sum, each device reads what a decode step reads between two sums at
    two devices (a quarter of a layer's weights, fp32: the sums' waits for a device that finished
    later, or woke late, grow with the work between them)."""
    address = ray.get(first.open_group.remote())
    hidden, between = spec.hidden_size, spec.layer_parameters() // 4
    times = ray.get([p.all_reduce_seconds.remote(k, address, hidden, between, SUMS_TIMED)
                     for k, p in enumerate((first, second))])
    *back_to_back, amid_work = times[0]
    return collective_on_link(*[(tokens * hidden * 4, t) for tokens, t in zip(SUM_TOKENS, back_to_back, strict=True)],
                              amid_work)


def probe_on(node_id: str) -> Probe:
    """A Probe actor on that Ray node."""
    return Probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()


def profile_cluster(model: str, device: str = "cpu", address: str | None = None,
                    progress: Progress = lambda _: None, quick: bool = False) -> dict[str, Any]:
    """{"devices": [DeviceSpec dicts], "links": [{"from", "to", bandwidth, latency}], "nodes": [{"name",
    "node": its IP, or "local"}]}; a node's memory is what Ray offers there (its --memory). Nodes
    on one machine (a lab's) share one profile of it, each with its own share (_profile_nodes).
    quick: fewer repeats of every measurement (see profile_device)."""
    from shardwise.model.catalog import load_spec

    spec = load_spec(model)
    hidden = spec.hidden_size
    owns = join(address, instead="profile this machine")
    try:
        # nodes that offer no CPU to tasks (a head started with --num-cpus=0) coordinate; they run no stage
        nodes = [n for n in ray.nodes() if n["Alive"] and (address is None or n["Resources"].get("CPU", 0) > 0)]
        names = _names(nodes)
        probes = {n["NodeID"]: probe_on(n["NodeID"]) for n in nodes}
        if address is None:
            devices = [profile_device(model, device, name=names[0], progress=progress, quick=quick).to_dict()]
        else:
            progress(f"profiling {len(nodes)} nodes")
            devices = _profile_nodes([probes[n["NodeID"]] for n in nodes], names, model, device, quick)
            for d, n in zip(devices, nodes, strict=True):  # what the node offers, not its host's RAM
                d["memory_bytes"] = float(n["Resources"].get("memory", d["memory_bytes"]))
        links, task_cpu = [], {i: [] for i in range(len(nodes))}
        driver = probe_on(ray.get_runtime_context().get_node_id())
        partners = {n["NodeID"]: probe_on(n["NodeID"]) for n in nodes}  # the far end of a node's link to itself
        # every probe up before any link is timed: a starting worker imports for seconds, and on
        # a one-core lab node that took the core from the sums timed beside it (0.1 ms read 0.3-0.85)
        ray.get([p.node_id.remote() for p in (driver, *partners.values())])
        for i, u in enumerate(nodes):
            for j, v in enumerate(nodes):
                if j < i:  # links are taken as symmetric
                    continue
                progress(f"link {names[i]} -> {names[j]}")
                # two probes on one node measure the hop between local stages
                target = probes[v["NodeID"]] if j != i else partners[v["NodeID"]]
                trips = driver.hand_overs.remote(probes[u["NodeID"]], target, hidden, 8 if quick else 20)
                sizes, cpu = ray.get(trips)
                task_cpu[j].append(cpu)
                link = link_from_hand_overs(sizes, f"{names[i]}->{names[j]}")
                link = replace(link, **collective_link(probes[u["NodeID"]], target, spec))
                if address is None:
                    progress("the hop between real pipeline stages")
                    fewer = {"new": 9, "rounds": 2} if quick else {}
                    link = replace(link, latency=stage_hop_latency(model, device, **fewer))
                links.append({"from": names[i], "to": names[j], **link.to_dict()})
        if address is not None:  # what a stage's call costs each node (local stages: in the measured hop)
            for i, d in enumerate(devices):
                d["task_cpu_s"] = statistics.median(task_cpu[i])
        return {"devices": devices, "links": links,
                "nodes": [{"name": name, "node": n["NodeManagerAddress"] if address else "local"}
                          for n, name in zip(nodes, names, strict=True)]}
    finally:
        if owns:
            ray.shutdown()


def _profile_nodes(probes: list[Any], names: list[str], model: str, device: str, quick: bool) -> list[dict[str, Any]]:
    """Each node's device. CPU nodes on one machine run on the same cores: their speed in bursts is
    the machine's, and only the share of it each keeps up differs (a quota). So each machine (and
    thread count) is profiled in full once, on its node that keeps the most of its speed, and
    each other node there measures its share only. (Profiled each in full, one machine's nodes
    came out up to ~30 % apart: the planner then split layers by that noise.)"""
    machines = ray.get([p.machine.remote() for p in probes])
    if device != "cpu":  # (a machine's GPUs are devices of their own)
        return _in_turns(machines, lambda i: probes[i].profile.remote(model, device, names[i], quick))
    hardware = list(zip(machines, ray.get([p.threads.remote() for p in probes]), strict=True))
    kept = _in_turns(machines, lambda i: probes[i].speed_kept.remote())
    leader = {}
    for i, h in enumerate(hardware):
        if h not in leader or kept[i][0] > kept[leader[h]][0]:
            leader[h] = i
    leaders = list(leader.values())
    full = dict(zip(leaders, _in_turns([machines[i] for i in leaders], lambda k: probes[leaders[k]].profile.remote(
        model, device, names[leaders[k]], quick)), strict=True))
    devices = []
    for i, h in enumerate(hardware):
        d = full[leader[h]]
        if i != leader[h]:
            share, burst = kept[i]
            d = {**d, "name": names[i], "sustained_share": share, "burst_s": burst,
                 "measured": {**d["measured"], "figures_of": names[leader[h]]}}
        devices.append(d)
    for d, machine, (share, batched) in zip(devices, machines, _crowded_shares(probes, machines), strict=True):
        d.update(machine=machine, crowded_share=share, batched_crowded_share=batched)
    return devices


CROWDED_ROWS = (1, 8)  # a sequence's decode products (a tensor-parallel step's), a micro-batch's


def _crowded_shares(probes: list[Any], machines: list[str], seconds: float = 1.0,
                    rounds: int = 3) -> list[tuple[float, float]]:
    """Each node's share of its speed kept while all the nodes on its machine decode at once (1.0 on
    a machine of its own), at each of CROWDED_ROWS: its median rate with the others busy over its
    median rate alone, over a few rounds (a quota slows both alike, and a node under one gains or
    loses up to a period's budget in each). A micro-batch's products are crowded less than a
    sequence's: on a lab, streaming reads kept 0.57-0.69 of their speed where 8-row decode
    micro-batches kept ~0.9."""
    alone = {(i, rows): [] for i in range(len(probes)) for rows in CROWDED_ROWS}
    together = {key: [] for key in alone}
    for _ in range(rounds):
        for rows in CROWDED_ROWS:
            for i, (by_itself, beside_others) in enumerate(_decode_rates(probes, machines, seconds, rows)):
                alone[i, rows].append(by_itself)
                if beside_others is not None:
                    together[i, rows].append(beside_others)

    def share(key: tuple[int, int]) -> float:
        return min(1.0, statistics.median(together[key]) / statistics.median(alone[key])) if together[key] else 1.0

    return [tuple(share((i, rows)) for rows in CROWDED_ROWS) for i in range(len(probes))]


def _decode_rates(probes: list[Any], machines: list[str], seconds: float,
                  rows: int) -> list[tuple[float, float | None]]:
    """Each node's decode_rate alone, and with every other node on its machine busy at once (None
    on a machine of its own)."""
    alone = _in_turns(machines, lambda i: probes[i].decode_rate.remote(seconds, rows))
    together: list[float | None] = [None] * len(probes)
    for machine in set(machines):
        here = [i for i, m in enumerate(machines) if m == machine]
        if len(here) > 1:
            for i, rate in zip(here, ray.get([probes[i].decode_rate.remote(seconds, rows) for i in here]),
                               strict=True):
                together[i] = rate
    return list(zip(alone, together, strict=True))


def _in_turns(machines: list[str], start) -> list[Any]:
    """ray.get of start(i) for each node i: nodes on different machines at once, nodes sharing one
    in turn (at once, they would take each other's cores and memory bandwidth, and measure each
    other)."""
    turn_of = [machines[:i].count(m) for i, m in enumerate(machines)]  # its turn on its machine
    out: list[Any] = [None] * len(machines)
    for turn in range(max(turn_of, default=-1) + 1):
        now = [i for i, t in enumerate(turn_of) if t == turn]
        for i, result in zip(now, ray.get([start(i) for i in now]), strict=True):
            out[i] = result
    return out


def stage_hop_latency(model: str, device: str, prompt: int = 64, new: int = 17, rounds: int = 7) -> float:
    """What a stage boundary really costs a local pipeline's decode step: a message hop plus
    waking the next stage's threads. Measured as (2-stage decode step - one-process step) / 2,
    the two hops being stage 0 -> stage 1 and the token ids back to the driver; both engines
    stay loaded and take turns, and the median of the paired differences resists noise bursts."""
    from shardwise.llm import LLM

    ids = [list(range(100, 100 + prompt))]
    with LLM(model, device=device) as one, LLM(model, device=device, stages=2) as two:
        decode_step_seconds(one, ids, new), decode_step_seconds(two, ids, new)  # warm-up
        differences = [decode_step_seconds(two, ids, new) - decode_step_seconds(one, ids, new) for _ in range(rounds)]
        stage = two.executor.stages[1]
        floor = timed(lambda: ray.get(stage.ready.remote()), torch.device("cpu"), 20)  # a bare call and answer
    # a busy machine can hide the hop in the noise of the two step times; it never costs less than a call
    return max(statistics.median(differences), floor) / 2


def decode_steps(llm, prompts: list[list[int]], new: int,
                 decoding_from: Callable[[], Any] = lambda: None) -> list[tuple[float, int]]:
    """(seconds, tokens) of each of an engine's steps in which every sequence decodes (each has its
    first token). (Not the time of N tokens less that of 1: both runs prefill, and at a large batch
    the prefill's noise swamps the decode steps' difference.) With micro-batches in flight a step
    returns one micro-batch's tokens. decoding_from: called once, before the first such step."""
    from shardwise.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    seqs = [llm.new_sequence(ids, params) for ids in prompts]
    for seq in seqs:
        llm.add(seq)
    steps = []
    while llm.has_work:
        decoding = all(seq.output.token_ids for seq in seqs)
        if decoding and not steps:
            decoding_from()
        start = time.perf_counter()
        tokens = len(llm.step())
        if decoding:
            steps.append((time.perf_counter() - start, tokens))
    return steps


def decode_step_seconds(llm, prompts: list[list[int]], new: int) -> float:
    """Median seconds of a decode step at this batch (decode_steps)."""
    return statistics.median(seconds for seconds, _ in decode_steps(llm, prompts, new))


def _names(nodes: list[dict[str, Any]]) -> list[str]:
    """Node host names, made unique (several Ray nodes can share a host)."""
    names, seen = [], {}
    for n in nodes:
        base = n.get("NodeName") or n["NodeManagerAddress"]
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names

