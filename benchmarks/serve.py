"""shardwise serve vs llama.cpp's llama-server, same GGUF, same workload, one run.

The workload has ShareGPT-like prompt and output lengths (scaled down for a small machine).
Both are real servers loaded over HTTP by the same client (`shardwise.loadtest`: streamed
/v1/completions, token-id prompts, outputs run to their length) at concurrency 1, 8 and 32:
`shardwise serve --dtype int4` (the GGUF's own Q4_1 / Q8_0 blocks) and `llama-server` with as
many slots as clients and continuous batching (`-np N -cb`; built from the llama.cpp sources
that llama-cpp-python's sdist vendors when none is on PATH, see llama_server.py). Aggregate
generated tokens/s, TTFT p50 and TPOT p50, medians over repeats, the two servers' runs
interleaved; every ratio > 1 favours shardwise (for times: theirs / ours). Targets (#27):
throughput >= 2x llama-server at concurrency 32 and >= 1.3x at 1, TPOT p50 no worse.

    python benchmarks/serve.py [--batches 4] [--scale 0.25] [--repeats 3] [--threads 2] [--dtype int4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from llama_server import start_llama_server
from server import start_server
from side_by_side import print_ratio_table

from shardwise.loadtest.load import run_load, summarize
from shardwise.loadtest.workload import sharegpt_like


def measure(url: str, sessions, concurrency: int) -> tuple[float, float, float]:
    """(generated tokens/s, TTFT p50, TPOT p50) of one pass of the workload."""
    _, results, wall = run_load(url, sessions, concurrency=concurrency)
    summary = summarize(results, wall)
    return summary["throughput_tok_s"], summary["ttft_s"]["p50"], summary["tpot_s"]["p50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4,
                        help="requests per concurrency level, in multiples of it (at least 8 requests)")
    parser.add_argument("--scale", type=float, default=0.25, help="of ShareGPT's mean lengths (161 in, 338 out)")
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--dtype", default="int4", help="shardwise's weights (int4: the GGUF's own blocks, "
                                                       "what llama-server runs)")
    args = parser.parse_args()

    from shardwise.model.registry import DEFAULT_MODEL, resolve

    ours, ours_url = start_server("--threads", str(args.threads), "--dtype", args.dtype)
    rows, work = [], []
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            # several batches' worth, so that the last requests' drain does not dominate the run; new prompts
            # each repeat (both servers cache prompts they have seen)
            passes = [sharegpt_like(max(8, args.batches * c), scale=args.scale, seed=100 * c + i,
                                    max_output=args.max_output) for i in range(args.repeats + 1)]
            work += [r for sessions in passes[1:] for s in sessions for r in s]  # (the measured ones)
            longest = max(len(r.prompt) + r.output_tokens for sessions in passes for s in sessions for r in s)
            theirs, theirs_url = start_llama_server(str(resolve(DEFAULT_MODEL)), args.threads, c, longest + 16)
            try:
                samples = {"shardwise": [], "llama-server": []}
                for url in (ours_url, theirs_url):  # warm up
                    measure(url, passes[0][:c], c)
                for sessions in passes[1:]:  # interleaved, so the machine's drift hits both alike
                    samples["shardwise"].append(measure(ours_url, sessions, c))
                    samples["llama-server"].append(measure(theirs_url, sessions, c))
            finally:
                theirs.terminate()
                theirs.wait(timeout=30)
            (a_rate, a_ttft, a_tpot), (b_rate, b_ttft, b_tpot) = (
                [statistics.median(run[i] for run in samples[side]) for i in range(3)] for side in samples)
            rows += [(f"concurrency {c:>2}: throughput (tok/s)", a_rate, b_rate, a_rate / b_rate),
                     (f"concurrency {c:>2}: TTFT p50 (ms)", 1e3 * a_ttft, 1e3 * b_ttft, b_ttft / a_ttft),
                     (f"concurrency {c:>2}: TPOT p50 (ms)", 1e3 * a_tpot, 1e3 * b_tpot, b_tpot / a_tpot)]
            print(f"concurrency {c}: {samples}", file=sys.stderr, flush=True)
    finally:
        ours.terminate()
        ours.wait(timeout=30)
    mean_in = statistics.mean(len(r.prompt) for r in work)
    mean_out = statistics.mean(r.output_tokens for r in work)
    title = (f"SmolLM2-135M Q4_1 GGUF, shardwise serve --dtype {args.dtype} vs llama-server -np N -cb, "
             f"{args.threads} threads ({os.cpu_count()} cores), ShareGPT-like x{args.scale} (mean {mean_in:.0f} in / "
             f"{mean_out:.0f} out), medians of {args.repeats}")
    print_ratio_table(title, ("shardwise", "llama-server"), rows)


if __name__ == "__main__":
    main()
