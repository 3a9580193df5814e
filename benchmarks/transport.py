"""Two real stage actors, two transports: ObjectRef chaining vs a Ray Compiled Graph.

Times one decode step (batch 1 and 16 sequences) through a 2-stage SmolLM2 pipeline
both ways, on fresh actors each, medians over steps, and prints the ratio
(compiled / ObjectRefs; > 1 means the compiled graph is faster).

    python benchmarks/transport.py [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from side_by_side import print_ratio_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    import ray
    from ray.dag import InputNode

    from shardwise import SamplingParams
    from shardwise.cluster.stage import StageActor
    from shardwise.model.registry import DEFAULT_MODEL, resolve
    from shardwise.model.weights import open_weights
    from shardwise.planner.plan import Plan

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    path = resolve(DEFAULT_MODEL)
    spec = open_weights(path).spec
    cores = os.cpu_count() or 1
    greedy = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)

    def fresh_stages(batch: int):
        layers = [s.layers for s in Plan.even(spec, 2).stages]
        stages = [StageActor.remote() for _ in layers]
        ray.get([s.load.remote(str(path), span, "cpu", "float32") for s, span in zip(stages, layers, strict=True)])
        ids = list(range(batch))
        for stage in stages:
            ray.get([stage.add.remote(i, greedy, [], None) for i in ids])
        prompt = [[100 + i] * 16 for i in ids]
        ref = None
        for stage in stages:
            ref = stage.step.remote(ids, prompt, [True] * batch, ref, (cores,))
        return stages, ids, ray.get(ref)

    def refs_step(stages, ids, tokens):
        ref = None
        for stage in stages:
            ref = stage.step.remote(ids, [[t] for t in tokens], [True] * len(ids), ref, (cores,))
        return ray.get(ref)

    rows = []
    for batch in (1, 16):
        timings = {}
        for name in ("ObjectRefs", "compiled graph"):
            stages, ids, tokens = fresh_stages(batch)
            if name == "compiled graph":
                with InputNode() as inp:
                    hidden = stages[0].step.bind(inp[0], inp[1], inp[2], None, inp[3])
                    out = stages[1].step.bind(inp[0], inp[1], inp[2], hidden, inp[3])
                dag = out.experimental_compile()

                def step(tokens, dag=dag, ids=ids):
                    return ray.get(dag.execute(ids, [[t] for t in tokens], [True] * len(ids), (cores,)))
            else:
                def step(tokens, stages=stages, ids=ids):
                    return refs_step(stages, ids, tokens)
            for _ in range(3):  # warm up (a compiled graph's first run is slow)
                tokens = step(tokens)
            samples = []
            for _ in range(args.steps):
                start = time.perf_counter()
                tokens = step(tokens)
                samples.append(time.perf_counter() - start)
            timings[name] = statistics.median(samples) * 1000
            if name == "compiled graph":
                dag.teardown()
            for stage in stages:
                ray.kill(stage)
        refs, compiled = timings["ObjectRefs"], timings["compiled graph"]
        rows.append((f"batch {batch:>2} step (ms)", refs, compiled, refs / compiled))
    ray.shutdown()

    title = f"2-stage SmolLM2-135M pipeline, fp32, {cores} cores, medians of {args.steps} steps"
    print_ratio_table(title, ("ObjectRefs", "compiled"), rows)


if __name__ == "__main__":
    main()
