"""Pipeline of 1, 2 and 3 local Ray stages vs the one-process engine, in one run.

Decode tokens/s at batch 1 and with 16 concurrent sequences (fp32, SmolLM2-135M),
medians over repeats with each pipeline's runs interleaved with the one-process
engine's, and the ratio pipeline / one process.

    python benchmarks/pipeline.py [--repeats 3] [--new-tokens 32] [--stage-threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from side_by_side import print_ratio_table


def decode_rate(llm, ids: list[list[int]], new: int) -> float:
    from shardwise import SamplingParams

    def run(n: int) -> float:
        start = time.perf_counter()
        llm.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        return time.perf_counter() - start

    # the extra tokens of an n-token run over a 1-token run: prefill cancels out
    return len(ids) * (new - 1) / (run(new) - run(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--stage-threads", type=int, default=None,
                        help="torch threads per stage (default: the node's cores shared among its stages)")
    args = parser.parse_args()

    import ray

    from shardwise import LLM
    from shardwise.planner.plan import Plan

    cores = os.cpu_count() or 1
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    one = LLM(dtype="float32", threads=cores)
    gen = torch.Generator().manual_seed(0)
    workloads = {batch: torch.randint(100, 40000, (batch, 16), generator=gen).tolist() for batch in (1, 16)}
    rows = []
    for stages in (1, 2, 3):
        plan = Plan.even(one.spec, stages, threads=args.stage_threads)
        pipe = LLM(plan=plan, dtype="float32")
        for batch, ids in workloads.items():
            decode_rate(pipe, ids, 4), decode_rate(one, ids, 4)  # warm up
            ours, base = [], []
            for _ in range(args.repeats):
                ours.append(decode_rate(pipe, ids, args.new_tokens))
                base.append(decode_rate(one, ids, args.new_tokens))
            p, b = statistics.median(ours), statistics.median(base)
            rows.append((f"{stages} stage{'s' if stages > 1 else ''}, batch {batch:>2}", p, b, p / b))
        pipe.close()
    ray.shutdown()

    threads = args.stage_threads or f"{cores} cores shared"
    title = f"SmolLM2-135M fp32 decode tokens/s, {cores} cores, stage threads: {threads}, medians of {args.repeats}"
    print_ratio_table(title, ("pipeline", "one process"), rows)


if __name__ == "__main__":
    main()
