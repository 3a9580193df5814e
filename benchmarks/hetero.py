"""The DP's plan against every baseline split, each *run* on an emulated heterogeneous cluster
(shardwise lab), with the estimator's prediction beside each measurement.

Three lab layouts, each stressing one thing:
  slow-node   a full core and a quarter of one: the slow node only slows the pipeline
  small-fast  a full core offering 0.45 GB (fp32 SmolLM2-135M does not fit) beside a half core:
              memory decides
  slow-link   three nodes, one behind a 1 Mbit/s link: a good split does not cross it
For each: the lab comes up, `profile --address` measures its nodes and links, the planner
plans over the cluster file it wrote (latency objective, decode at batch 1), and the DP's plan
and every baseline (even as vLLM, memory-proportional as exo and llama.cpp, FLOPS-proportional as
Cake, greedy fastest-first) are run on the lab: tokens/s of one greedy stream, medians over
repeats. Prints each plan's predicted and measured rate, the DP against the best baseline, and
Kendall's tau between predicted and measured order; writes each layout's Gantt chart of the
DP's plan.

    sudo python benchmarks/hetero.py [--repeats 3] [--new-tokens 24] [--layouts slow-node,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from scipy.stats import kendalltau

from shardwise import ShardwiseError
from shardwise.lab import lab
from shardwise.lab.spec import LabSpec
from shardwise.model.catalog import load_spec
from shardwise.planner import baselines, display
from shardwise.planner.partition import PlanResult, solve
from shardwise.planner.topology import Cluster, cluster_file, cost_table, plan_cluster, to_plan

MODEL = "smollm2-135m"
KV_TOKENS = 2048  # every stage's KV budget (plans and runs alike): small, so memory is the weights
PROMPT = "Write a short story about a lighthouse keeper."
LAYOUTS = {
    "slow-node": [{"name": "fast", "cpus": 1.0, "memory_gb": 2, "link": {"rate_mbit": 1000}},
                  {"name": "slow", "cpus": 0.25, "memory_gb": 2, "link": {"rate_mbit": 1000}}],
    "small-fast": [{"name": "small", "cpus": 1.0, "memory_gb": 0.45, "link": {"rate_mbit": 1000}},
                   {"name": "big", "cpus": 0.5, "memory_gb": 2, "link": {"rate_mbit": 1000}}],
    "slow-link": [{"name": "a", "cpus": 0.5, "memory_gb": 0.45, "link": {"rate_mbit": 1000}},
                  {"name": "b", "cpus": 0.5, "memory_gb": 2, "link": {"rate_mbit": 1}},
                  {"name": "c", "cpus": 0.45, "memory_gb": 2, "link": {"rate_mbit": 1000}}],
}


def measured_rate(plan, address: str, repeats: int, new: int) -> float:
    """Decode tokens/s of one greedy stream: (new - 1) extra tokens over a 1-token run's time."""
    from shardwise import LLM, SamplingParams

    with LLM(MODEL, plan=plan, address=address, dtype="float32", kv_tokens=KV_TOKENS) as llm:
        def seconds(n: int) -> float:
            start = time.perf_counter()
            llm.generate(PROMPT, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            return time.perf_counter() - start

        seconds(new)  # warm-up
        rates = [(new - 1) / max(seconds(new) - seconds(1), 1e-9) for _ in range(repeats)]
    return statistics.median(rates)


def run_layout(name: str, nodes: list[dict], work: Path, repeats: int, new: int) -> list[dict]:
    from shardwise.perf.cluster_profile import profile_cluster

    spec = load_spec(MODEL)
    state = lab.up(LabSpec.model_validate({"nodes": nodes}), progress=lambda what: print(f"  [{name}] {what}"))
    try:
        print(f"  [{name}] profiling the nodes and links (sustained)")
        profile = profile_cluster(MODEL, "cpu", state.address, quick=True)
        (work / f"{name}.json").write_text(json.dumps(profile))
        (work / f"{name}-cluster.yaml").write_text(yaml.safe_dump(cluster_file(profile, f"{name}.json")))
        cluster = Cluster.load(work / f"{name}-cluster.yaml")
        table = cost_table(spec, cluster, kv_tokens=KV_TOKENS)
        dp = solve(table, "latency")
        flops = [d.spec.peak_flops(d.spec.default_dtype) for d in cluster.devices]
        splits = {"shardwise DP": dp.stages, "even (vLLM)": baselines.even(table),
                  "memory-proportional (exo, llama.cpp)": baselines.memory_proportional(table),
                  "FLOPS-proportional (Cake)": baselines.flops_proportional(table, flops),
                  "greedy fastest-first": baselines.greedy_fastest(table)}
        _, summary = plan_cluster(spec, cluster, "latency", kv_tokens=KV_TOKENS)
        display.plot_gantt(summary, work / f"{name}-gantt.png")
        rows, seen = [], {}
        for split, stages in splits.items():
            layout = ", ".join(f"{cluster.devices[d].name}:{a}-{b}" for d, a, b in stages)
            predicted = baselines.evaluate(table, stages, "latency")
            row = {"layout": name, "split": split, "stages": layout,
                   "predicted": None if predicted is None else 1 / predicted, "measured": None}
            if predicted is not None:
                if layout not in seen:
                    print(f"  [{name}] running {split}: {layout}")
                    plan = to_plan(PlanResult(predicted, stages, "latency"), cluster)
                    try:
                        seen[layout] = measured_rate(plan, state.address, repeats, new)
                    except ShardwiseError as e:  # e.g. the node refuses what does not fit
                        print(f"  [{name}] {split} did not run: {e}")
                        seen[layout] = None
                row["measured"] = seen[layout]
            rows.append(row)
        return rows
    finally:
        lab.down(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--out", default=None, help="Folder for the profiles, cluster files and Gantt charts.")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the lab keeps Ray's token auth on (set before Ray loads)
    work = Path(args.out or tempfile.mkdtemp(prefix="hetero-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.layouts.split(","):
        rows += run_layout(name, LAYOUTS[name], work, args.repeats, args.new_tokens)

    print(f"\nSmolLM2-135M fp32 on lab layouts, decode of one greedy stream (tokens/s), medians of {args.repeats}")
    print(f"{'layout':<11} {'split':<38} {'stages':<34} {'predicted':>9} {'measured':>9} {'error':>7}")
    for r in rows:
        predicted = "no fit" if r["predicted"] is None else f"{r['predicted']:.1f}"
        measured = "-" if r["measured"] is None else f"{r['measured']:.1f}"
        error = (f"{100 * (r['predicted'] / r['measured'] - 1):+.0f} %" if r["predicted"] and r["measured"]
                 else "")
        print(f"{r['layout']:<11} {r['split']:<38} {r['stages']:<34} {predicted:>9} {measured:>9} {error:>7}")
    print()
    pairs = [(r["predicted"], r["measured"]) for r in rows if r["predicted"] and r["measured"]]
    for name in dict.fromkeys(r["layout"] for r in rows):
        ran = [r for r in rows if r["layout"] == name and r["measured"]]
        dp = next(r for r in ran if r["split"] == "shardwise DP")
        others = [r for r in ran if r["stages"] != dp["stages"]]
        best = max(others, key=lambda r: r["measured"], default=None)
        versus = f"{dp['measured'] / best['measured']:.2f}x the best other split ({best['split']})" if best \
            else "every baseline chose the same split"
        share = dp["measured"] / max(r["measured"] for r in ran)
        standing = "the fastest" if share >= 1 else f"{share:.2f} of the fastest"
        print(f"{name}: the DP's plan measured {dp['measured']:.1f} tok/s, {versus}; {standing}")
    distinct = list({(p, m) for p, m in pairs})
    tau = kendalltau([p for p, _ in distinct], [m for _, m in distinct]).statistic if len(distinct) > 1 else math.nan
    errors = [abs(math.log(p / m)) for p, m in pairs]
    print(f"Kendall's tau, predicted vs measured order over every plan that ran: {tau:.2f}")
    print(f"predicted vs measured tokens/s: {100 * (math.exp(statistics.fmean(errors)) - 1):.1f} % geomean error")
    print(f"profiles, cluster files and Gantt charts: {work}")


if __name__ == "__main__":
    main()
