"""A bandwidth-bound model: shardwise vs llama.cpp on Llama-3.2-1B- and 3B-shaped GGUFs, one run.

SmolLM2-135M is dominated by per-step overhead; real users run models whose decode step is bound by
reading the weights. This writes GGUFs shaped like Llama-3.2-1B / 3B (their layers, heads and
widths; SmolLM2's tokenizer, so the vocabulary and tied head are 49152 wide, not 128256) with the
`gguf` library, in llama.cpp's block formats (Q4_0, Q4_K, Q8_0 layers, a Q8_0 embedding / head).
The blocks are random (valid scales): neither engine's speed depends on the values. Both engines
decode the same file at batch 1, paired and interleaved, medians of repeats; shardwise also at
batch 32 (llama-cpp-python has no batching). Each figure is put against this machine's measured
limits (`shardwise.perf.profile`'s read bandwidth and fp32 matmul FLOP/s):
  batch 1:  (bytes of weights + KV read per token) / bandwidth  -> the fastest possible tok/s
  batch 32: FLOPs per token x 32 / FLOP/s                        -> the fastest possible tok/s

    python benchmarks/bandwidth.py [--shape 1b] [--formats Q4_0,Q4_K,Q8_0] [--threads 2] [--repeats 3]

The files are written once into shardwise's cache (1B: ~0.7 GB Q4_0, 1.2 GB Q8_0).
"""

from __future__ import annotations

import argparse
import statistics

import gguf
import numpy as np
import torch
from llama_server import llama_cpp_decode_rate, require_llama_cpp
from side_by_side import paired_medians, print_ratio_table

from shardwise.cache import cache_dir
from shardwise.model.registry import DEFAULT_MODEL, resolve

# (layers, hidden, intermediate, heads, kv heads): Llama 3.2's published shapes
SHAPES = {"1b": (16, 2048, 8192, 32, 8), "3b": (28, 3072, 8192, 24, 8)}
Q = gguf.GGMLQuantizationType
CONTEXT = 128  # tokens of prompt before the timed decode
# each layer format's block scale d: random values then come out at ~0.02, like a trained model's
SCALE = {Q.Q4_0: 0.0043, Q.Q4_K: 0.00005, Q.Q8_0: 0.00027}


def _blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of one matrix as the raw bytes GGUF stores, with scales that keep values ~0.02."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    raw[..., 0:2] = np.frombuffer(np.float16(SCALE[qtype]).tobytes(), np.uint8)  # d: each format's first field
    if qtype == Q.Q4_K:
        raw[..., 2:4] = np.frombuffer(np.float16(0.0004).tobytes(), np.uint8)  # dmin
    return raw.reshape(rows, -1)


def write_model(shape: str, layer_format: str) -> str:
    """The model's GGUF in the cache (written the first time), with SmolLM2's tokenizer."""
    layers, hidden, inter, heads, kv_heads = SHAPES[shape]
    path = cache_dir() / "bandwidth" / f"llama-3.2-{shape}-shaped-{layer_format}.gguf"
    if path.is_file():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = gguf.GGUFReader(resolve(DEFAULT_MODEL))
    vocab = int(source.fields["llama.vocab_size"].contents())
    partial = path.with_name(path.name + ".tmp")  # (renamed once whole: a killed run leaves no half model)
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            writer.add_key_value(name, field.contents(), kind, field.types[-1] if kind == gguf.GGUFValueType.ARRAY
                                 else None)
    rng = np.random.default_rng(0)
    qtype = Q[layer_format]

    def matrix(name: str, rows: int, cols: int, kind: Q) -> None:
        writer.add_tensor(name, _blocks(kind, rows, cols, rng), raw_dtype=kind)  # shape from the bytes

    matrix("token_embd.weight", vocab, hidden, Q.Q8_0)  # tied: also the LM head
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    dim = hidden // heads
    for i in range(layers):
        for part, rows, cols in (("attn_q", heads * dim, hidden), ("attn_k", kv_heads * dim, hidden),
                                 ("attn_v", kv_heads * dim, hidden), ("attn_output", hidden, heads * dim),
                                 ("ffn_gate", inter, hidden), ("ffn_up", inter, hidden), ("ffn_down", hidden, inter)):
            matrix(f"blk.{i}.{part}.weight", rows, cols, qtype)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(path)
    return str(path)


def per_token(path: str, context: int) -> tuple[int, int, float]:
    """What one token costs: (bytes of weights a decode step reads, bytes of fp32 KV it reads at
    this context, FLOPs: 2 x the multiply-adds of every matrix it passes through, the head included)."""
    reader = gguf.GGUFReader(path)
    weights = sum(int(t.n_bytes) for t in reader.tensors)  # the embedding is read as the tied head
    flops = 2.0 * sum(int(t.n_elements) for t in reader.tensors if len(t.shape) == 2)
    field = {name: int(reader.fields[f"llama.{name}"].contents())
             for name in ("block_count", "attention.head_count_kv", "embedding_length", "attention.head_count")}
    dim = field["embedding_length"] // field["attention.head_count"]
    return weights, field["block_count"] * 2 * field["attention.head_count_kv"] * dim * context * 4, flops


def compare(path: str, layer_format: str, threads: int, repeats: int, n: int, bandwidth: float,
            flops: float) -> list[tuple[str, float, float, float]]:
    """The table's rows for one file: both engines at batch 1, shardwise at batch 32, against the limits."""
    from shardwise import LLM, SamplingParams

    Llama = require_llama_cpp()
    ours = LLM(path, dtype="int8" if layer_format == "Q8_0" else "int4", threads=threads,
               prefix_cache=False)  # (the prompts repeat)
    theirs = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                   verbose=False)
    prompt = list(range(1000, 1000 + CONTEXT))
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    weights, kv, token_flops = per_token(path, CONTEXT + n // 2)
    limit = bandwidth / (weights + kv)
    rates = [[ours.generate([prompt], params)[0].decode_tokens_per_s, llama_cpp_decode_rate(theirs, prompt, n)]
             for _ in range(repeats)]  # (the two interleaved)
    a, b = (statistics.median(r[i] for r in rates) for i in (0, 1))
    label = f"{layer_format} ({(weights + kv) / 1e9:.2f} GB/token)"
    batch = 32
    seconds = paired_medians(repeats, (ours.generate,), [prompt[i:i + 16] for i in range(batch)], params)[0]
    rate, arithmetic = batch * n / seconds, flops / token_flops
    return [(f"{label} decode batch 1 (tok/s)", a, b, a / b),
            (f"{label} batch 1, % of bandwidth limit {limit:.1f} tok/s", 100 * a / limit, 100 * b / limit, a / b),
            (f"{label} batch 32 aggregate (tok/s) vs llama.cpp single stream", rate, b, rate / b),
            (f"{label} batch 32, % of FLOP/s limit {arithmetic:.1f} tok/s", 100 * rate / arithmetic,
             100 * b / arithmetic, rate / b)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--formats", default="Q4_0,Q4_K,Q8_0", help="layer formats, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    formats = args.formats.split(",")
    if unknown := [f for f in formats if f not in Q.__members__ or Q[f] not in SCALE]:
        raise SystemExit(f"unknown layer format(s) {unknown}: choose from {', '.join(q.name for q in SCALE)}")
    torch.set_num_threads(args.threads)
    require_llama_cpp()
    from shardwise.perf.profile import matmul_flops, read_bandwidth

    cpu = torch.device("cpu")
    # the best of a few: the machine's limit (one measurement on a shared machine may meet a neighbour)
    bandwidth = max(read_bandwidth(cpu) for _ in range(5))
    flops = max(matmul_flops(cpu, torch.float32) for _ in range(3))
    rows = []
    for layer_format in formats:
        rows += compare(write_model(args.shape, layer_format), layer_format, args.threads, args.repeats,
                        args.new_tokens, bandwidth, flops)
    title = (f"Llama-3.2-{args.shape.upper()}-shaped GGUF, shardwise vs llama.cpp, {args.threads} threads, medians of "
             f"{args.repeats}; this machine: read {bandwidth / 1e9:.1f} GB/s, fp32 matmul {flops / 1e9:.0f} GFLOP/s; "
             "targets: batch 1 >= 1.2x llama.cpp and >= 75 % of the bandwidth limit")
    print_ratio_table(title, ("shardwise", "llama.cpp"), rows)


if __name__ == "__main__":
    main()
