"""Write an HF model directory as GGUF, the way llama.cpp's converter lays it out (llama,
Mistral and Mixtral under "llama" with q/k rows interleaved, Gemma norms as 1 + weight,
Phi-3's fused projections, Llama 3 RoPE scaling as a rope_freqs tensor), with the gguf
library's writer. Weights and architecture metadata only: the tests need no tokenizer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from shardwise.model.layers import rope_inv_freq
from shardwise.model.weights import GGUF_ROPE_PERMUTED, SafetensorsWeights, native_name

GGUF_ARCH = {"mistral": "llama", "mixtral": "llama"}


def _permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of the reader's un-permutation: rotate-half pairs to interleaved pairs."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, out: Path) -> Path:
    weights = SafetensorsWeights(model_dir)
    spec = weights.spec
    arch = GGUF_ARCH.get(spec.architecture, spec.architecture)
    writer = gguf.GGUFWriter(out, arch)
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.rotary_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if spec.sliding_window:
        writer.add_sliding_window(spec.sliding_window)
        writer.add_sliding_window_pattern([spec.window(i) is not None for i in range(spec.num_layers)])
    if spec.rope_local_theta:
        writer.add_rope_freq_base_swa(spec.rope_local_theta)
    if spec.num_experts:
        writer.add_expert_count(spec.num_experts)
        writer.add_expert_used_count(spec.experts_per_token)
    if spec.attn_softcap:
        writer.add_attn_logit_softcapping(spec.attn_softcap)
    if spec.final_softcap:
        writer.add_final_logit_softcapping(spec.final_softcap)
    if spec.query_scale:
        writer.add_float32(f"{arch}.attention.query_pre_attn_scalar", spec.query_scale)
    scaling = spec.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":  # llama.cpp stores the per-frequency divisors
        plain = rope_inv_freq(spec.rotary_dim, spec.rope_theta, None)
        writer.add_tensor("rope_freqs.weight", (plain / rope_inv_freq(spec.rotary_dim, spec.rope_theta, scaling))
                          .numpy().astype(np.float32))

    def add(name: str, tensor: np.ndarray) -> None:
        writer.add_tensor(native_name(spec.architecture, name, 0), np.ascontiguousarray(tensor, dtype=np.float32))

    for name in ("embed.weight", "norm.weight", "head.weight"):
        if weights.has(name) and not (name == "head.weight" and spec.tie_embeddings):
            add(name, weights.get(name).numpy())
    for i in range(spec.num_layers):
        for part in weights.layer_parts:
            for kind in ("weight", "bias"):
                name = f"layers.{i}.{part}.{kind}"
                if not weights.has(name):
                    continue
                tensor = weights.get(name).numpy()
                if spec.architecture in GGUF_ROPE_PERMUTED and part in ("q", "k") and kind == "weight":
                    tensor = _permute_rope(tensor, spec.num_heads if part == "q" else spec.num_kv_heads)
                add(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
