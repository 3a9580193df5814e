"""Disaggregated prefill against colocated chunked prefill, on the same cores (#28 item 5).

Long prompts (--prompt-min to --prompt-max tokens, random ids, so nothing is cached) arrive
every --interval seconds while --decoding slots decode: each sends greedy requests of
--decode-tokens tokens, the next as the last ends (as a chat server's short replies come).
A real `shardwise serve --dtype int4` runs it twice, the layouts taking turns over --rounds:
  colocated     one stage on all the cores; each prompt's chunks join the decode steps under
                the server's token budget (--max-batch-tokens, chunked prefill);
  disaggregated `--stages 1 --prefill-stages 1`: a prefill pool and a decode pool of one stage
                each, splitting the cores; a prompt's KV moves to the decode pool after its
                first token.
Measured over the window from the first long prompt's arrival to the last one's end: the
decode requests' inter-token latency (ITL: every gap between two tokens) p50 and p99, their
TPOT p99 (each whole request's mean gap, as vLLM's benchmark counts it: the requests that
meet a prompt's chunks make the tail), the long prompts' TTFT p50 and p99, and the decode
tokens/s. Beside each, the estimator's prediction (shardwise.perf.disaggregation) from
profiles of this machine at all its cores and at half of them (`--profiles ALL.json
HALF.json`, or profiled here, quick). A ratio > 1 favours disaggregation (for tokens/s,
equal is the target).

    python benchmarks/disaggregation.py [--rounds 2] [--decoding 16] [--decode-tokens 64] [--prompts 5] [--interval 25]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
from server import start_server
from side_by_side import print_ratio_table

MODEL = "smollm2-135m"
LONG_OUTPUT = 8  # tokens each long prompt generates
LAYOUTS = {"colocated": ("--stages", "1"), "disaggregated": ("--stages", "1", "--prefill-stages", "1")}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(url: str, args: argparse.Namespace, round_: int) -> dict[str, float]:
    """One layout's run: the decoding slots, then the long prompts; their measures."""
    rng = random.Random(round_)
    requests: list[list[float]] = []  # each decode request's token arrival times
    ready: set[int] = set()  # the slots whose first request decodes
    ttfts, window = [], []

    async def decoding(i: int, http: httpx.AsyncClient) -> None:
        """One slot: decode requests of --decode-tokens tokens, each sent as the last ends."""
        for n in itertools.count():
            times: list[float] = []
            requests.append(times)
            body = {"model": MODEL, "prompt": f"Write a long essay about the number {i + 100 * round_ + 10000 * n}.",
                    "max_tokens": args.decode_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "logprobs": 0}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"]
                        if choice and choice[0]["logprobs"]:
                            times.extend([time.perf_counter()] * len(choice[0]["logprobs"]["tokens"]))
                            if len(times) > 8:
                                ready.add(i)

    async def long_prompt(delay: float, http: httpx.AsyncClient) -> None:
        await asyncio.sleep(delay)
        ids = [rng.randrange(100, 40000) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
        body = {"model": MODEL, "prompt": ids, "max_tokens": LONG_OUTPUT, "temperature": 0, "stream": True}
        sent = time.perf_counter()
        window.append(sent)
        first = None
        async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter()
        ttfts.append(first - sent)
        window.append(time.perf_counter())

    async with httpx.AsyncClient(timeout=1200, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        slots = [asyncio.create_task(decoding(i, http)) for i in range(args.decoding)]
        while len(ready) < args.decoding:  # every slot decoding
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        await asyncio.gather(*(long_prompt(k * args.interval, http) for k in range(args.prompts)))
        for slot in slots:
            slot.cancel()
        await asyncio.gather(*slots, return_exceptions=True)
    start, end = min(window), max(window)
    gaps, tpots, tokens = [], [], 0
    for times in requests:
        inside = [t for t in times if start <= t <= end]
        tokens += len(inside)
        mine = [b - a for a, b in zip(inside, inside[1:], strict=False) if b > a]
        gaps += mine
        if len(inside) == len(times) == args.decode_tokens:  # (a whole request inside the window)
            tpots.append((times[-1] - times[0]) / (len(times) - 1))
    return {"ITL p50 (ms)": 1e3 * percentile(gaps, 0.5), "ITL p99 (ms)": 1e3 * percentile(gaps, 0.99),
            "TPOT p99 (ms)": 1e3 * percentile(tpots, 0.99), "TTFT p50 (s)": percentile(ttfts, 0.5),
            "TTFT p99 (s)": percentile(ttfts, 0.99), "decode tokens/s": tokens / (end - start)}


def profiles(paths: list[str] | None) -> tuple:
    """This machine's device at all its cores and at half of them."""
    import torch

    from shardwise.perf.hardware import DeviceSpec
    from shardwise.perf.profile import profile_device

    if paths:
        return tuple(DeviceSpec.from_dict(json.loads(Path(p).read_text())["devices"][0]) for p in paths)
    cores, devices = os.cpu_count() or 2, []
    for threads in (cores, max(cores // 2, 1)):
        torch.set_num_threads(threads)
        print(f"profiling this machine at {threads} threads (quick)", file=sys.stderr, flush=True)
        devices.append(profile_device(MODEL, quick=True))  # (its int4 products are measured apart)
    return tuple(devices)


def predict(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from shardwise.model.registry import resolve
    from shardwise.model.weights import open_weights
    from shardwise.perf import disaggregation as d
    from shardwise.perf.operators import Precision

    whole, half = profiles(args.profiles)
    spec = open_weights(resolve(MODEL)).spec
    p = Precision("int4", "fp32", "fp32")
    context = 20 + args.decode_tokens // 2  # a decode request's mean: its prompt, and half its tokens
    w = d.Workload(args.decoding, context, (args.prompt_min + args.prompt_max) // 2, args.interval,
                   args.max_batch_tokens, LONG_OUTPUT)
    out = {}
    for name, layout in (("colocated", d.colocated(spec, whole, w, p)),
                         ("disaggregated", d.disaggregated(spec, half, half, w, p))):
        out[name] = {"ITL p50 (ms)": 1e3 * layout.itl_s(0.5), "ITL p99 (ms)": 1e3 * layout.itl_s(0.99),
                     "TPOT p99 (ms)": 1e3 * layout.request_tpot_s(0.99, args.decode_tokens),
                     "TTFT p50 (s)": layout.ttft_s,
                     "TTFT p99 (s)": layout.ttft_s, "decode tokens/s": args.decoding / layout.tpot_s}
        print(f"predicted {name}: {layout.to_dict()}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--decoding", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--interval", type=float, default=25.0)
    parser.add_argument("--prompt-min", type=int, default=1024)
    parser.add_argument("--prompt-max", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=64, help="each decode request's tokens")
    parser.add_argument("--max-batch-tokens", type=int, default=256)
    parser.add_argument("--profiles", nargs=2, metavar=("ALL", "HALF"), help="`shardwise profile` files")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in LAYOUTS}
    for r in range(args.rounds):
        for name, flags in LAYOUTS.items():
            server, url = start_server(*flags, "--dtype", "int4", "--kv-tokens", "32768",
                                       "--max-batch-tokens", str(args.max_batch_tokens), "--max-num-seqs", "64")
            try:
                results[name].append(asyncio.run(run(url, args, r)))
            finally:
                server.terminate()
                server.wait(timeout=60)
            print(f"round {r}, {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    med = {name: {k: statistics.median(m[k] for m in runs) for k in runs[0]} for name, runs in results.items()}
    predicted = predict(args)
    rows = []
    for key in med["colocated"]:
        for label, sides in ((key, med), ("  predicted", predicted)):
            co, dis = sides["colocated"][key], sides["disaggregated"][key]
            rows.append((label, co, dis, dis / co if key.endswith("tokens/s") else co / dis))
    print_ratio_table(f"{args.prompts} prompts of {args.prompt_min}-{args.prompt_max} tokens, one every "
                      f"{args.interval:g} s, while {args.decoding} slots decode requests of {args.decode_tokens} "
                      f"tokens (SmolLM2-135M int4, "
                      f"{os.cpu_count()} cores, --max-batch-tokens {args.max_batch_tokens}), medians of {args.rounds}",
                      ("colocated", "disaggregated"), rows)


if __name__ == "__main__":
    main()
