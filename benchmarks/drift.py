"""The closed loop, run: a lab node's CPU quota is cut in half while 8 requests stream, and
the pipeline re-plans; its throughput after the re-plan against a fresh plan for the new speeds.

On a lab of a full core ("fast") and half a core ("slow"), profiled with `profile --address`:
  undisturbed  the throughput plan serves 8 greedy sequences at once
  disturbed    the same, with the fast node's quota halved once a third of the tokens are out:
               every sequence must finish with the undisturbed text, after one re-plan
  after        the same load again on the re-planned pipeline (the new speeds, steady)
  fresh        the lab re-profiled at its new speeds, planned and run from scratch, same load
Prints each run's tokens/s, the re-plan's events, and after / fresh (the target: within 15 %).

--layout tensor-parallel: two one-core nodes ("a", "b") and a Llama-3.2-1B-shaped Q4_0 model
(benchmarks/bandwidth.py's), one greedy stream, the latency plan: the planner splits every layer
between the nodes, and node b's quota is cut to 0.4 of a core. Each device of the split stage
is judged by its own seconds (without the sums where it waits for the other).

    sudo python benchmarks/drift.py [--layout pipeline|tensor-parallel] [--tokens 96] [--window 4]
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

PROMPTS = [f"Write a short story about {thing}." for thing in
           ("a lighthouse", "a fox", "the sea", "a robot", "a garden", "a train", "the moon", "a violin")]


def node(name: str, cpus: float, memory_gb: float) -> dict:
    return {"name": name, "cpus": cpus, "memory_gb": memory_gb, "link": {"rate_mbit": 1000}}


# per layout: the lab's nodes, the objective, how many streams at once, the node cut and its new cores
LAYOUTS = {
    "pipeline": ([node("fast", 1.0, 2), node("slow", 0.5, 2)], "throughput", 8, ("fast", 0.5)),
    "tensor-parallel": ([node("a", 1.0, 3), node("b", 1.0, 3)], "latency", 1, ("b", 0.4)),
}


def profiled_cluster(model: str, address: str, work: Path, name: str) -> Path:
    from shardwise.perf.cluster_profile import profile_cluster
    from shardwise.planner.topology import cluster_file

    profile = profile_cluster(model, "cpu", address, quick=True)
    (work / f"{name}.json").write_text(json.dumps(profile))
    path = work / f"{name}-cluster.yaml"
    path.write_text(yaml.safe_dump(cluster_file(profile, f"{name}.json")))
    return path


def run(llm, streams: int, tokens: int, during=None) -> tuple[list[str], float]:
    """The sequences at once: their texts and tokens/s; during(): called on a thread meanwhile."""
    from shardwise import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    thread = threading.Thread(target=during, daemon=True) if during else None
    start = time.perf_counter()
    if thread:
        thread.start()
    outputs = llm.generate(PROMPTS[:streams], params)
    seconds = time.perf_counter() - start
    if thread:
        thread.join()
    return [o.text for o in outputs], streams * tokens / seconds


def main() -> None:
    from shardwise import LLM
    from shardwise.model.registry import DEFAULT_MODEL, resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="pipeline", choices=list(LAYOUTS))
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--window", type=float, default=4.0, help="The drift window, seconds.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of the steady loads (medians).")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    nodes, objective, streams, (cut_node, cut_cpus) = LAYOUTS[args.layout]
    work = Path(tempfile.mkdtemp(prefix="drift-"))
    profiled = str(lab.readable_by_nodes(resolve(DEFAULT_MODEL), work))
    if args.layout == "tensor-parallel":  # (profiled on the default model: the 1B's profile outgrows a node)
        from bandwidth import write_model

        model = str(lab.readable_by_nodes(Path(write_model("1b", "Q4_0")), work))
    else:
        model = profiled
    state = lab.up(LabSpec.model_validate({"nodes": nodes, "runtime_gb": 2.0}), progress=lambda w: print(f"  {w}"))
    try:
        print("  profiling the lab")
        cluster = profiled_cluster(profiled, state.address, work, "before")
        options = dict(cluster=str(cluster), objective=objective, address=state.address, dtype="int4",
                       spare_stages=True, drift_window_s=args.window)

        def stages(llm) -> list:
            return [(s["layers"], s["node"][:8]) for s in llm.stages()]

        with LLM(model, **options) as llm:
            print("  plan:", stages(llm), llm.executor.plan.to_dict())
            run(llm, streams, 8)  # warm-up
            undisturbed, rate = run(llm, streams, args.tokens)
            print(f"  undisturbed: {rate:.1f} tokens/s")

            def cut() -> None:
                time.sleep(0.33 * args.tokens * streams / rate)
                lab.set_cpus(cut_node, cut_cpus)
                print(f"  node {cut_node} cut to {cut_cpus} of a core")

            disturbed, rate = run(llm, streams, args.tokens, cut)
            print(f"  disturbed: {rate:.1f} tokens/s; texts identical: {disturbed == undisturbed}; "
                  f"re-plans: {llm.load().replans}")
            events = llm.events()
            for event in events:
                print(f"    {event['kind']}: {event['message']}")
            deadline = time.monotonic() + 300
            while llm.executor.moving and time.monotonic() < deadline:  # (a move still loading: let it land)
                run(llm, streams, 4)
            print("  plan now:", stages(llm), llm.executor.plan.to_dict())
            after = statistics.median(run(llm, streams, args.tokens)[1] for _ in range(args.repeats))
            for event in llm.events()[len(events):]:
                print(f"    {event['kind']}: {event['message']}")
            print(f"  after the re-plan: {after:.1f} tokens/s")
        print("  re-profiling the lab at its new speeds")
        fresh_cluster = profiled_cluster(profiled, state.address, work, "after")
        with LLM(model, **(options | {"cluster": str(fresh_cluster), "drift_threshold": 0})) as llm:
            print("  fresh plan:", stages(llm), llm.executor.plan.to_dict())
            run(llm, streams, 8)
            fresh = statistics.median(run(llm, streams, args.tokens)[1] for _ in range(args.repeats))
        print(f"  fresh plan: {fresh:.1f} tokens/s")
        print(f"\nafter the re-plan / fresh plan: {after / fresh:.2f} (target >= 0.85)")
    finally:
        lab.down(state)


if __name__ == "__main__":
    main()
