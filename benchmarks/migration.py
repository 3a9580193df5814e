"""What a move to a new plan costs the clients: the running requests' KV moved with the layers
(shardwise's default) against replaying them (`--no-move-kv`, the path a lost stage takes).

A real `shardwise serve --stages 2` streams --concurrency greedy requests of --max-tokens
each; once half of their tokens have arrived, a new split of the layers is POSTed to
/v1/plan. The new stages load beside the old ones in both modes; then either every sequence's
KV moves to them, or every sequence is prefilled again there. Measured from every token's
arrival: the pause (the gap between two tokens of any stream around the move, the server's
"re-planned" event) and the tokens/s over the run. The two modes take turns, so the machine's drift hits both alike;
medians over rounds, a ratio > 1 favours moving the KV. Also counted: the greedy texts the
replay changed (a prefill sums in another order than the decodes did).
--tensor-parallel N starts the server with one stage split among N devices instead: the move
takes each sequence's key/value heads from every device of it.

    python benchmarks/migration.py [--rounds 2] [--concurrency 16] [--max-tokens 500] [--tensor-parallel 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx
from recovery import PROMPTS
from server import start_server
from side_by_side import print_ratio_table

MOVED_TO = {"stages": [{"layers": [0, 10]}, {"layers": [10, 30]}]}  # from the even split, 15 + 15


async def run(url: str, concurrency: int, max_tokens: int) -> tuple[list[str], list[float]]:
    """Stream the requests, POSTing the new plan once half the tokens are in. Returns the texts
    and every token's arrival time (time.time(), sorted)."""
    texts, arrivals = [""] * concurrency, []

    async def one(i: int, http: httpx.AsyncClient) -> None:
        body = {"model": "smollm2-135m", "prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0}
        async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"]
                    if choice and choice[0]["logprobs"]:
                        texts[i] += choice[0]["text"]
                        arrivals.extend([time.time()] * len(choice[0]["logprobs"]["tokens"]))

    async def mover(http: httpx.AsyncClient) -> None:
        while len(arrivals) < concurrency * max_tokens // 2:
            await asyncio.sleep(0.01)
        (await http.post(f"{url}/v1/plan", json=MOVED_TO)).raise_for_status()

    async with httpx.AsyncClient(timeout=1200) as http:
        await asyncio.gather(*(one(i, http) for i in range(concurrency)), mover(http))
    return texts, sorted(arrivals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=500)
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--tensor-parallel", type=int, default=None)
    args = parser.parse_args()
    layout = ("--stages", "2") if args.tensor_parallel is None else \
        ("--stages", "1", "--tensor-parallel", str(args.tensor_parallel))
    start = "15+15 layers" if args.tensor_parallel is None else f"one stage split {args.tensor_parallel} ways"
    modes = {"move KV": (), "replay": ("--no-move-kv",)}
    pauses, rates, texts = {m: [] for m in modes}, {m: [] for m in modes}, {}
    for r in range(args.rounds):
        for mode, flags in modes.items():
            server, url = start_server(*layout, "--dtype", args.dtype, "--kv-tokens", "32768", *flags)
            try:
                texts[mode], arrivals = asyncio.run(run(url, args.concurrency, args.max_tokens))
                moved = next(e for e in reversed(httpx.get(f"{url}/v1/dashboard/state").json()["events"])
                             if e["kind"] == "re-planned")
            finally:
                server.terminate()
                server.wait(timeout=60)
            pauses[mode].append(min(t for t in arrivals if t > moved["time"]) -
                                max(t for t in arrivals if t < moved["time"]))
            rates[mode].append(len(arrivals) / (arrivals[-1] - arrivals[0]))
            print(f"round {r}, {mode}: pause {pauses[mode][-1]:.2f} s, {rates[mode][-1]:.0f} tok/s; "
                  f"{moved['message']}", file=sys.stderr, flush=True)
        changed = sum(a != b for a, b in zip(texts["move KV"], texts["replay"], strict=True))
        print(f"round {r}: {changed} of {args.concurrency} greedy texts differ after the replay", file=sys.stderr)
    med = statistics.median
    move, replay = (med(pauses[m]) for m in modes)
    rows = [("pause after the new plan (s)", move, replay, replay / move),
            ("tokens/s over the run", med(rates["move KV"]), med(rates["replay"]),
             med(rates["move KV"]) / med(rates["replay"]))]
    print_ratio_table(f"A move from {start} to 10+20 layers while {args.concurrency} streams of {args.max_tokens} "
                      f"tokens run, half-way (SmolLM2-135M {args.dtype}, local stages, {os.cpu_count()} cores), "
                      f"medians of {args.rounds}", ("move KV", "replay"), rows)


if __name__ == "__main__":
    main()
