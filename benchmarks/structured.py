"""What a JSON schema costs: decode tokens/s of one `shardwise serve` with and without a
response_format at concurrency 1 and 32, in one run.

The schema asks for a long list of strings, so constrained and free requests both run to
max_tokens (free ones with ignore_eos) and generate the same number of tokens; the two kinds take turns per round, so
the machine's drift hits both alike. Medians over --rounds; the ratio is constrained / free
(target: >= 0.9).

    python benchmarks/structured.py [--rounds 3] [--dtype int4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from server import start_server
from side_by_side import print_ratio_table

MODEL = "smollm2-135m"
SCHEMA = {"type": "object", "required": ["cities"], "additionalProperties": False,
          "properties": {"cities": {"type": "array", "items": {"type": "string"}, "minItems": 200}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "cities", "schema": SCHEMA, "strict": True}}


def tokens_per_second(url: str, concurrency: int, max_tokens: int, constrained: bool) -> float:
    """Generated tokens over wall time for `concurrency` requests at once."""
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True,
            "messages": [{"role": "user", "content": "List as many cities of Europe as you can, as JSON."}]}
    if constrained:
        body["response_format"] = FORMAT

    def one(i: int) -> int:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body | {"seed": i}, timeout=600).json()
        assert reply["choices"][0]["finish_reason"] == "length", reply  # both kinds run to max_tokens
        return reply["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(concurrency)))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    server, url = start_server("--dtype", args.dtype, "--threads", str(args.threads), "--max-num-seqs", "32")
    try:
        tokens_per_second(url, 2, 8, True)  # warm up: the first schema compiles
        rows = []
        for concurrency in (1, 32):
            runs = {True: [], False: []}
            for _ in range(args.rounds):
                for constrained in (False, True):
                    runs[constrained].append(tokens_per_second(url, concurrency, args.max_tokens, constrained))
            free, constrained = statistics.median(runs[False]), statistics.median(runs[True])
            rows.append((f"concurrency {concurrency}: tokens/s", constrained, free, constrained / free))
        print_ratio_table(f"JSON schema vs free decoding ({args.dtype}, {args.threads} threads, "
                          f"{args.max_tokens} tokens, medians of {args.rounds})", ("schema", "free"), rows)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
