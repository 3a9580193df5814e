"""A decode step in one kernel call against layer by layer, per architecture family, one run.

Random models shaped like SmolLM2-135M (30 layers, 576 wide, 9 / 3 heads of 64, MLP 1536, a
49152-token vocabulary) built from transformers' config classes: Llama (plain layers), Qwen3
(q/k norms), Gemma 2 (sandwich norms, GeGLU, soft-capped scores) and Gemma 3 (all of those and a
local RoPE). Each is loaded twice as one shard, once with its decode steps fused
(`sw_decode_layers`) and once op by op, and both decode the same sequences, interleaved, medians
of repeats; the logits are compared bit for bit. A ratio > 1 favours the fused step.

    python benchmarks/fused_decode.py [--dtype int4] [--batch 1,8] [--steps 32] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shardwise import ShardModel
from shardwise.model.weights import open_weights

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, initializer_range=0.02,
             tie_word_embeddings=True)
# family: (transformers config class, model class, settings over SHAPE)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=256, query_pre_attn_scalar=64)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=256, query_pre_attn_scalar=64)),
}
PROMPT = 64  # tokens of each sequence before the timed steps


def build(family: str, path: Path) -> Path:
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    config_class, model_class, settings = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**SHAPE, **settings)
    getattr(transformers, model_class)(config).save_pretrained(path)
    return path


def decode(shard: ShardModel, batch: int, steps: int) -> tuple[float, torch.Tensor]:
    """Seconds per decode step of `batch` sequences after a PROMPT-token prompt each, and the last logits."""
    ids = list(range(batch))
    generator = torch.Generator().manual_seed(1)
    for i in ids:
        shard.allocate(i)
        shard.forward([i], [PROMPT], torch.randint(3, SHAPE["vocab_size"], (PROMPT,), generator=generator))
    tokens = torch.arange(3, 3 + batch)
    started = time.perf_counter()
    for _ in range(steps):
        logits = shard.forward(ids, [1] * batch, tokens)
        tokens = logits.argmax(-1)
    seconds = (time.perf_counter() - started) / steps
    for i in ids:
        shard.free(i)
    return seconds, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"decode step, {args.dtype}, {args.threads} threads, medians of {args.repeats}: fused / layer by layer")
    print(f"{'family':8} {'batch':>5} {'fused ms':>9} {'by layer ms':>12} {'ratio':>6}  logits equal")
    with tempfile.TemporaryDirectory() as work:
        for family in args.families.split(","):
            weights = open_weights(build(family, Path(work) / family))
            fused, by_layer = (ShardModel(weights.spec, weights=weights, dtype=args.dtype) for _ in range(2))
            if fused.fused is None:
                print(f"{family:8} not fused")
                continue
            by_layer.fused = None
            for batch in map(int, args.batch.split(",")):
                for shard in (fused, by_layer):  # warm-up
                    decode(shard, batch, 2)
                times: dict[str, list[float]] = {"fused": [], "by layer": []}
                for _ in range(args.repeats):
                    seconds, ours = decode(fused, batch, args.steps)
                    times["fused"].append(seconds)
                    seconds, theirs = decode(by_layer, batch, args.steps)
                    times["by layer"].append(seconds)
                a, b = (statistics.median(t) for t in times.values())
                same = torch.equal(ours, theirs)
                print(f"{family:8} {batch:5d} {a * 1e3:9.2f} {b * 1e3:12.2f} {b / a:5.2f}x  {same}")


if __name__ == "__main__":
    main()
