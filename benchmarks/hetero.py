"""The DP's plan against every baseline split, each *run* on an emulated heterogeneous cluster
(shardwise lab), with the estimator's prediction beside each measurement.

Three lab layouts, each stressing one thing:
  slow-node   a full core and a quarter of one: the slow node only slows the pipeline
  small-fast  a full core offering 0.45 GB (fp32 SmolLM2-135M does not fit) beside a half core:
              memory decides
  slow-link   three nodes, one behind a 1 Mbit/s link: a good split does not cross it
For each: the lab comes up, `profile --address` measures its nodes and links (each node's speed in
bursts and the share of it it keeps up when busy), the planner plans over the cluster file it
wrote, and the DP's plan and every baseline (even as vLLM, memory-proportional as exo and
llama.cpp, FLOPS-proportional as Cake, greedy fastest-first) are run on the lab, for each
objective: latency (decode tokens/s of one greedy stream) and throughput (decode tokens/s of
16 concurrent greedy streams, micro-batches in flight), medians over repeats. Prints each
plan's predicted (the estimator, as the planner costs it) and measured rate, the DP against the
best baseline, and Kendall's tau between predicted and measured order; writes each layout's
Gantt chart of the DP's latency plan.

    sudo python benchmarks/hetero.py [--repeats 3] [--new-tokens 24] [--layouts slow-node,...]
                                     [--objectives latency,throughput]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from pathlib import Path

import yaml
from scipy.stats import kendalltau

from shardwise import ShardwiseError
from shardwise.lab import lab
from shardwise.lab.spec import LabSpec
from shardwise.model.catalog import load_spec
from shardwise.perf.estimate import Deployment, estimate
from shardwise.perf.hardware import SAME_DEVICE
from shardwise.planner import baselines, display
from shardwise.planner.partition import STAGE_GAIN, PlanResult, solve
from shardwise.planner.topology import Cluster, cluster_file, cost_table, plan_cluster, precision, to_plan

MODEL = "smollm2-135m"
KV_TOKENS = 2048  # every stage's KV budget (plans and runs alike): small, so memory is the weights
PROMPT = "Write a short story about a lighthouse keeper."
PROMPT_TOKENS = len(PROMPT) // 4  # (about: the estimate's prompt, and with half the new tokens the plans' context)
LAYOUTS = {
    "slow-node": [{"name": "fast", "cpus": 1.0, "memory_gb": 2, "link": {"rate_mbit": 1000}},
                  {"name": "slow", "cpus": 0.25, "memory_gb": 2, "link": {"rate_mbit": 1000}}],
    "small-fast": [{"name": "small", "cpus": 1.0, "memory_gb": 0.45, "link": {"rate_mbit": 1000}},
                   {"name": "big", "cpus": 0.5, "memory_gb": 2, "link": {"rate_mbit": 1000}}],
    "slow-link": [{"name": "a", "cpus": 0.5, "memory_gb": 0.45, "link": {"rate_mbit": 1000}},
                  {"name": "b", "cpus": 0.5, "memory_gb": 2, "link": {"rate_mbit": 1}},
                  {"name": "c", "cpus": 0.45, "memory_gb": 2, "link": {"rate_mbit": 1000}}],
}


STREAMS = {"latency": 1, "throughput": 16}  # concurrent greedy streams each objective is measured with


def measured_rate(model: str, plan, address: str, repeats: int, new: int, streams: int) -> float:
    """Decode tokens/s of `streams` greedy streams at once: the tokens of the steps in which every
    stream decodes over those steps' time (prefill left out), the median over repeats."""
    from shardwise import LLM
    from shardwise.perf.cluster_profile import decode_steps

    with LLM(model, plan=plan, address=address, dtype="float32", kv_tokens=KV_TOKENS) as llm:
        prompts = [llm.tokenizer.encode(f"{PROMPT} ({k + 1})") for k in range(streams)]

        def rate() -> float:
            steps = decode_steps(llm, prompts, new)
            return sum(tokens for _, tokens in steps) / sum(seconds for seconds, _ in steps)

        rate()  # warm-up
        return statistics.median(rate() for _ in range(repeats))


def predicted_rate(spec, cluster: Cluster, stages: list[tuple[int, int, int]], streams: int, new: int) -> float:
    """Decode tokens/s the estimator predicts for `streams` streams on these stages: one
    micro-batch in flight per node the stages occupy, as the pipeline runs them."""
    devices = [cluster.devices[d] for d, _, _ in stages]
    hosts = [cluster.hosts()[d] for d, _, _ in stages]
    links = [cluster.link(a.name, b.name) for a, b in zip(devices, devices[1:], strict=False)]
    deployment = Deployment.pipeline(spec, [d.spec for d in devices], links or SAME_DEVICE,
                                     [(a, b) for _, a, b in stages], hosts)
    p = precision(devices[0].spec, None)
    return estimate(spec, deployment, batch=streams, input_tokens=PROMPT_TOKENS, output_tokens=new,
                    precision=p, micro_batches=min(streams, len(set(hosts)))).decode_tok_s


def run_layout(name: str, nodes: list[dict], work: Path, repeats: int, new: int, objectives: list[str]) -> list[dict]:
    from shardwise.model.registry import resolve
    from shardwise.perf.cluster_profile import profile_cluster

    spec = load_spec(MODEL)
    model = str(lab.readable_by_nodes(resolve(MODEL), work))
    # (runtime: the profile holds the model's fp32 weights and every work point's KV, ~1.7 GB)
    state = lab.up(LabSpec.model_validate({"nodes": nodes, "runtime_gb": 2.0}),
                   progress=lambda what: print(f"  [{name}] {what}"))
    try:
        print(f"  [{name}] profiling the nodes and links (bursts and sustained)")
        profile = profile_cluster(model, "cpu", state.address, quick=True)
        (work / f"{name}.json").write_text(json.dumps(profile))
        (work / f"{name}-cluster.yaml").write_text(yaml.safe_dump(cluster_file(profile, f"{name}.json")))
        for d in profile["devices"]:
            print(f"  [{name}] {d['name']}: keeps {d['sustained_share']:.0%} of its speed when busy, "
                  f"bursts of {d['burst_s'] or float('inf'):.3f} s")
        cluster = Cluster.load(work / f"{name}-cluster.yaml")
        context = PROMPT_TOKENS + new // 2  # (the decode steps' mean: the plans are for what is run)
        _, summary = plan_cluster(spec, cluster, "latency", context=context, kv_tokens=KV_TOKENS)
        display.plot_gantt(summary, work / f"{name}-gantt.png")
        rows, seen = [], {}
        for objective in objectives:
            streams = STREAMS[objective]
            table = cost_table(spec, cluster, batch=streams, context=context, kv_tokens=KV_TOKENS)
            flops = [d.spec.peak_flops(d.spec.default_dtype) for d in cluster.devices]
            splits = {"shardwise DP": solve(table, objective, STAGE_GAIN).stages, "even (vLLM)": baselines.even(table),
                      "memory-proportional (exo, llama.cpp)": baselines.memory_proportional(table),
                      "FLOPS-proportional (Cake)": baselines.flops_proportional(table, flops),
                      "greedy fastest-first": baselines.greedy_fastest(table)}
            for split, stages in splits.items():
                layout = ", ".join(f"{cluster.devices[d].name}:{a}-{b}" for d, a, b in stages)
                fits = baselines.evaluate(table, stages, objective) is not None
                row = {"layout": name, "objective": objective, "split": split, "stages": layout,
                       "predicted": predicted_rate(spec, cluster, stages, streams, new) if fits else None,
                       "measured": None}
                if fits:
                    if (layout, streams) not in seen:
                        print(f"  [{name}] running {split} ({objective}, {streams} streams): {layout}")
                        plan = to_plan(PlanResult(0.0, stages, objective), cluster)
                        try:
                            seen[layout, streams] = measured_rate(model, plan, state.address, repeats, new, streams)
                        except ShardwiseError as e:  # e.g. the node refuses what does not fit
                            print(f"  [{name}] {split} did not run: {e}")
                            seen[layout, streams] = None
                    row["measured"] = seen[layout, streams]
                rows.append(row)
        return rows
    finally:
        lab.down(state)


def order(rows: list[dict]) -> float:
    """Kendall's tau between the predicted and measured rates of distinct plans."""
    distinct = list({(r["predicted"], r["measured"]) for r in rows})
    if len(distinct) < 2:
        return math.nan
    return kendalltau([p for p, _ in distinct], [m for _, m in distinct]).statistic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--objectives", default="latency,throughput")
    parser.add_argument("--out", default=None, help="Folder for the profiles, cluster files and Gantt charts.")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the lab keeps Ray's token auth on (set before Ray loads)
    work = Path(args.out or tempfile.mkdtemp(prefix="hetero-"))
    work.mkdir(parents=True, exist_ok=True)
    objectives, names = args.objectives.split(","), args.layouts.split(",")
    # (a layout takes ~15 minutes: an earlier run's rows in --out are kept for the layouts not run again)
    saved = work / "rows.json"
    rows = [r for r in json.loads(saved.read_text()) if r["layout"] not in names] if saved.exists() else []
    if rows:
        print(f"  kept from an earlier run in {work}: {', '.join(dict.fromkeys(r['layout'] for r in rows))}")
    for name in names:
        rows += run_layout(name, LAYOUTS[name], work, args.repeats, args.new_tokens, objectives)
        saved.write_text(json.dumps(rows))

    print(f"\nSmolLM2-135M fp32 on lab layouts, decode tokens/s (latency: 1 greedy stream; throughput: "
          f"{STREAMS['throughput']}), medians of {args.repeats}")
    print(f"{'layout':<11} {'objective':<10} {'split':<38} {'stages':<34} {'predicted':>9} {'measured':>9} "
          f"{'error':>7}")
    for r in rows:
        predicted = "no fit" if r["predicted"] is None else f"{r['predicted']:.1f}"
        measured = "-" if r["measured"] is None else f"{r['measured']:.1f}"
        error = (f"{100 * (r['predicted'] / r['measured'] - 1):+.0f} %" if r["predicted"] and r["measured"]
                 else "")
        print(f"{r['layout']:<11} {r['objective']:<10} {r['split']:<38} {r['stages']:<34} {predicted:>9} "
              f"{measured:>9} {error:>7}")
    print()
    for name, objective in dict.fromkeys((r["layout"], r["objective"]) for r in rows):
        ran = [r for r in rows if (r["layout"], r["objective"]) == (name, objective) and r["measured"]]
        dp = next(r for r in ran if r["split"] == "shardwise DP")
        others = [r for r in ran if r["stages"] != dp["stages"]]
        best = max(others, key=lambda r: r["measured"], default=None)
        versus = f"{dp['measured'] / best['measured']:.2f}x the best other split ({best['split']})" if best \
            else "every baseline chose the same split"
        share = dp["measured"] / max(r["measured"] for r in ran)
        standing = "the fastest" if share >= 1 else f"{share:.2f} of the fastest"
        print(f"{name}, {objective}: the DP's plan measured {dp['measured']:.1f} tok/s, {versus}; {standing}; "
              f"Kendall's tau {order(ran):.2f}")
    pairs = [(r["predicted"], r["measured"]) for r in rows if r["predicted"] and r["measured"]]
    tau = order([r for r in rows if r["predicted"] and r["measured"]])
    errors = [abs(math.log(p / m)) for p, m in pairs]
    print(f"Kendall's tau, predicted vs measured order over every plan that ran: {tau:.2f}")
    print(f"predicted vs measured tokens/s: {100 * (math.exp(statistics.fmean(errors)) - 1):.1f} % geomean error")
    print(f"profiles, cluster files and Gantt charts: {work}")


if __name__ == "__main__":
    main()
