"""Drive a running OpenAI-compatible server with a workload and measure what happened:
per request the time to first token, time per output token and latency, overall the
throughput. Requests are streamed so the first token's arrival is seen."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import numpy as np

from shardwise.errors import ShardwiseError
from shardwise.loadtest.workload import BenchRequest


@dataclass(frozen=True)
class Measured:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float | None  # None for one-token outputs
    latency_s: float


async def _one(client: httpx.AsyncClient, model: str, request: BenchRequest) -> Measured:
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.output_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise ShardwiseError(f"the server answered {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise ShardwiseError(f"the server failed a request: {chunk['error']['message']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    if usage is None or first is None:
        raise ShardwiseError("the server's stream ended without tokens or usage: is it an OpenAI-compatible server?")
    n = usage["completion_tokens"]
    return Measured(usage["prompt_tokens"], n, first - start, (last - first) / (n - 1) if n > 1 else None,
                    last - start)


async def _run(url: str, model: str | None, sessions: list[list[BenchRequest]], concurrency: int,
               api_key: str | None) -> tuple[str, list[Measured], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # a fresh connection per request: servers close kept-alive ones on their own terms (llama-server's
    # HTTP library after 5 requests), and reusing one the server just closed fails the request
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url.rstrip("/").removesuffix("/v1"), headers=headers,
                                 timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:
        try:
            listing = await client.get("/v1/models")
        except httpx.HTTPError as e:
            raise ShardwiseError(f"cannot reach a server at {url} ({e}): start one with `shardwise serve`") from None
        if listing.status_code != 200:
            raise ShardwiseError(f"GET /v1/models answered {listing.status_code}: {listing.text[:200]} "
                                 f"(give --api-key if the server needs one)")
        model = model or listing.json()["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency)

        async def gated(session: list[BenchRequest]) -> list[Measured]:
            async with gate:  # a session's requests go one after another
                return [await _one(client, model, r) for r in session]

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(s) for s in sessions))
        return model, [m for session in results for m in session], time.perf_counter() - start


def run_load(url: str, sessions: list[list[BenchRequest]], *, concurrency: int, model: str | None = None,
             api_key: str | None = None) -> tuple[str, list[Measured], float]:
    """(served model name, one Measured per request, wall seconds); `concurrency` sessions at once."""
    return asyncio.run(_run(url, model, sessions, concurrency, api_key))


def summarize(results: list[Measured], wall_s: float) -> dict:
    def percentiles(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return {"mean": float(np.mean(values)), "p50": float(p50), "p90": float(p90), "p99": float(p99)}

    generated = sum(r.output_tokens for r in results)
    return {
        "requests": len(results),
        "duration_s": wall_s,
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "generated_tokens": generated,
        "throughput_tok_s": generated / wall_s,
        "requests_per_s": len(results) / wall_s,
        "ttft_s": percentiles([r.ttft_s for r in results]),
        "tpot_s": percentiles([r.tpot_s for r in results if r.tpot_s is not None]),
        "latency_s": percentiles([r.latency_s for r in results]),
    }
