"""Prefix caching and preemptive scheduling, each against the engine without it, in one run.

1. chat: multi-turn conversations sharing a --system-tokens system prompt, each turn resending
   the conversation (`shardwise bench --workload chat`), against `shardwise serve` with and
   without `--no-prefix-cache`: TTFT p50 / p99, and the estimator's TTFT with and without the
   measured cached tokens (`shardwise estimate --cached`) beside.
2. mixed: a burst of short answers and a few very long ones (`--workload mixed`), more than the
   server's --max-num-seqs slots, in random order and with the long ones first
   (`--longs-first`), against `--policy fcfs` and `--policy mlfq`: job completion time
   (request latency) mean / p99, and throughput.
The two servers of each pair take turns, so the machine's drift hits both alike; medians over
--rounds; a ratio > 1 favours the feature.

    python benchmarks/scheduling.py [--rounds 3] [--dtype int4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics

import httpx
from server import start_server
from side_by_side import print_ratio_table

from shardwise.loadtest.load import run_load, summarize
from shardwise.loadtest.workload import chat, mixed
from shardwise.model.catalog import load_spec
from shardwise.perf.estimate import Deployment, estimate
from shardwise.perf.hardware import load_device

MODEL = "smollm2-135m"


def counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^shardwise:{name}{{[^}}]*}} (\S+)$", text, re.M).group(1))


def side_by_side(servers: dict[str, str], workload, concurrency: int, rounds: int) -> dict[str, list[dict]]:
    """Each server runs workload(round) for each round, taking turns; the summaries, by server."""
    runs = {name: [] for name in servers}
    for n in range(rounds):
        sessions = workload(n)
        for name, url in servers.items():
            hits, queries = counter(url, "prefix_cache_hits_total"), counter(url, "prefix_cache_queries_total")
            _, results, wall = run_load(url, sessions, concurrency=concurrency)
            hit = counter(url, "prefix_cache_hits_total") - hits
            runs[name].append({**summarize(results, wall), "cached_tokens": hit / len(results),
                               "hit_rate": hit / max(counter(url, "prefix_cache_queries_total") - queries, 1)})
    return runs


def median(runs: list[dict], *keys: str) -> float:
    values = []
    for run in runs:
        for key in keys:
            run = run[key]
        values.append(run)
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="x86-cpu", help="the estimator's device (catalog or profile file)")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=768)
    parser.add_argument("--chat-concurrency", type=int, default=4)
    parser.add_argument("--mixed-requests", type=int, default=32)
    parser.add_argument("--slots", type=int, default=4, help="the mixed run's --max-num-seqs")
    parser.add_argument("--long-output", type=int, default=256)
    parser.add_argument("--only", choices=("chat", "mixed"), help="run one of the two")
    args = parser.parse_args()
    common = ("--dtype", args.dtype, "--threads", str(args.threads))
    where = f"SmolLM2-135M {args.dtype}, one process, {args.threads} threads ({os.cpu_count()} cores)"

    if args.only != "mixed":
        prefix_caching(args, common, where)
    if args.only != "chat":
        preemption(args, common, where)


def prefix_caching(args: argparse.Namespace, common: tuple[str, ...], where: str) -> None:
    """1. prefix caching on a multi-turn chat"""
    def conversations(n: int):  # new ones each round (a round must not find the last one's in the cache)
        return chat(args.conversations * args.turns, turns=args.turns, system_tokens=args.system_tokens, scale=0.5,
                    seed=n, max_prompt=4096)

    servers = {}
    try:
        for name, flag in (("cached", "--prefix-cache"), ("uncached", "--no-prefix-cache")):
            servers[name] = start_server(*common, flag)
        runs = side_by_side({k: url for k, (_, url) in servers.items()}, conversations, args.chat_concurrency,
                            args.rounds)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    requests = [r for s in conversations(0) for r in s]
    prompt = round(statistics.mean(len(r.prompt) for r in requests))
    output = round(statistics.mean(r.output_tokens for r in requests))
    cached = round(median(runs["cached"], "cached_tokens"))
    spec, device = load_spec(MODEL), load_device(args.device)
    predicted = [estimate(spec, Deployment.single(spec, device), batch=args.chat_concurrency, input_tokens=prompt,
                          output_tokens=output, chunk=256, cached_tokens=c).ttft_s for c in (cached, 0)]
    rows = [(f"TTFT {q} (ms)", *(1e3 * median(runs[n], "ttft_s", q) for n in ("cached", "uncached")),
             median(runs["uncached"], "ttft_s", q) / median(runs["cached"], "ttft_s", q)) for q in ("p50", "p99")]
    rows.append((f"estimate TTFT ({args.device}, ms)", 1e3 * predicted[0], 1e3 * predicted[1],
                 predicted[1] / predicted[0]))
    rows.append(("throughput (tok/s)", median(runs["cached"], "throughput_tok_s"),
                 median(runs["uncached"], "throughput_tok_s"),
                 median(runs["cached"], "throughput_tok_s") / median(runs["uncached"], "throughput_tok_s")))
    print_ratio_table(f"{where}: {args.conversations} conversations x {args.turns} turns at concurrency "
                      f"{args.chat_concurrency}, {args.system_tokens}-token system prompt (mean prompt {prompt}, "
                      f"{cached} cached = {median(runs['cached'], 'hit_rate'):.0%} hit rate; output {output}); "
                      f"medians of {args.rounds}", ("prefix cache", "none"), rows)



def preemption(args: argparse.Namespace, common: tuple[str, ...], where: str) -> None:
    """2. preemptive scheduling on a heavy-tailed mix, in random order and with the long requests first"""
    servers = {}
    try:
        for policy in ("mlfq", "fcfs"):
            servers[policy] = start_server(*common, "--policy", policy, "--max-num-seqs", str(args.slots))
        for longs_first in (False, True):
            sessions = mixed(args.mixed_requests, longs_first=longs_first, scale=0.5, seed=2,
                             max_output=args.long_output)
            runs = side_by_side({k: url for k, (_, url) in servers.items()}, lambda _, work=sessions: work,
                                len(sessions), args.rounds)
            rows = [(f"job completion {q} (s)", *(median(runs[p], "latency_s", q) for p in ("mlfq", "fcfs")),
                     median(runs["fcfs"], "latency_s", q) / median(runs["mlfq"], "latency_s", q))
                    for q in ("mean", "p99")]
            rows.append(("throughput (tok/s)", *(median(runs[p], "throughput_tok_s") for p in ("mlfq", "fcfs")),
                         median(runs["mlfq"], "throughput_tok_s") / median(runs["fcfs"], "throughput_tok_s")))
            longs = sum(s[0].output_tokens == args.long_output for s in sessions)
            print_ratio_table(f"{where}: {len(sessions)} requests at once ({longs} of {args.long_output} tokens "
                              f"{'first' if longs_first else 'among them'}, the rest short), {args.slots} slots; "
                              f"medians of {args.rounds}", ("mlfq", "fcfs"), rows)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)

if __name__ == "__main__":
    main()
