"""A device check, not a test (pytest does not collect it): the engine's CUDA path against
transformers on the same GPU. Random Llamas are built here (SmolLM2-135M's shape, and a
Llama-3.2-1B shape with SmolLM2's vocabulary, `--tokenizer DIR` giving that tokenizer), then:

1. logits of our CUDA shard (fp32, bf16) against transformers' fp32 on the GPU, and our int8 /
   int4 CUDA logits (Triton products) against the same quantised weights on the CPU;
2. greedy continuations: ours against transformers' generate, fp32 on the GPU;
3. decode tokens/s at batch 1 and 32 on the 1B shape: ours (bf16, int8, int4) beside
   transformers' generate (bf16), the same tokens, and each as a share of the GPU's bandwidth.

    python tests/cuda_engine_check.py --tokenizer DIR [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shardwise import LLM, SamplingParams, ShardModel
from shardwise.model.weights import open_weights

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3)
ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8)
RESULTS: dict = {}
DEVICE = "cuda"  # --device cpu: a dry run of the checks on a machine without a GPU


def build(shape: dict, tokenizer: Path, dtype: torch.dtype) -> Path:
    """A random Llama of this shape with the given tokenizer, saved as safetensors. Weights
    larger than transformers' default init (std 0.02) so logits are far apart and greedy
    choices are not ties."""
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=2, bos_token_id=1, initializer_range=0.08, rope_theta=100000.0, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    path = Path(tempfile.mkdtemp()) / f"llama-{shape['hidden_size']}"
    model.save_pretrained(path)
    for f in tokenizer.iterdir():
        shutil.copy(f, path)
    return path


def prompts(n: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 49152, (length,), generator=g).tolist() for length in (7, 33, 120)[:n]]


def shard_logits(shard: ShardModel, batch: list[list[int]]) -> torch.Tensor:
    ids = list(range(len(batch)))
    for i in ids:
        shard.allocate(i)
    out = shard.forward(ids, [len(p) for p in batch], torch.tensor([t for p in batch for t in p]), logits="all")
    for i in ids:
        shard.free(i)
    return out.float().cpu()


def record(key: str, value) -> None:
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)


def check_logits(path: Path) -> None:
    weights = open_weights(path)
    batch = prompts()
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(DEVICE).eval()
    with torch.no_grad():
        reference = torch.cat([hf(torch.tensor([p], device=DEVICE)).logits[0].float().cpu() for p in batch])
    scale = reference.abs().max().item()
    top1 = reference.argmax(-1)
    with torch.no_grad():  # the yardstick for ours in bf16: transformers' own bf16 against its fp32
        hf_bf16 = torch.cat([hf.bfloat16()(torch.tensor([p], device=DEVICE)).logits[0].float().cpu() for p in batch])
    record("logits transformers bf16 vs its fp32: max |diff| / max |logit|",
           round((hf_bf16 - reference).abs().max().item() / scale, 6))
    record("logits transformers bf16: top-1 agreement with its fp32",
           round((hf_bf16.argmax(-1) == top1).float().mean().item(), 4))
    for dtype in ("float32", "bfloat16"):
        ours = shard_logits(ShardModel(weights.spec, weights=weights, device=DEVICE, dtype=dtype), batch)
        record(f"logits {dtype} cuda vs transformers fp32 cuda: max |diff| / max |logit|",
               round((ours - reference).abs().max().item() / scale, 6))
        record(f"logits {dtype} cuda: top-1 agreement with transformers",
               round((ours.argmax(-1) == top1).float().mean().item(), 4))
    for dtype in ("int8", "int4"):
        cuda = ShardModel(weights.spec, weights=weights, device=DEVICE, dtype=dtype)
        record(f"{dtype} routes on cuda", str(cuda.blocks[0].qkv))
        ours = shard_logits(cuda, batch)
        cpu = shard_logits(ShardModel(weights.spec, weights=weights, device="cpu", dtype=dtype), batch)
        # the GPU runs bf16 activations, the CPU fp32: compared on the logits' scale
        record(f"logits {dtype} cuda (bf16 activations) vs {dtype} cpu: max |diff| / max |logit|",
               round((ours - cpu).abs().max().item() / cpu.abs().max().item(), 6))
        record(f"logits {dtype} cuda: top-1 agreement with {dtype} cpu",
               round((ours.argmax(-1) == cpu.argmax(-1)).float().mean().item(), 4))
    del hf
    torch.cuda.empty_cache()


def check_greedy(path: Path) -> None:
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(DEVICE).eval()
    llm = LLM(str(path), device=DEVICE, dtype="float32")
    same = 0
    for prompt in prompts():
        ours = llm.generate(prompt, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))[0].token_ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=48, min_new_tokens=48,
                              do_sample=False)[0, len(prompt):].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), len(ref))
        print(f"  prompt of {len(prompt)}: first {agree} of 48 greedy tokens equal", flush=True)
        same += agree == len(ref)
    record("greedy fp32 cuda: prompts whose 48 tokens equal transformers'", f"{same}/3")
    llm.close()
    del hf
    torch.cuda.empty_cache()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(run, repeats: int = 3) -> float:
    run()  # warm-up: kernels compiled, caches grown
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def decode_rate(generate, batch: int, tokens: int) -> float:
    """Decode tokens/s: the run with `tokens` new tokens less the run with one (its prefill)."""
    return batch * (tokens - 1) / (timed(lambda: generate(batch, tokens)) - timed(lambda: generate(batch, 1)))


def check_speed(path: Path) -> None:
    prompt = prompts(1)[0][:7] * 4  # 28 tokens
    bandwidth = 4.8e12  # H200 HBM3e, the datasheet's figure
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).to(DEVICE).eval()

    def hf_generate(batch: int, tokens: int) -> None:
        with torch.no_grad():
            ids = torch.tensor([prompt] * batch, device=DEVICE)
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                        do_sample=False, pad_token_id=0)

    rates, weight_bytes = {}, {}  # (engine and format, batch) -> tokens/s; format -> bytes a step reads
    for batch in (1, 32):
        rates[("transformers bfloat16", batch)] = decode_rate(hf_generate, batch, 64)
    hf = None  # its memory back before ours loads
    torch.cuda.empty_cache()
    for dtype in ("bfloat16", "int8", "int4"):
        llm = LLM(str(path), device=DEVICE, dtype=dtype)
        weight_bytes[dtype] = llm.executor.shard.weight_bytes()

        def ours(batch: int, tokens: int, llm=llm) -> None:
            llm.generate([prompt] * batch, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))

        for batch in (1, 32):
            rates[(f"shardwise {dtype}", batch)] = decode_rate(ours, batch, 64)
        llm.close()
        torch.cuda.empty_cache()
    peer = {b: rates[("transformers bfloat16", b)] for b in (1, 32)}
    for (name, batch), rate in rates.items():
        share = weight_bytes[name.split()[-1]] * rate / batch / bandwidth
        record(f"decode batch {batch} {name}", f"{rate:.0f} tok/s, {rate / peer[batch]:.2f}x transformers, "
                                             f"{100 * share:.1f} % of HBM bandwidth (weights only)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    logging.basicConfig(level=logging.WARNING)
    record("device", torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE)
    sections = {"logits": lambda: check_logits(build(dict(SMOL, num_hidden_layers=6), args.tokenizer, torch.float32)),
                "greedy": lambda: check_greedy(build(SMOL, args.tokenizer, torch.float32))}
    sections["speed"] = lambda: check_speed(build(ONE_B, args.tokenizer, torch.bfloat16))
    for name, run in sections.items():
        if name in args.skip:
            continue
        started = time.perf_counter()
        try:
            run()
        except Exception as e:  # a check that breaks still lets the others report
            record(f"{name} FAILED", f"{type(e).__name__}: {e}")
            logging.exception(name)
        record(f"{name} seconds", round(time.perf_counter() - started, 1))
        if args.out:
            args.out.write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
