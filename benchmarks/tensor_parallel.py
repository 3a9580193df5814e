"""Tensor parallelism, run and predicted: a stage's layers split among 1, 2 and 3 devices.

Local: the default model on this machine's Ray, one stage split among 1, 2 and 3 local actors
(the cores shared out among them), decode tokens/s of one greedy stream and of 8, the share of
the first device's step spent in all-reduces (waiting for the slowest device included), and the
estimator's prediction beside each (this machine's profile: its speed, shared as the actors share
the cores; the Ray call that starts the other devices' step and the engine's all-reduce, as measured
between two processes).

--lab (root): two emulated nodes of one core each and a 1 Gbit/s link (shardwise lab), and a
Llama-3.2-1B-shaped Q4_0 model (bandwidth-bound: its decode reads ~0.7 GB a token). Each plan is
run and predicted: every layer split between both nodes (tensor parallelism; shares by their
measured speed, as the planner gives them, and the first node lighter by 8 points, as if to
make up for the embedding and LM head it also runs: each layer's sums hold the nodes together,
so the estimator times that slower, and it is measured) against every
pipeline-only plan (one node; the layers split between the nodes), and the planner's choice.

    python benchmarks/tensor_parallel.py [--repeats 3] [--new-tokens 24] [--profile FILE]
    sudo python benchmarks/tensor_parallel.py --lab [--local no] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import yaml

from shardwise import LLM
from shardwise.model.weights import open_weights
from shardwise.perf.cluster_profile import decode_steps
from shardwise.perf.estimate import Deployment, Stage, estimate
from shardwise.perf.hardware import DeviceSpec, LinkSpec
from shardwise.planner.plan import Plan, StageSpec, TensorDevice
from shardwise.planner.topology import Cluster, cluster_file, cost_table, plan_cluster, precision, tensor_groups

PROMPT = "Write a short story about a lighthouse keeper."
KV_TOKENS = 2048
STREAMS = (1, 8)


def run(model: str, plan: Plan, address: str | None, dtype: str, streams: int, new: int,
        repeats: int) -> tuple[float, float, float]:
    """Decode tokens/s of `streams` greedy streams (the median over repeats of the steps where
    every stream decodes), the first stage's mean seconds of those steps as it measures them (its
    compute and sums, not Ray's hand-overs; the prompts' steps left out), and the share of the
    first device's step spent summing."""
    with LLM(model, plan=plan, address=address, dtype=dtype, kv_tokens=KV_TOKENS) as llm:
        prompts = [llm.tokenizer.encode(f"{PROMPT} ({k + 1})") for k in range(streams)]

        def rate() -> tuple[float, dict, dict]:
            """tokens/s, and the first stage's figures as its decode steps start and end"""
            start = []
            steps = decode_steps(llm, prompts, new, lambda: start.append(llm.executor.stats()[0]))
            return sum(tokens for _, tokens in steps) / sum(seconds for seconds, _ in steps), start[0], \
                llm.executor.stats()[0]

        rate()  # warm-up
        runs = [rate() for _ in range(repeats)]

    def spent(key: str, device: int | None = None) -> float:
        """The decode steps' total of a figure (of one device of a tensor-parallel stage)."""
        return sum((a if device is None else a["devices"][device]).get(key, 0.0)
                   - (b if device is None else b["devices"][device]).get(key, 0.0) for _, b, a in runs)

    busy, collective, steps = spent("busy_s"), spent("collective_s"), spent("steps")
    # each device's own compute a step: its busy time less its time in sums
    devices = [None] if "devices" not in runs[0][2] else range(len(runs[0][2]["devices"]))
    computing = [(spent("busy_s", d) - spent("collective_s", d)) / steps for d in devices]
    rate = statistics.median(r for r, _, _ in runs)
    print(f"    {rate:.1f} tok/s, decode step {1e3 * busy / steps:.2f} ms, each device computing "
          + ", ".join(f"{1e3 * c:.2f}" for c in computing) + " ms")
    return rate, busy / steps, collective / busy if busy else 0.0


def predicted(spec, stage: Stage, dtype: str, streams: int) -> tuple[float, float]:
    """The estimator's decode tokens/s and the stage's step seconds, at the runs' mean context."""
    p = precision(stage.device, dtype)
    est = estimate(spec, Deployment((stage,)), batch=streams, input_tokens=len(PROMPT) // 4, output_tokens=24,
                   precision=p, micro_batches=1)
    return est.decode_tok_s, est.stages[0]["decode_s"]


def local(args) -> list[dict]:
    """One stage on this machine, split among 1, 2 and 3 actors sharing its cores."""
    from shardwise.model.registry import DEFAULT_MODEL, resolve
    from shardwise.perf.cluster_profile import profile_cluster

    profile = json.loads(Path(args.profile).read_text()) if args.profile else profile_cluster(DEFAULT_MODEL, quick=True)
    # this machine, and the link between two of its processes (a Ray call; the engine's all-reduce)
    machine, link = DeviceSpec.from_dict(profile["devices"][0]), LinkSpec.from_dict(profile["links"][0])
    spec = open_weights(resolve(DEFAULT_MODEL)).spec
    cores = os.cpu_count() or 1
    rows = []
    for n in (1, 2, 3):
        threads = max(1, cores // n)
        # each device's speed: its threads' share of the cores, less where n x threads oversubscribe them
        device = machine.slower(cores / (threads * min(1.0, cores / (n * threads))))
        stage = Stage(device, 0, spec.num_layers, link=link,
                      group=tuple((device, 1 / n) for _ in range(n)) if n > 1 else ())
        plan = Plan((StageSpec((0, spec.num_layers)),)).tensor_parallel(n)
        for streams in STREAMS:
            print(f"  local: TP {n}, {streams} streams")
            rate, step, share = run(DEFAULT_MODEL, plan, None, args.dtype, streams, args.new_tokens, args.repeats)
            guess, guess_step = predicted(spec, stage, args.dtype, streams)
            rows.append({"where": "local", "plan": f"TP {n}", "streams": streams, "measured": rate, "predicted": guess,
                         "step_s": step, "predicted_step_s": guess_step, "all_reduce_share": share})
    return rows


def lab_rows(args, work: Path) -> list[dict]:
    """Two one-core nodes: tensor parallelism against every pipeline-only plan, on a 1B-shaped model."""
    from bandwidth import write_model

    from shardwise.lab import lab
    from shardwise.lab.spec import LabSpec
    from shardwise.model.registry import DEFAULT_MODEL, resolve
    from shardwise.perf.cluster_profile import profile_cluster

    # (profiled on the default model: the 1B's profile outgrows a node's memory)
    model, profiled = (str(lab.readable_by_nodes(Path(m), work))
                       for m in (write_model("1b", "Q4_0"), resolve(DEFAULT_MODEL)))
    spec = open_weights(Path(model)).spec
    nodes = [{"name": name, "cpus": args.node_cpus, "memory_gb": 3, "link": {"rate_mbit": 1000}} for name in ("a", "b")]
    state = lab.up(LabSpec.model_validate({"nodes": nodes, "runtime_gb": 2.0}), progress=lambda w: print(f"  {w}"))
    rows = []
    try:
        print("  profiling the nodes and link")
        profile = profile_cluster(profiled, "cpu", state.address, quick=True)
        (work / "lab.json").write_text(json.dumps(profile))
        (work / "lab-cluster.yaml").write_text(yaml.safe_dump(cluster_file(profile, "lab.json")))
        cluster = Cluster.load(work / "lab-cluster.yaml")
        a, b = cluster.devices
        link = cluster.link(a.name, b.name)
        table = cost_table(spec, cluster, quant="int4", kv_tokens=KV_TOKENS)
        [group] = [g for g in tensor_groups(spec, cluster, table) if len(g.members) == 2]
        by_speed = [group.fractions[group.members.index(i)] for i in (0, 1)]  # (a first: a holds the head)
        half = spec.num_layers // 2

        def tensor_parallel(shares: list[float]) -> tuple[Plan, Stage]:
            return (Plan((StageSpec((0, spec.num_layers), a.node, devices=(
                TensorDevice(a.node, shares[0]), TensorDevice(b.node, shares[1]))),)),
                Stage(a.spec, 0, spec.num_layers, link=link, group=((a.spec, shares[0]), (b.spec, shares[1]))))

        lighter = [by_speed[0] - 0.08, by_speed[1] + 0.08]  # a, which also runs the embedding and LM head

        plans = {
            "one node": (Plan((StageSpec((0, spec.num_layers), a.node),)), Stage(a.spec, 0, spec.num_layers)),
            "pipeline a|b": (Plan((StageSpec((0, half), a.node), StageSpec((half, spec.num_layers), b.node))), None),
            f"TP a+b {by_speed[0]:.0%}:{by_speed[1]:.0%}": tensor_parallel(by_speed),
            f"TP a+b {lighter[0]:.0%}:{lighter[1]:.0%}": tensor_parallel(lighter),
        }
        _, summary = plan_cluster(spec, cluster, "latency", quant="int4", kv_tokens=KV_TOKENS)
        print(f"  the planner chose {summary['dp']['layout']} (tensor parallelism "
              f"{'pays' if (summary['tensor_parallel'] or {}).get('pays') else 'does not pay'})")
        # the plans in turn, each once a round: this shared machine's speed drifts over minutes
        runs = {name: [] for name in plans}
        for round_ in range(args.rounds):
            for name, (plan, _) in plans.items():
                print(f"  lab: {name}, round {round_ + 1} of {args.rounds}")
                runs[name].append(run(model, plan, state.address, "int4", 1, args.new_tokens, args.repeats))
        for name, (_, stage) in plans.items():
            if stage is None:  # the pipeline: its stages one after the other
                deployment = Deployment.pipeline(spec, [a.spec, b.spec], link, [(0, half), (half, spec.num_layers)])
                est = estimate(spec, deployment, batch=1, input_tokens=len(PROMPT) // 4,
                               output_tokens=24, precision=precision(a.spec, "int4"), micro_batches=1)
                guess, guess_step = est.decode_tok_s, est.stages[0]["decode_s"]
            else:
                guess, guess_step = predicted(spec, stage, "int4", 1)
            rate, step, share = (statistics.median(column) for column in zip(*runs[name], strict=True))
            rows.append({"where": "lab", "plan": name, "streams": 1, "measured": rate, "predicted": guess,
                         "step_s": step, "predicted_step_s": guess_step, "all_reduce_share": share})
    finally:
        lab.down(state)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="int4", help="The local runs' weights.")
    parser.add_argument("--profile", default=None,
                        help="This machine's `shardwise profile` (default: measured now, --quick).")
    parser.add_argument("--lab", action="store_true", help="Also run the two-node lab layout (root).")
    parser.add_argument("--rounds", type=int, default=3, help="Lab: each plan started this often, in turn.")
    parser.add_argument("--local", default="yes", choices=("yes", "no"))
    parser.add_argument("--node-cpus", type=float, default=1.0,
                        help="Lab: each node's cores. Two 1-core nodes fill a 2-core machine (the lab warns): "
                             "computing at once, each keeps less of its speed, as profile measures (crowded_share). "
                             "Half-core nodes meet their CFS quota inside a step, which no plan escapes.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tensor-parallel-"))
    rows = local(args) if args.local == "yes" else []
    if args.lab:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # the lab keeps Ray's token auth on
        rows += lab_rows(args, work)
    (work / "rows.json").write_text(json.dumps(rows))
    print(f"\ndecode tokens/s (medians of {args.repeats} runs; lab: of {args.rounds} starts of each plan) and "
          "the first stage's step time, each measured and "
          "predicted (one device: the error of the same run's one-device plan, where the whole machine's "
          "model errs alike; TP: the error left when that is taken out; all-reduce: the first device's share "
          "of its step spent summing, waiting for the slowest device included)")
    print(f"{'where':<6} {'plan':<16} {'streams':>7} {'tok/s':>7} {'predicted':>9} {'error':>6} {'step ms':>8} "
          f"{'predicted':>9} {'error':>6} {'vs one device':>13} {'all-reduce':>10}")
    for r in rows:
        error = 100 * (r["predicted"] / r["measured"] - 1)
        ratio = r["predicted_step_s"] / r["step_s"]
        step_error = 100 * (ratio - 1)
        [alone] = [o for o in rows if o["where"] == r["where"] and o["streams"] == r["streams"]
                   and o["plan"] in ("TP 1", "one node")]
        beyond = 100 * (ratio / (alone["predicted_step_s"] / alone["step_s"]) - 1)
        print(f"{r['where']:<6} {r['plan']:<16} {r['streams']:>7} {r['measured']:>7.1f} {r['predicted']:>9.1f} "
              f"{error:>+5.0f}% {1e3 * r['step_s']:>8.2f} {1e3 * r['predicted_step_s']:>9.2f} {step_error:>+5.0f}% "
              f"{beyond:>+12.0f}% {100 * r['all_reduce_share']:>9.0f}%")
    for where in dict.fromkeys(r["where"] for r in rows):
        for streams in STREAMS:
            ran = [r for r in rows if r["where"] == where and r["streams"] == streams]
            if len(ran) < 2:
                continue
            fastest = max(ran, key=lambda r: r["measured"])
            split, unsplit = (max((r for r in ran if (r["plan"].startswith("TP") and r["plan"] != "TP 1") == tp),
                                  key=lambda r: r["measured"]) for tp in (True, False))
            print(f"{where}, {streams} streams: fastest measured {fastest['plan']} ({fastest['measured']:.1f} tok/s); "
                  f"predicted fastest {max(ran, key=lambda r: r['predicted'])['plan']}; the fastest TP plan "
                  f"{split['measured'] / unsplit['measured']:.2f}x the fastest without TP ({unsplit['plan']})")
    print(f"rows: {work / 'rows.json'}")


if __name__ == "__main__":
    main()
