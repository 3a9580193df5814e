"""Transformer blocks over a packed batch.

A batch is packed: the new tokens of every sequence lie one after another in a
[tokens, hidden] tensor, with no padding. Projections and the MLP run on all
tokens at once. Attention never mixes sequences: sequences decoding one token
attend together in one padded, masked batch; prompt chunks attend one by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from shardwise import kernels
from shardwise.errors import ShardwiseError
from shardwise.model.product import product
from shardwise.model.spec import ModelSpec
from shardwise.quant import QuantizedWeight


@dataclass
class PackedBatch:
    """Where a step's tokens go: their RoPE angles, their KV slots, and how they attend."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # by RoPE kind: cos, sin [tokens, 1, rotary_dim]
    write_slots: torch.Tensor  # [tokens]: the KV slot of each new token
    chunks: list[tuple[int, int, torch.Tensor]]  # prompt chunks: (offset, new tokens, slots of all positions)
    decode_rows: torch.Tensor  # [decoding]: offsets of the one-token sequences, attended as one batch
    decode_slots: torch.Tensor  # [decoding, longest]: their KV slots, padded
    decode_totals: torch.Tensor  # [decoding], on the CPU: the tokens each holds, the new one included
    biases: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def decode_bias(self, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """[decoding, 1, longest]: -inf where a decoding token must not look (the padding, and
        before its sliding window); None when it may look everywhere. Made once per step."""
        if window not in self.biases:
            totals = self.decode_totals[:, None]
            position = torch.arange(self.decode_slots.shape[1])
            keep = position < totals
            if window is not None:
                keep &= position >= totals - window
            self.biases[window] = None if bool(keep.all()) else torch.zeros(keep.shape).masked_fill(
                ~keep, float("-inf"))[:, None, :].to(self.decode_slots.device, dtype)
        return self.biases[window]


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "freq_factors":  # per-frequency divisors, as llama.cpp stores Llama 3 scaling
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
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

    def __init__(self, inv_freq: torch.Tensor, device: torch.device):
        self.inv_freq = inv_freq.to(device)
        self.cos = self.sin = torch.empty(0, 2 * len(inv_freq), device=device)

    @classmethod
    def for_spec(cls, spec: ModelSpec, kind: str, device: torch.device) -> RotaryTable:
        """kind "global": the model's RoPE; "local": the sliding layers' own base, unscaled (Gemma 3)."""
        if kind == "local":
            return cls(rope_inv_freq(spec.rotary_dim, spec.rope_local_theta, None), device)
        return cls(rope_inv_freq(spec.rotary_dim, spec.rope_theta, spec.rope_scaling), device)

    def lookup(self, positions: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        if upto > self.cos.shape[0]:
            n = max(upto, 2 * self.cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, device=self.inv_freq.device).float(), self.inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = angles.cos(), angles.sin()
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; rotate-half convention (HF), over the first cos.shape[-1]
    dims of each head (all of them but with partial rotary)."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm:
    """x / rms(x) * weight over the last dimension: the kernels' single pass where they take the
    weight (a CPU fp32 one: torch's CPU rms_norm is several ops), torch's elsewhere."""

    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.eps = weight, eps
        self.compiled = kernels.takes(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            return kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def optional_norm(tensors: dict[str, torch.Tensor], name: str, eps: float) -> RMSNorm | None:
    return RMSNorm(tensors[name], eps) if name in tensors else None


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def cat_rows(parts: list) -> torch.Tensor | QuantizedWeight:
    """Weights stacked along their output rows, float or quantised."""
    if isinstance(parts[0], QuantizedWeight):
        return QuantizedWeight.cat(parts)
    return torch.cat(parts, dim=-2 if parts[0].dim() > 1 else 0)


def fused(tensors: dict[str, torch.Tensor], name: str, parts: tuple[str, ...]) -> torch.Tensor | None:
    """A fused projection: stored fused (Phi-3), or the parts concatenated along the outputs
    (one larger GEMM instead of several); None where the parts are absent (biases)."""
    if name in tensors:
        return tensors[name]
    kind = name.rsplit(".", 1)[1]
    if f"{parts[0]}.{kind}" not in tensors:
        return None
    return cat_rows([tensors[f"{part}.{kind}"] for part in parts])


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def activations_compiled(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the kernels take a layer's activations: its float tensors (norms, router) are held
    in the activations' dtype (quantised matrices are not), so they answer for them."""
    floats = [t for t in tensors.values() if isinstance(t, torch.Tensor)]
    return bool(floats) and kernels.takes(floats[0])


class Gate:
    """act(gate) * up for gate_up = [gate, up] along the last dimension; SwiGLU and GeGLU by the
    kernels' single pass where they take the activations."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor]):
        self.act = ACTIVATIONS[spec.activation]
        self.gelu = spec.activation == "gelu_pytorch_tanh"
        self.compiled = activations_compiled(tensors)

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            return kernels.gated(gate_up, self.gelu)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up


class GatedMLP:
    """act(x W_gate) * (x W_up), then W_down: SwiGLU or GeGLU."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor]):
        self.gate_up = product(fused(tensors, "gate_up.weight", ("gate", "up")))
        self.down = product(tensors["down.weight"])
        self.gate = Gate(spec, tensors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate(self.gate_up(x)))


class SparseMoE:
    """Mixtral's sparse MLP: a router picks top-k experts per token (softmax, then the k weights
    renormalised); each expert runs only on the tokens routed to it."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor]):
        self.router = product(tensors["router.weight"])  # [experts, hidden]
        gate_up = cat_rows([tensors["experts_gate.weight"], tensors["experts_up.weight"]])
        down = tensors["experts_down.weight"]  # [experts, hidden, intermediate]
        self.experts = [(product(gate_up[e]), product(down[e])) for e in range(spec.num_experts)]
        self.top_k, self.gate = spec.experts_per_token, Gate(spec, tensors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [tokens, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype).view(-1)
        order = experts.view(-1).argsort()  # token-expert pairs grouped by expert
        counts = torch.bincount(experts.view(-1), minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        for expert, pairs in enumerate(order.split(counts)):
            if not len(pairs):
                continue
            tokens = pairs // self.top_k
            gate_up, down = self.experts[expert]
            y = down(self.gate(gate_up(x[tokens])))
            out.index_add_(0, tokens, y * weights[pairs, None])
        return out


class Block:
    """One decoder layer: pre-norm attention and a gated MLP (dense or sparse), with the
    variations of the supported architectures: q/k norms, sandwich norms, a sliding window,
    soft-capped scores."""

    def __init__(self, spec: ModelSpec, index: int, tensors: dict[str, torch.Tensor],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """spec: the model as this block sees it (a tensor-parallel device's heads and columns);
        reduce: sums a tensor-parallel group's partial outputs of attention and of the MLP."""
        self.spec, self.index, self.reduce = spec, index, reduce
        self.eps = spec.norm_eps
        self.window = spec.window(index)
        self.rope_kind = "local" if self.window is not None and spec.rope_local_theta else "global"
        self.attn_norm, self.mlp_norm = (RMSNorm(tensors[f"{name}.weight"], spec.norm_eps)
                                         for name in ("attn_norm", "mlp_norm"))
        self.post_attn_norm = optional_norm(tensors, "post_attn_norm.weight", spec.norm_eps)
        self.post_mlp_norm = optional_norm(tensors, "post_mlp_norm.weight", spec.norm_eps)
        self.q_norm = optional_norm(tensors, "q_norm.weight", spec.norm_eps)
        self.k_norm = optional_norm(tensors, "k_norm.weight", spec.norm_eps)
        self.qkv = product(fused(tensors, "qkv.weight", ("q", "k", "v")), fused(tensors, "qkv.bias", ("q", "k", "v")))
        self.o = product(tensors["o.weight"])
        self.mlp = SparseMoE(spec, tensors) if spec.num_experts else GatedMLP(spec, tensors)
        self.scale = (spec.query_scale or spec.head_dim) ** -0.5
        # a pure decode step's attention in one kernel call (q/k norms, RoPE, KV writes, attention) where
        # the kernels take the activations
        self.compiled_decode = activations_compiled(tensors)

    def __call__(self, x: torch.Tensor, batch: PackedBatch, cache: torch.Tensor) -> torch.Tensor:
        """cache: this layer's KV pool [2, kv_heads, slots, head_dim]."""
        h = self.attention(self.attn_norm(x), batch, cache)
        if self.reduce is not None:
            h = self.reduce(h)
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        h = self.mlp(self.mlp_norm(x))
        if self.reduce is not None:
            h = self.reduce(h)
        return x + (h if self.post_mlp_norm is None else self.post_mlp_norm(h))

    def attention(self, h: torch.Tensor, batch: PackedBatch, cache: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        tokens = h.shape[0]
        qkv = self.qkv(h)
        cos, sin = batch.rope[self.rope_kind]
        keys, values = cache[0], cache[1]  # [kv_heads, slots, head_dim]
        if not batch.chunks and self.compiled_decode:
            norms = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
            return self.o(kernels.decode_attention(qkv, cos[:, 0], sin[:, 0], keys, values, batch.write_slots,
                                                   batch.decode_slots, batch.decode_totals, spec.num_heads,
                                                   self.window, self.scale, spec.attn_softcap, *norms, self.eps))
        q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        q, k = q.view(tokens, spec.num_heads, spec.head_dim), k.view(tokens, spec.num_kv_heads, spec.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(tokens, spec.num_kv_heads, spec.head_dim)
        keys.index_copy_(1, batch.write_slots, k.transpose(0, 1))
        values.index_copy_(1, batch.write_slots, v.transpose(0, 1))
        rows = batch.decode_rows
        if not batch.chunks:  # a pure decode step
            return self.o(self._attend_decode(q, keys, values, batch).view(tokens, spec.q_size))
        out = torch.empty_like(q)
        for offset, length, slots in batch.chunks:
            end = offset + length
            out[offset:end] = self._attend_chunk(q[offset:end], keys[:, slots], values[:, slots])
        if len(rows):
            out[rows] = self._attend_decode(q[rows], keys, values, batch)
        return self.o(out.view(tokens, spec.q_size))

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
        scores = softcap(scores, self.spec.attn_softcap)
        bias = batch.decode_bias(self.window, scores.dtype)
        if bias is not None:
            scores = scores + bias
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
        q = q.transpose(0, 1)[None]
        mask = None
        if new < total or self.window is not None or self.spec.attn_softcap is not None:
            # causal, offset by the tokens before the chunk, and within the window
            position = total - new + torch.arange(new, device=q.device)[:, None]
            key = torch.arange(total, device=q.device)
            mask = key <= position
            if self.window is not None:
                mask &= key > position - self.window
        if self.spec.attn_softcap is not None:  # SDPA cannot soft-cap scores
            scores = softcap(torch.matmul(q, keys.transpose(-1, -2)) * self.scale, self.spec.attn_softcap)
            out = torch.matmul(scores.masked_fill(~mask, float("-inf")).softmax(-1), values)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                                 scale=self.scale)
        return out[0].transpose(0, 1)
