"""Drafting on the driver, verifying through a pipeline: does overlapping drafting with
verification (PipeInfer's idea) help on this machine? Two local Ray stages (fp32), int4 drafts
made in the driver's process; 2 sequences decoding together. With one micro-batch the driver
drafts, then the stages verify, in turn; with two, the driver drafts for one sequence while
the other's verification runs through the stages. Decode tokens/s (after the first token) of
each beside plain decoding, medians over --rounds, the engines taking turns.

    python benchmarks/speculative_pipeline.py [--rounds 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import statistics

import ray
from side_by_side import print_ratio_table
from speculative import PROMPTS, run

from shardwise import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    engines = {
        "plain, 2 micro-batches": LLM(stages=2, dtype="float32", micro_batches=2),
        "int4 drafts, in turn": LLM(stages=2, dtype="float32", micro_batches=1, speculative="int4"),
        "int4 drafts, overlapped": LLM(stages=2, dtype="float32", micro_batches=2, speculative="int4"),
    }
    try:
        rows = []
        for label, prompt in PROMPTS.items():
            for llm in engines.values():
                run(llm, prompt, 2, 16)  # warm up
            first = {name: statistics.median(run(llm, prompt, 2, 1)[0] for _ in range(args.rounds))
                     for name, llm in engines.items()}
            times, outputs = {name: [] for name in engines}, {}
            for _ in range(args.rounds):
                for name, llm in engines.items():
                    seconds, outputs[name] = run(llm, prompt, 2, args.max_tokens)
                    times[name].append(seconds)
            generated = sum(map(len, outputs["plain, 2 micro-batches"]))
            speed = {name: (generated - 2) / (statistics.median(times[name]) - first[name]) for name in engines}
            plain = speed["plain, 2 micro-batches"]
            for name in list(engines)[1:]:
                same = outputs[name] == outputs["plain, 2 micro-batches"]
                rows.append((f"{label}: {name} (identical: {same})", speed[name], plain, speed[name] / plain))
        print_ratio_table(f"2 local Ray stages, fp32, 2 sequences, greedy, {args.max_tokens} tokens, decode tokens/s, "
                          f"medians of {args.rounds}", ("speculative", "plain"), rows)
    finally:
        for llm in engines.values():
            llm.close()
        ray.shutdown()


if __name__ == "__main__":
    main()
