"""Speculative decoding against plain decoding, in one run: decode tokens/s (after the first token) at batch 1 and 8,
greedy, on a code-editing prompt (the reply repeats the code it was given) and a plain question,
for an fp32 model drafted by its own weights as int4 and by prompt lookup, and an int4 model
drafted by prompt lookup. Beside each: the acceptance rate, whether the output was
token-identical, and the speed-up `shardwise estimate --draft ... --accept <measured>` predicts
with this machine's profile. The engines take turns per round; medians over --rounds.

    python benchmarks/speculative.py [--rounds 3] [--threads 2] [--profile this-machine.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

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
DRAFTERS = {"float32": ("int4", "ngram"), "int4": ("ngram",)}  # the model's weights: its drafters
SHORT = {"float32": "fp32", "int4": "int4"}


def run(llm: LLM, prompt: str, batch: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds to answer the prompt `batch` times at once, greedy, and the token ids."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    started = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": prompt}]] * batch, params)
    return time.perf_counter() - started, [o.token_ids for o in outs]


def predicted_speedup(device: str, llm: LLM, dtype: str, draft: str, batch: int, prompt: str, generated: int,
                      gamma: int, accept: float, drafting: float = 1.0) -> float:
    """The decode speed-up the estimator predicts for this drafter drafting gamma tokens in the
    share `drafting` of the steps and keeping the fraction `accept` of them (decode: everything
    after the first token, a draft model's prefill included)."""
    from shardwise.perf.query import EstimateQuery

    query = dict(model="smollm2-135m", device=device, batch=batch, output=generated // batch, quant=SHORT[dtype],
                 input=len(llm.chat_ids([{"role": "user", "content": prompt}])))
    plain, _ = EstimateQuery(**query).run()
    spec, _ = EstimateQuery(**query, draft=draft, gamma=gamma, accept=accept, drafting=drafting).run()
    return (plain.e2e_s - plain.ttft_s) / (spec.e2e_s - spec.ttft_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--profile", help="a `shardwise profile` file of this machine (default: profile now)")
    args = parser.parse_args()
    device = args.profile
    if device is None:
        from shardwise.perf.profile import profile_device

        print("profiling this machine ...", flush=True)
        device = "/tmp/shardwise-speculative-profile.json"
        Path(device).write_text(json.dumps({"devices": [profile_device("smollm2-135m").to_dict()], "links": []}))
    for dtype, drafters in DRAFTERS.items():
        engines = {"plain": LLM(dtype=dtype, threads=args.threads)}
        engines |= {d: LLM(dtype=dtype, threads=args.threads, speculative=d) for d in drafters}
        rows, notes = [], []
        for label, prompt in PROMPTS.items():
            for batch in (1, 8):
                for llm in engines.values():
                    run(llm, prompt, batch, 16)  # warm up
                first = {name: statistics.median(run(llm, prompt, batch, 1)[0] for _ in range(args.rounds))
                         for name, llm in engines.items()}  # (prefill: the decode speed leaves it out)
                before = {d: (engines[d].scheduler.drafts, engines[d].scheduler.drafted_tokens,
                              engines[d].scheduler.accepted_tokens) for d in drafters}
                times = {name: [] for name in engines}
                outputs = {}
                for _ in range(args.rounds):
                    for name, llm in engines.items():
                        seconds, outputs[name] = run(llm, prompt, batch, args.max_tokens)
                        times[name].append(seconds)
                generated = sum(map(len, outputs["plain"]))
                speed = {name: (generated - batch) / (statistics.median(times[name]) - first[name])
                         for name in engines}
                for d in drafters:
                    s = engines[d].scheduler
                    drafts, drafted, accepted = (now - then for now, then in zip(
                        (s.drafts, s.drafted_tokens, s.accepted_tokens), before[d], strict=True))
                    measured = speed[d] / speed["plain"]
                    rows.append((f"{label}, batch {batch}, {d} drafts: decode tokens/s", speed[d], speed["plain"],
                                 measured))
                    note = (f"{label}, batch {batch}, {d}: {accepted}/{drafted} drafts accepted "
                            f"({accepted / max(drafted, 1):.0%}), output identical: {outputs[d] == outputs['plain']}; ")
                    if drafted:  # the estimate given what was measured: the share of steps drafting, the
                        # mean draft when drafting, the share accepted
                        steps = generated - batch - accepted // args.rounds  # each sequence's decode steps
                        drafting = min(1.0, drafts / args.rounds / max(steps, 1))
                        gamma = max(1, round(drafted / drafts))
                        predicted = predicted_speedup(device, engines[d], dtype, d, batch, prompt, generated,
                                                      gamma, accepted / drafted, drafting)
                        note += (f"drafting in {drafting:.0%} of the steps, {drafted / drafts:.1f} tokens; "
                                 f"speed-up measured {measured:.2f}x, estimated {predicted:.2f}x "
                                 f"({predicted / measured - 1:+.0%})")
                    else:
                        gamma = engines[d].config.speculative.gamma
                        predicted = predicted_speedup(device, engines[d], dtype, d, batch, prompt, generated,
                                                      gamma, 1.0)
                        note += (f"not speculating (batch > max_batch); the estimator, were every draft of "
                                 f"{gamma} accepted: {predicted:.2f}x")
                    notes.append(note)
        print_ratio_table(f"speculative vs plain decoding ({dtype} model, {args.threads} threads, greedy, "
                          f"{args.max_tokens} tokens, medians of {args.rounds})", ("speculative", "plain"), rows)
        print("\n".join(notes), flush=True)
        for llm in engines.values():
            llm.close()


if __name__ == "__main__":
    main()
