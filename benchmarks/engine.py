"""shardwise vs HF transformers on the same SmolLM2 GGUF weights, fp32, same threads, one run.

Decode tokens/s at batch 1, 8 and 32 and prefill time at 128 and 512 tokens, medians
over repeats, side by side with a ratio where > 1 means shardwise is faster
(tokens/s: shardwise / HF; prefill seconds: HF / shardwise). Batch 1 is also run
with bf16 weights on both sides: on AVX2 CPUs MKL's fp32 GEMV uses one core while
the bf16 kernel uses all of them, so bf16 is the faster single-stream choice.

    python benchmarks/engine.py [--threads 2] [--repeats 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse

import torch
from side_by_side import paired_medians, print_ratio_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from shardwise import LLM, SamplingParams
    from shardwise.model.registry import DEFAULT_MODEL, resolve

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = resolve(DEFAULT_MODEL)
    engines = {
        dtype: (
            LLM(DEFAULT_MODEL, dtype=dtype, threads=args.threads),
            AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)).eval(),
        )
        for dtype in ("float32", "bfloat16")
    }
    gen = torch.Generator().manual_seed(0)

    def prompts(batch: int, length: int) -> list[list[int]]:
        return torch.randint(100, 40000, (batch, length), generator=gen).tolist()

    def hf_run(ids: list[list[int]], new: int, dtype: str = "float32") -> None:
        with torch.inference_mode():
            engines[dtype][1].generate(torch.tensor(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def ours_run(ids: list[list[int]], new: int, dtype: str = "float32") -> None:
        engines[dtype][0].generate(ids, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))

    rows = []
    n = args.new_tokens
    for batch, dtype in ((1, "float32"), (1, "bfloat16"), (8, "float32"), (32, "float32")):
        ids = prompts(batch, 16)
        # decode rate: the extra tokens of an n-token run over a 1-token run (prefill cancels out)
        full = paired_medians(args.repeats, (ours_run, hf_run), ids, n, dtype)
        first = paired_medians(args.repeats, (ours_run, hf_run), ids, 1, dtype)
        ours, hf = (batch * (n - 1) / (f - o) for f, o in zip(full, first, strict=True))
        rows.append((f"decode batch {batch:>2} {dtype} (tok/s)", ours, hf, ours / hf))
    for length in (128, 512):
        ids = prompts(1, length)
        ours, hf = paired_medians(args.repeats, (ours_run, hf_run), ids, 1, "float32")
        rows.append((f"prefill {length:>3} tokens fp32 (s)", ours, hf, hf / ours))

    title = f"SmolLM2-135M (Q4_1 GGUF dequantized), {args.threads} threads, medians of {args.repeats}"
    print_ratio_table(title, ("shardwise", "HF"), rows)


if __name__ == "__main__":
    main()
