"""shardwise serve vs HF transformers batch generation, same weights, same workload, one run.

The workload has ShareGPT-like prompt and output lengths (scaled down for a small
machine). shardwise is a real `shardwise serve` process loaded over HTTP at
concurrency 1, 8 and 32 (continuous batching: a finished request's slot is refilled
at the next step). HF transformers runs the same requests in static batches of the
same size (left-padded, each batch until its longest output), counting only the
tokens each request asked for. Aggregate generated tokens/s, medians over repeats,
the two sides interleaved; ratio > 1 favours shardwise. Target: at concurrency 32,
>= 3x HF's batch-32 aggregate.

    python benchmarks/serve.py [--batches 4] [--scale 0.25] [--repeats 3] [--threads 2] [--dtype int4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from server import start_server
from side_by_side import print_ratio_table

from shardwise.loadtest.load import run_load
from shardwise.loadtest.workload import BenchRequest, sharegpt_like


def hf_batches(model, work: list[BenchRequest], batch: int) -> int:
    """Static batching: left-padded prompts, each batch generating until its longest output.
    Returns the tokens the requests asked for (the useful ones)."""
    for i in range(0, len(work), batch):
        group = work[i : i + batch]
        width = max(len(r.prompt) for r in group)
        ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in group])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in group])
        longest = max(r.output_tokens for r in group)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                           do_sample=False, pad_token_id=0)
    return sum(r.output_tokens for r in work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4,
                        help="requests per concurrency level, in multiples of it (at least 8 requests)")
    parser.add_argument("--scale", type=float, default=0.25, help="of ShareGPT's mean lengths (161 in, 338 out)")
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--dtype", default="float32", help="the server's weights (HF runs fp32 either way; int4 "
                                                          "runs the GGUF's own blocks, the same weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from shardwise.model.registry import DEFAULT_MODEL, resolve

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = resolve(DEFAULT_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    server, url = start_server("--threads", str(args.threads), "--dtype", args.dtype)
    try:
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            # several batches' worth, so that the last requests' drain does not dominate the run
            sessions = sharegpt_like(max(8, args.batches * c), scale=args.scale, seed=c, max_output=args.max_output)
            work = [request for request, in sessions]
            ours, theirs = [], []
            for _ in range(args.repeats):  # interleaved, so the machine's drift hits both alike
                _, results, wall = run_load(url, sessions, concurrency=c)
                ours.append(sum(r.output_tokens for r in results) / wall)
                start = time.perf_counter()
                useful = hf_batches(hf, work, c)
                theirs.append(useful / (time.perf_counter() - start))
            a, b = statistics.median(ours), statistics.median(theirs)
            rows.append((f"concurrency {c:>2} (tok/s)", a, b, a / b))
            print(f"concurrency {c}: shardwise {ours}, HF {theirs}", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    mean_in = statistics.mean(len(r.prompt) for r in work)
    mean_out = statistics.mean(r.output_tokens for r in work)
    title = (f"SmolLM2-135M ({args.dtype} served, HF fp32), {args.threads} threads ({os.cpu_count()} cores), "
             f"ShareGPT-like x{args.scale} "
             f"(mean {mean_in:.0f} in / {mean_out:.0f} out), medians of {args.repeats}: "
             f"shardwise serve (HTTP, continuous batching) vs HF static batches")
    print_ratio_table(title, ("shardwise", "HF"), rows)


if __name__ == "__main__":
    main()
