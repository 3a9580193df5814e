"""Collaborative inference: how much server work a split saves, side by side.

One `shardwise serve` (one thread) and several client processes (one thread each, some
slowed to emulate weaker devices, each with its own SLA and memory), all running at once.
Each client generates the same requests under each split policy: the DP (least server
work within the SLA, SplitLLM's), greedy (the most leading layers on the client within the
SLA) and server-only (every layer on the server, what a plain API client costs it). The
server's own counters give its compute per generated token; the seed paper reports ~1/3
less server work than server-only and +19 % server throughput over greedy.

    python benchmarks/collab.py [--rounds 3] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from server import start_server  # noqa: E402

# (slowdown, SLA seconds per token, memory GB): a fast laptop, a mid device, a weak one with little memory
CLIENTS = [(1.0, 0.12, 2.0), (2.0, 0.20, 1.0), (4.0, 0.30, 0.4)]
PROMPTS = ["The capital of France is", "Write a short story about a robot who learns to paint:",
           "def fibonacci(n):\n    "]
POLICIES = ["dp", "greedy", "server"]


def client(url: str, policy: str, slowdown: float, sla: float, memory: float, tokens: int, costs: list[float]) -> None:
    """One client process: open a session under `policy`, generate, print what happened as JSON."""
    from shardwise import LLM, SamplingParams
    from shardwise.collab.client import collaborative

    executor = collaborative(url, sla=sla, memory_gb=memory, policy=policy, slowdown=slowdown, profile=costs)
    with LLM(executor=executor, threads=1, max_num_seqs=8) as c:
        started = time.perf_counter()
        outs = [c.generate(p, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))[0]
                for p in PROMPTS]
        elapsed = time.perf_counter() - started
        tpot = statistics.median(1 / o.decode_tokens_per_s for o in outs)
        print(json.dumps({"tokens": sum(len(o.token_ids) for o in outs), "seconds": elapsed, "tpot": tpot,
                          "sla": sla, "segments": c.executor.session["segments"],
                          "note": c.executor.session["note"]}))


def server_seconds(url: str) -> float:
    found = re.search(r"shardwise:collab_server_seconds_total\{[^}]*\} (\S+)", httpx.get(f"{url}/metrics").text)
    return float(found.group(1)) if found else 0.0


def client_costs() -> list[float]:
    """This machine's per-layer decode seconds on one thread, measured once while nothing else
    runs: every policy then decides from the same numbers (each client scales them by its slowdown)."""
    import torch

    from shardwise.collab.split import measure
    from shardwise.engine.shard import ShardModel
    from shardwise.model.registry import DEFAULT_MODEL, resolve
    from shardwise.model.weights import open_weights

    torch.set_num_threads(1)
    weights = open_weights(resolve(DEFAULT_MODEL))
    return measure(ShardModel(weights.spec, (0, 1), weights=weights), repeats=50)


def run(url: str, policy: str, tokens: int, costs: list[float]) -> dict:
    before = server_seconds(url)
    procs = [subprocess.Popen([sys.executable, __file__, "--client", url, policy, str(s), str(sla), str(mem),
                               str(tokens), json.dumps(costs)], stdout=subprocess.PIPE, text=True)
             for s, sla, mem in CLIENTS]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"a client failed under {policy}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    generated = sum(r["tokens"] for r in results)
    work = server_seconds(url) - before
    wall = max(r["seconds"] for r in results)
    return {"server_ms_per_token": 1e3 * work / generated, "tokens_per_s": generated / wall,
            "sla_met": sum(r["tpot"] <= r["sla"] for r in results), "clients": results}


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--tokens", type=int, default=32)
    opts = args.parse_args()
    costs = client_costs()
    server, url = start_server("--threads", "1")
    try:
        rounds = {p: [] for p in POLICIES}
        for r in range(opts.rounds):
            for policy in POLICIES:
                rounds[policy].append(run(url, policy, opts.tokens, costs))
                last = rounds[policy][-1]
                splits = ["/".join(f"{s['side'][0]}{s['layers'][0]}-{s['layers'][1]}" for s in c["segments"])
                          for c in last["clients"]]
                print(f"round {r + 1} {policy:>6}: {last['server_ms_per_token']:.2f} server ms/token, "
                      f"{last['tokens_per_s']:.1f} tok/s, SLA met {last['sla_met']}/{len(CLIENTS)}, splits {splits}",
                      flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    work = {p: statistics.median(x["server_ms_per_token"] for x in rounds[p]) for p in POLICIES}
    print(f"\nmedians over {opts.rounds} rounds, {len(CLIENTS)} clients (slowdown, SLA, GB: {CLIENTS})")
    print(f"{'policy':>8} {'server ms/token':>16} {'vs server-only':>15} {'server capacity tok/s':>22}")
    for p in POLICIES:
        print(f"{p:>8} {work[p]:>16.2f} {work[p] / work['server']:>14.2f}x {1e3 / work[p]:>22.1f}")
    print(f"\nDP saves {1 - work['dp'] / work['server']:.0%} of server-only's work (seed: ~33 %); "
          f"server capacity {work['greedy'] / work['dp']:.2f}x greedy's (seed: 1.19x)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        url, policy, slowdown, sla, memory, tokens, costs = sys.argv[2:]
        client(url, policy, float(slowdown), float(sla), float(memory), int(tokens), json.loads(costs))
    else:
        main()
