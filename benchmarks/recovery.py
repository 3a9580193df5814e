"""What losing a pipeline stage costs: shardwise's recovery against restarting the server.

A real `shardwise serve --stages 3` streams --concurrency requests (greedy, ignore_eos);
once a quarter of their tokens have arrived, one stage's actor is SIGKILLed (first, middle
and last in turn, over the rounds). Every token's arrival is recorded. Measured:

- pause: from the kill to the next token of any stream;
- dip: tokens/s over the --window seconds after the kill, against the seconds before it.

The peer is what vLLM, llama.cpp RPC and exo leave a user with when a node dies: the
engine is gone, so restart the server and resend the requests. Its pause is from the
moment of the kill to the first token the clients had not already seen (a fresh server
must start, prefill again and regenerate what was lost). Medians over rounds; a ratio
> 1 favours shardwise.

    python benchmarks/recovery.py [--rounds 3] [--concurrency 8] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time

import httpx
from server import start_server
from side_by_side import print_ratio_table

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
           "1, 2, 3, 4,", "The three laws of motion are", "Dear diary, today", "import numpy as np\n",
           "A recipe for pancakes:"]


async def stream(url: str, prompt: str, max_tokens: int, arrivals: list[float]) -> None:
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "logprobs": 0}
    async with httpx.AsyncClient(timeout=600) as http, http.stream("POST", f"{url}/v1/completions",
                                                                   json=body) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"]
                if choice and choice[0]["logprobs"]:
                    arrivals.extend([time.perf_counter()] * len(choice[0]["logprobs"]["tokens"]))


async def load(url: str, concurrency: int, max_tokens: int, kill_stage: int | None = None) -> tuple[list, float]:
    """Stream the requests; SIGKILL kill_stage once a quarter of the tokens are in. Returns every
    token's arrival time and the moment of the kill (the end of the run when nothing was killed)."""
    arrivals: list[float] = []
    killed = [0.0]

    async def killer() -> None:
        while len(arrivals) < concurrency * max_tokens // 4:
            await asyncio.sleep(0.005)
        if kill_stage is not None:
            pid = httpx.get(f"{url}/health").json()["stages"][kill_stage]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed[0] = time.perf_counter()

    await asyncio.gather(*(stream(url, PROMPTS[i % len(PROMPTS)], max_tokens, arrivals)
                           for i in range(concurrency)), killer())
    return sorted(arrivals), killed[0] or time.perf_counter()


def rates(arrivals: list[float], at: float, window: float) -> tuple[float, float]:
    """Tokens/s over the window before `at` (from the first token at most) and the window after it."""
    start = max(at - window, arrivals[0])
    before = sum(start <= t < at for t in arrivals) / max(at - start, 1e-9)
    after = sum(at <= t < at + window for t in arrivals) / window
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--window", type=float, default=10.0, help="seconds after the kill for the dip")
    args = parser.parse_args()
    pauses, restart_pauses, before, after, restart_after = [], [], [], [], []
    for r in range(args.rounds):  # the two sides take turns, so the machine's drift hits both alike
        server, url = start_server("--stages", "3")
        try:
            asyncio.run(load(url, args.concurrency, args.max_tokens))  # warm-up
            arrivals, killed = asyncio.run(load(url, args.concurrency, args.max_tokens, kill_stage=r % 3))
        finally:
            server.terminate()
            server.wait(timeout=60)
        pauses.append(min(t for t in arrivals if t > killed) - killed)
        rate_before, rate_after = rates(arrivals, killed, args.window)
        before.append(rate_before)
        after.append(rate_after)
        seen = sum(t <= killed for t in arrivals)  # tokens the clients had when the engine died
        # the peer: a fresh server, the requests resent; its tokens count once past what was seen
        start = time.perf_counter()
        server, url = start_server("--stages", "3")
        try:
            again, _ = asyncio.run(load(url, args.concurrency, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=60)
        restart_pauses.append(again[seen] - start)
        restart_after.append(rates([t - start + killed for t in again[seen:]], killed, args.window)[1])
        print(f"round {r} (stage {r % 3}): pause {pauses[-1]:.1f} s vs restart {restart_pauses[-1]:.1f} s; "
              f"tok/s before {rate_before:.0f}, after {rate_after:.0f} vs {restart_after[-1]:.0f}",
              file=sys.stderr, flush=True)
    med = statistics.median
    rows = [("pause: kill -> next new token (s)", med(pauses), med(restart_pauses), med(restart_pauses) / med(pauses)),
            (f"tok/s in the {args.window:.0f} s after the kill", med(after), med(restart_after),
             med(after) / med(restart_after) if med(restart_after) else float("inf")),
            ("tok/s before the kill", med(before), med(before), 1.0)]
    print_ratio_table(f"Losing 1 of 3 local stages under {args.concurrency} streams of {args.max_tokens} tokens "
                      f"(SmolLM2-135M, {os.cpu_count()} cores), medians of {args.rounds}", ("shardwise", "restart"),
                      rows)


if __name__ == "__main__":
    main()
