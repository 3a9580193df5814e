"""Transformer blocks over a packed batch.

A batch is packed: the new tokens of every sequence lie one after another in a
[tokens, hidden] tensor, with no padding. Projections and the MLP run on all
tokens at once; attention runs per sequence against that sequence's own KV, so
sequences of different lengths never see each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardwise.engine.kv_cache import SequenceKV
from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec


@dataclass
class PackedBatch:
    """Where each sequence's new tokens lie in the packed tensor, and their RoPE angles."""

    spans: list[tuple[int, int, SequenceKV]]  # (offset, new tokens, its KV)
    cos: torch.Tensor  # [tokens, head_dim]
    sin: torch.Tensor


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ShardwiseError(f"RoPE scaling '{kind}' is not supported yet; supported: linear, llama3")


class RotaryTable:
    """cos/sin for every position seen so far, extended on demand."""

    def __init__(self, spec: ModelSpec, device: torch.device):
        self.inv_freq = rope_inv_freq(spec).to(device)
        self.cos = self.sin = torch.empty(0, spec.head_dim, device=device)

    def lookup(self, positions: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        if upto > self.cos.shape[0]:
            n = max(upto, 2 * self.cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, device=self.inv_freq.device).float(), self.inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = angles.cos(), angles.sin()
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; rotate-half convention (HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block:
    """One decoder layer: pre-norm attention and a SwiGLU MLP, with fused weights."""

    def __init__(self, spec: ModelSpec, index: int, tensors: dict[str, torch.Tensor]):
        self.spec, self.index = spec, index
        self.eps = spec.norm_eps
        self.attn_norm = tensors["attn_norm.weight"]
        self.mlp_norm = tensors["mlp_norm.weight"]
        # One GEMM for q, k, v and one for gate, up: fewer, larger matrix products.
        self.qkv = torch.cat([tensors["q.weight"], tensors["k.weight"], tensors["v.weight"]])
        self.qkv_bias = (
            torch.cat([tensors["q.bias"], tensors["k.bias"], tensors["v.bias"]])
            if spec.attention_bias else None
        )
        self.o = tensors["o.weight"]
        self.gate_up = torch.cat([tensors["gate.weight"], tensors["up.weight"]])
        self.down = tensors["down.weight"]
        self.scale = spec.head_dim ** -0.5

    def __call__(self, x: torch.Tensor, batch: PackedBatch, layer: int) -> torch.Tensor:
        x = x + self.attention(F.rms_norm(x, (x.shape[-1],), self.attn_norm, self.eps), batch, layer)
        h = F.rms_norm(x, (x.shape[-1],), self.mlp_norm, self.eps)
        gate, up = F.linear(h, self.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down)

    def attention(self, h: torch.Tensor, batch: PackedBatch, layer: int) -> torch.Tensor:
        spec = self.spec
        tokens = h.shape[0]
        qkv = F.linear(h, self.qkv, self.qkv_bias)
        q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        q = apply_rope(q.view(tokens, spec.num_heads, spec.head_dim), batch.cos, batch.sin)
        k = apply_rope(k.view(tokens, spec.num_kv_heads, spec.head_dim), batch.cos, batch.sin)
        v = v.view(tokens, spec.num_kv_heads, spec.head_dim)
        out = torch.empty_like(q)
        for offset, length, kv in batch.spans:
            end = offset + length
            keys, values = kv.write(layer, k[offset:end], v[offset:end])
            out[offset:end] = self._attend(q[offset:end].transpose(0, 1), keys, values).transpose(0, 1)
        return F.linear(out.view(tokens, spec.q_size), self.o)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """q: [heads, new, dim] for the last `new` positions of keys/values [kv_heads, total, dim]."""
        new, total = q.shape[1], keys.shape[1]
        mask = None
        if 1 < new < total:  # a chunk after earlier tokens: causal, offset by what came before
            past = total - new
            mask = torch.arange(total, device=q.device) <= (past + torch.arange(new, device=q.device))[:, None]
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=(new == total and new > 1),
            scale=self.scale, enable_gqa=True,
        )
