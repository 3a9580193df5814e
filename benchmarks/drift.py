"""The closed loop, run: a lab node's CPU quota is cut in half while 8 requests stream, and
the pipeline re-plans; its throughput after the re-plan against a fresh plan for the new speeds.

On a lab of a full core ("fast") and half a core ("slow"), profiled with `profile --address`:
  undisturbed  the throughput plan serves 8 greedy sequences at once
  disturbed    the same, with the fast node's quota halved once a third of the tokens are out:
               every sequence must finish with the undisturbed text, after one re-plan
  after        the same load again on the re-planned pipeline (the new speeds, steady)
  fresh        the lab re-profiled at its new speeds, planned and run from scratch, same load
Prints each run's tokens/s, the re-plan's events, and after / fresh (the target: within 15 %).

    sudo python benchmarks/drift.py [--tokens 96] [--window 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import yaml

from shardwise.lab import lab
from shardwise.lab.spec import LabSpec

MODEL = "smollm2-135m"
NODES = [{"name": "fast", "cpus": 1.0, "memory_gb": 2, "link": {"rate_mbit": 1000}},
         {"name": "slow", "cpus": 0.5, "memory_gb": 2, "link": {"rate_mbit": 1000}}]
PROMPTS = [f"Write a short story about {thing}." for thing in
           ("a lighthouse", "a fox", "the sea", "a robot", "a garden", "a train", "the moon", "a violin")]


def profiled_cluster(model: str, address: str, work: Path, name: str) -> Path:
    from shardwise.perf.cluster_profile import profile_cluster
    from shardwise.planner.topology import cluster_file

    profile = profile_cluster(model, "cpu", address, quick=True)
    (work / f"{name}.json").write_text(json.dumps(profile))
    path = work / f"{name}-cluster.yaml"
    path.write_text(yaml.safe_dump(cluster_file(profile, f"{name}.json")))
    return path


def run(llm, tokens: int, during=None) -> tuple[list[str], float]:
    """The 8 sequences at once: their texts and tokens/s; during(): called on a thread meanwhile."""
    from shardwise import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    thread = threading.Thread(target=during, daemon=True) if during else None
    start = time.perf_counter()
    if thread:
        thread.start()
    outputs = llm.generate(PROMPTS, params)
    seconds = time.perf_counter() - start
    if thread:
        thread.join()
    return [o.text for o in outputs], len(PROMPTS) * tokens / seconds


def main() -> None:
    from shardwise import LLM
    from shardwise.model.registry import resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--window", type=float, default=4.0, help="The drift window, seconds.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of the steady loads (medians).")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    work = Path(tempfile.mkdtemp(prefix="drift-"))
    model = str(lab.readable_by_nodes(resolve(MODEL), work))
    state = lab.up(LabSpec.model_validate({"nodes": NODES}), progress=lambda what: print(f"  {what}"))
    try:
        print("  profiling the lab")
        cluster = profiled_cluster(model, state.address, work, "before")
        options = dict(cluster=str(cluster), objective="throughput", address=state.address, dtype="int4",
                       spare_stages=True, drift_window_s=args.window)
        with LLM(model, **options) as llm:
            print("  plan:", [(s["layers"], s["node"][:8]) for s in llm.stages()])
            run(llm, 8)  # warm-up
            undisturbed, rate = run(llm, args.tokens)
            print(f"  undisturbed: {rate:.1f} tokens/s")

            def cut() -> None:
                time.sleep(0.33 * args.tokens * len(PROMPTS) / rate)
                lab.set_cpus("fast", 0.5)
                print("  fast node cut to half a core")

            disturbed, rate = run(llm, args.tokens, cut)
            print(f"  disturbed: {rate:.1f} tokens/s; texts identical: {disturbed == undisturbed}; "
                  f"re-plans: {llm.load().replans}")
            for event in llm.events():
                print(f"    {event['kind']}: {event['message']}")
            print("  plan now:", [(s["layers"], s["node"][:8]) for s in llm.stages()])
            after = statistics.median(run(llm, args.tokens)[1] for _ in range(args.repeats))
            print(f"  after the re-plan: {after:.1f} tokens/s")
        print("  re-profiling the lab at its new speeds")
        fresh_cluster = profiled_cluster(model, state.address, work, "after")
        with LLM(model, **(options | {"cluster": str(fresh_cluster), "drift_threshold": 0})) as llm:
            print("  fresh plan:", [(s["layers"], s["node"][:8]) for s in llm.stages()])
            run(llm, 8)
            fresh = statistics.median(run(llm, args.tokens)[1] for _ in range(args.repeats))
        print(f"  fresh plan: {fresh:.1f} tokens/s")
        print(f"\nafter the re-plan / fresh plan: {after / fresh:.2f} (target >= 0.85)")
    finally:
        lab.down(state)


if __name__ == "__main__":
    main()
