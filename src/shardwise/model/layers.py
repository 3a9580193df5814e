"""Transformer blocks over a packed batch.

A batch is packed: the new tokens of every sequence lie one after another in a
[tokens, hidden] tensor, with no padding. Projections and the MLP run on all
tokens at once. Attention never mixes sequences: sequences decoding one token
attend together in one padded, masked batch; prompt chunks attend one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec


@dataclass
class PackedBatch:
    """Where a step's tokens go: their RoPE angles, their KV slots, and how they attend."""

    cos: torch.Tensor  # [tokens, 1, head_dim]
    sin: torch.Tensor
    write_slots: torch.Tensor  # [tokens]: the KV slot of each new token
    chunks: list[tuple[int, int, torch.Tensor]]  # prompt chunks: (offset, new tokens, slots of all positions)
    decode_rows: torch.Tensor  # [decoding]: offsets of the one-token sequences, attended as one batch
    decode_slots: torch.Tensor  # [decoding, longest]: their KV slots, padded
    decode_bias: torch.Tensor | None  # [decoding, 1, longest]: -inf over the padding; None if none


SPLIT_ROWS = 64  # up to this many rows, the split GEMM below beats MKL's own threading here


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a CPU fp32 product with few rows (decode, short chunks) is split into
    row blocks of the weight run as one batched GEMM, a block per core: MKL threads such skinny
    products poorly (its GEMV uses one core). 1.2-2x faster for 1-64 rows on 2 cores; from ~128
    rows MKL's own threading wins."""
    rows = x.shape[0]
    if rows <= SPLIT_ROWS and x.device.type == "cpu" and weight.dtype == torch.float32:
        parts = math.gcd(weight.shape[0], torch.get_num_threads())
        if parts > 1:
            blocks = torch.bmm(weight.view(parts, -1, weight.shape[1]), x.t().expand(parts, -1, -1))
            out = blocks.permute(2, 0, 1).reshape(rows, -1)  # [parts, out / parts, rows] -> [rows, out]
            return out if bias is None else out + bias
    return F.linear(x, weight, bias)


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

    def __call__(self, x: torch.Tensor, batch: PackedBatch, cache: torch.Tensor) -> torch.Tensor:
        """cache: this layer's KV pool [2, kv_heads, slots, head_dim]."""
        x = x + self.attention(F.rms_norm(x, (x.shape[-1],), self.attn_norm, self.eps), batch, cache)
        h = F.rms_norm(x, (x.shape[-1],), self.mlp_norm, self.eps)
        gate, up = linear(h, self.gate_up).chunk(2, dim=-1)
        return x + linear(F.silu(gate) * up, self.down)

    def attention(self, h: torch.Tensor, batch: PackedBatch, cache: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        tokens = h.shape[0]
        qkv = linear(h, self.qkv, self.qkv_bias)
        q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        q = apply_rope(q.view(tokens, spec.num_heads, spec.head_dim), batch.cos, batch.sin)
        k = apply_rope(k.view(tokens, spec.num_kv_heads, spec.head_dim), batch.cos, batch.sin)
        v = v.view(tokens, spec.num_kv_heads, spec.head_dim)
        keys, values = cache[0], cache[1]  # [kv_heads, slots, head_dim]
        keys.index_copy_(1, batch.write_slots, k.transpose(0, 1))
        values.index_copy_(1, batch.write_slots, v.transpose(0, 1))
        rows = batch.decode_rows
        if not batch.chunks:  # a pure decode step
            return linear(self._attend_decode(q, keys, values, batch).view(tokens, spec.q_size), self.o)
        out = torch.empty_like(q)
        for offset, length, slots in batch.chunks:
            end = offset + length
            out[offset:end] = self._attend_chunk(q[offset:end], keys[:, slots], values[:, slots])
        if len(rows):
            out[rows] = self._attend_decode(q[rows], keys, values, batch)
        return linear(out.view(tokens, spec.q_size), self.o)

    def _attend_decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       batch: PackedBatch) -> torch.Tensor:
        """One new token per sequence, all sequences at once. q: [seqs, heads, dim];
        keys, values: the pool [kv_heads, slots, dim], gathered here by the batch's padded slots."""
        seqs, longest = batch.decode_slots.shape
        kv_heads, dim = keys.shape[0], keys.shape[-1]
        flat = batch.decode_slots.view(-1)
        keys = keys.index_select(1, flat).view(kv_heads, seqs, longest, dim)
        values = values.index_select(1, flat).view(kv_heads, seqs, longest, dim)
        # query heads grouped by their kv head: [kv_heads, seqs, group, dim]
        grouped = q.view(seqs, kv_heads, -1, dim).transpose(0, 1)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)) * self.scale  # [kv_heads, seqs, group, longest]
        if batch.decode_bias is not None:
            scores = scores + batch.decode_bias
        out = torch.matmul(scores.softmax(-1), values)  # [kv_heads, seqs, group, dim]
        return out.transpose(0, 1).reshape(q.shape)

    def _attend_chunk(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A chunk of `new` tokens q [new, heads, dim] at the end of keys/values [kv_heads, total, dim]."""
        new, total = q.shape[0], keys.shape[1]
        group = self.spec.num_heads // self.spec.num_kv_heads
        # SDPA's fused CPU kernel needs 4-D inputs and equal head counts (its GQA mode and
        # 3-D inputs fall back to a path ~3x slower), so expand the kv heads and add a batch dim.
        keys = keys.repeat_interleave(group, dim=0)[None]
        values = values.repeat_interleave(group, dim=0)[None]
        mask = None
        if new < total:  # a chunk after earlier tokens: causal, offset by what came before
            mask = torch.arange(total, device=q.device) <= (total - new + torch.arange(new, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                             is_causal=mask is None, scale=self.scale)
        return out[0].transpose(0, 1)
