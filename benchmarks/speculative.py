"""Speculative decoding (prompt lookup) against plain decoding, in one run: decode tokens/s at
batch 1 and 8 on a code-editing prompt (the reply repeats the code it was given) and on a
plain question, greedy, fp32 and int4 weights, with the acceptance rate and whether the
output was token-identical. The two engines take turns per round; medians over --rounds.

    python benchmarks/speculative.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from side_by_side import print_ratio_table

from shardwise import LLM, SamplingParams

CODE = '''def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


def factorial(n):
    if n < 2:
        return 1
    return n * factorial(n - 1)


def main():
    for i in range(10):
        print(i, fibonacci(i), factorial(i))
'''
PROMPTS = {
    "code edit": f"Rename the function fibonacci to fib everywhere and repeat the whole code:\n\n{CODE}",
    "question": "Explain in a few sentences why the sky is blue.",
}


def tokens_per_second(llm: LLM, prompt: str, batch: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    started = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": prompt}]] * batch, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - started), [o.token_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    for dtype in ("float32", "int4"):
        engines = {name: LLM(dtype=dtype, threads=args.threads, speculative=spec)
                   for name, spec in (("plain", None), ("ngram", "ngram"))}
        rows, notes = [], []
        for label, prompt in PROMPTS.items():
            for batch in (1, 8):
                speeds = {name: [] for name in engines}
                outputs = {}
                for llm in engines.values():
                    tokens_per_second(llm, prompt, batch, 16)  # warm up
                spec = engines["ngram"].scheduler
                before = spec.drafted_tokens, spec.accepted_tokens
                for _ in range(args.rounds):
                    for name, llm in engines.items():
                        speed, outputs[name] = tokens_per_second(llm, prompt, batch, args.max_tokens)
                        speeds[name].append(speed)
                made, taken = spec.drafted_tokens - before[0], spec.accepted_tokens - before[1]
                plain, ngram = statistics.median(speeds["plain"]), statistics.median(speeds["ngram"])
                rows.append((f"{label}, batch {batch}: tokens/s", ngram, plain, ngram / plain))
                notes.append(f"{label}, batch {batch}: {taken}/{made} drafts accepted "
                             f"({taken / max(made, 1):.0%}), output identical: {outputs['ngram'] == outputs['plain']}")
        print_ratio_table(f"prompt lookup vs plain decoding ({dtype}, {args.threads} threads, greedy, "
                          f"{args.max_tokens} tokens, medians of {args.rounds})", ("ngram", "plain"), rows)
        print("\n".join(notes))
        for llm in engines.values():
            llm.close()


if __name__ == "__main__":
    main()
