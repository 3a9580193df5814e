"""shardwise vs llama.cpp (llama-cpp-python) on the same SmolLM2-135M Q4_1 GGUF, same threads, one run.

shardwise runs the file's own 4-bit blocks (`dtype="int4"`: the layers Q4_1, the embedding / head
Q8_0, read directly by shardwise's CPU kernels); llama.cpp runs the same file. Medians over
repeats, the two interleaved; a ratio > 1 favours shardwise. llama-cpp-python has no batching,
so the aggregate rates at batch 8 and 32 are compared with its single-stream decode rate; they
are also run with fp32 weights, which win once a step is bound by arithmetic, not bytes (on an
AVX2 core integer multiply-adds are no faster than fp32 FMAs, and int4 pays a dequantisation).
Last, llama.cpp's own `llama-bench` on the same file (see llama_server.py) beside shardwise's
prefill and 128-token-context decode rates.

    make bench    # installs the bench extra: builds llama-cpp-python from source (~6 minutes here)
    python benchmarks/decode.py [--threads 2] [--repeats 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from llama_server import llama_bench, llama_cpp_decode_rate, require_llama_cpp
from side_by_side import paired_medians, print_ratio_table

TEXT = (Path(__file__).parent.parent / "tests" / "data" / "perplexity.txt").read_text()
TARGETS = {"decode": 1.5, "prefill": 2.0, "aggregate 32": 3.0}  # #27's (prefill: at 512 tokens), against llama.cpp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Llama = require_llama_cpp()

    from shardwise import LLM, SamplingParams
    from shardwise.model.registry import DEFAULT_MODEL, resolve

    # no prefix cache: the same prompts run every repeat, and a cached prompt would skip the prefill timed here
    ours = LLM(DEFAULT_MODEL, dtype="int4", threads=args.threads, prefix_cache=False)
    theirs = Llama(model_path=str(resolve(DEFAULT_MODEL)), n_threads=args.threads, n_threads_batch=args.threads,
                   n_ctx=2048, n_batch=512, verbose=False)
    text_ids = ours.tokenizer.encode(TEXT)
    context = {n: (text_ids * 2)[:n] for n in (128, 512)}
    n = args.new_tokens

    def ours_prefill(prompt: list[int]) -> None:  # the prompt and its first token
        ours.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))

    def theirs_prefill(prompt: list[int]) -> None:  # the prompt (the first token is sampled from its logits)
        theirs.reset()
        theirs.eval(prompt)

    def ours_decode(prompt: list[int]) -> float:
        """tokens/s from the first new token to the last, as the engine reports it"""
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return ours.generate([prompt], params)[0].decode_tokens_per_s

    def theirs_decode(prompt: list[int]) -> float:
        return llama_cpp_decode_rate(theirs, prompt, n)

    rows, ours_rates = [], {}
    for length in (128, 512):
        a, b = (length / s for s in paired_medians(args.repeats, (ours_prefill, theirs_prefill), context[length]))
        rows.append((f"prefill {length} tokens (tok/s)", a, b, a / b))
        ours_rates[f"pp{length}"] = a
        rates = [[ours_decode(context[length]), theirs_decode(context[length])] for _ in range(args.repeats)]
        a, b = (statistics.median(r[i] for r in rates) for i in (0, 1))
        rows.append((f"decode batch 1, {length}-token context (tok/s)", a, b, a / b))
        ours_rates.setdefault(f"tg{n}", a)  # (the 128-token context's, nearest llama-bench's empty one)
    single = rows[1][2]  # llama.cpp's single-stream decode rate at a 128-token context
    bench = llama_bench(str(resolve(DEFAULT_MODEL)), args.threads, (128, 512), n)  # llama.cpp's own tool
    rows += [(f"{test} vs llama-bench's (tok/s)", ours_rates[test], rate, ours_rates[test] / rate)
             for test, rate in bench.items()]
    fp32 = LLM(DEFAULT_MODEL, dtype="float32", threads=args.threads, prefix_cache=False)
    for dtype, engine in (("int4", ours), ("fp32", fp32)):
        for batch in (8, 32):
            prompts = [text_ids[i * 8 : i * 8 + 16] for i in range(batch)]
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            seconds = paired_medians(args.repeats, (engine.generate,), prompts, params)[0]
            rate = batch * n / seconds
            rows.append((f"aggregate batch {batch}, {dtype}, vs single stream (tok/s)", rate, single, rate / single))

    title = (f"SmolLM2-135M Q4_1 GGUF: shardwise int4 vs llama.cpp, {args.threads} threads, "
             f"medians of {args.repeats}; targets: decode >= {TARGETS['decode']}x, prefill >= "
             f"{TARGETS['prefill']}x, aggregate at 32 >= {TARGETS['aggregate 32']}x")
    print_ratio_table(title, ("shardwise", "llama.cpp"), rows)


if __name__ == "__main__":
    main()
