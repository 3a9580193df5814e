"""Soak: many clients on one `shardwise serve` for minutes, some leaving mid-stream.

Each client streams ShareGPT-like requests (random prompt and output lengths) back to back
until the time is up; one request in ten is abandoned after a few chunks (the client closes
its connection). A refusal (503 with Retry-After: the queue is full or waited too long) is
waited out as the header says. Reports what every request came to, the latency percentiles
of those that completed, the server's RSS over time, and that the KV-cache and queue gauges
return to 0 once the clients stop (nothing leaked, nothing stuck).

    python benchmarks/soak.py [--clients 64] [--minutes 5] [--dtype int4] [--scale 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from collections import Counter

import httpx
import numpy as np
import psutil
from server import start_server

from shardwise.loadtest.workload import sharegpt_like

MODEL = "smollm2-135m"


async def client(url: str, seed: int, scale: float, deadline: float, outcomes: Counter,
                 latencies: list[float]) -> None:
    rng = random.Random(seed)
    work = [request for request, in sharegpt_like(200, scale=scale, seed=seed, max_output=256)]
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        while time.monotonic() < deadline:
            request = rng.choice(work)
            leave_after = rng.randint(1, 8) if rng.random() < 0.1 else None
            body = {"model": MODEL, "prompt": request.prompt, "max_tokens": request.output_tokens, "stream": True,
                    "temperature": rng.choice([0.0, 0.7, 1.0]), "ignore_eos": True}
            started, chunks = time.perf_counter(), 0
            try:
                async with http.stream("POST", "/v1/completions", json=body) as reply:
                    if reply.status_code != 200:
                        await reply.aread()
                        outcomes[f"http {reply.status_code}"] += 1
                        await asyncio.sleep(float(reply.headers.get("retry-after", 1)))
                        continue
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            outcomes["completed"] += 1
                            latencies.append(time.perf_counter() - started)
                            break
                        if "error" in json.loads(line[6:]):
                            outcomes["error event"] += 1
                            break
                        chunks += 1
                        if leave_after is not None and chunks >= leave_after:
                            outcomes["left mid-stream"] += 1
                            break
                    else:
                        outcomes["cut without [DONE]"] += 1
            except httpx.HTTPError as e:
                outcomes[f"client error {type(e).__name__}"] += 1


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    names = ("num_requests_running", "num_requests_waiting", "queue_oldest_wait_seconds", "kv_cache_usage_perc")
    return {n: float(re.search(rf"^shardwise:{n}\{{[^}}]*\}} (\S+)$", text, re.M)[1]) for n in names}


async def soak(url: str, pid: int, clients: int, seconds: float, scale: float) -> None:
    outcomes: Counter = Counter()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    process = psutil.Process(pid)
    rss: list[tuple[float, float]] = []

    async def sample_rss() -> None:
        start = time.monotonic()
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - start, sum(p.memory_info().rss for p in [process, *process.children(True)])))
            await asyncio.sleep(max(1.0, seconds / 20))

    await asyncio.gather(sample_rss(), *(client(url, seed, scale, deadline, outcomes, latencies)
                                                for seed in range(clients)))
    total = sum(outcomes.values())
    print(f"\n{clients} clients for {seconds / 60:.1f} min: {total} requests")
    for outcome, count in outcomes.most_common():
        print(f"  {outcome:28s} {count:6d}  ({100 * count / total:.1f} %)")
    if latencies:
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        print(f"latency of completed requests: p50 {p50:.1f} s, p90 {p90:.1f} s, p99 {p99:.1f} s, "
              f"max {max(latencies):.1f} s")
    print("server RSS (all its processes): " + ", ".join(f"{t:.0f}s {b / 2**30:.2f}G" for t, b in rss))
    for _ in range(60):  # the last streams' KV is freed within a step or two of their end
        after = gauges(url)
        if not any(after.values()):
            break
        await asyncio.sleep(0.5)
    print(f"gauges after the clients stopped: {after} -> {'all 0' if not any(after.values()) else 'NOT 0'}")
    failed = {o: c for o, c in outcomes.items() if o not in ("completed", "left mid-stream", "http 503")}
    print("unexpected outcomes: " + (", ".join(f"{o} {c}" for o, c in failed.items()) if failed else "none"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--scale", type=float, default=0.1, help="of ShareGPT's mean lengths (161 in, 338 out)")
    parser.add_argument("--server-args", default="", help="more `shardwise serve` flags, e.g. '--max-waiting 32'")
    args = parser.parse_args()
    server, url = start_server("--dtype", args.dtype, *args.server_args.split())
    try:
        asyncio.run(soak(url, server.pid, args.clients, args.minutes * 60, args.scale))
    finally:
        server.terminate()
        print(f"server exit code after SIGTERM: {server.wait(timeout=120)}")


if __name__ == "__main__":
    main()
