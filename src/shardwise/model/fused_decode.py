"""A pure decode step through all of a shard's layers in one call to the CPU kernels.

Op by op, a layer of a decode step is ~10 Python calls around the kernels (norms, products,
attention, SwiGLU, residual adds): on SmolLM2-135M a third of a single-stream step. Where every
layer is a dense decoder layer whose parts the kernels hold (pre-norm attention, with or without
q/k norms (Qwen3) and sandwich norms (Gemma); a SwiGLU or GeGLU MLP; the global RoPE or Gemma 3's
local one; CPU fp32 or quantised matrices) `sw_decode_layers` runs them all from one description
built at load; the kernels and their order are the same, so is the output.
"""

from __future__ import annotations

import ctypes

import torch

from shardwise import kernels
from shardwise.model.layers import Block, GatedMLP, PackedBatch
from shardwise.model.product import DIRECT_ROWS, Product
from shardwise.quant import QuantizedWeight


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _matrix(weight: torch.Tensor | QuantizedWeight) -> kernels.Matrix:
    if isinstance(weight, QuantizedWeight):
        return kernels.Matrix(weight.bits, weight.qs.data_ptr(), weight.scales.data_ptr(), _pointer(weight.mins),
                              *weight.shape)
    return kernels.Matrix(0, weight.data_ptr(), None, None, *weight.shape)


def _matrices(block: Block) -> tuple[Product, ...]:
    return block.qkv, block.o, block.mlp.gate_up, block.mlp.down


def _norms(block: Block) -> list[torch.Tensor | None]:
    """The weights of the block's optional norms, in DecodeLayer's order (None: absent)."""
    return [None if norm is None else norm.weight
            for norm in (block.q_norm, block.k_norm, block.post_attn_norm, block.post_mlp_norm)]


def _fusable(block: Block) -> bool:
    """Whether cpu.cpp's DecodeLayer describes the block: what sw_decode_layers runs. Its
    products must all be the compiled kernels' (the C code chooses among them by rows as the
    products do), on contiguous weights."""
    mlp = block.mlp
    if block.reduce is not None:  # a tensor-parallel block sums its parts between the kernel's halves
        return False
    if not isinstance(mlp, GatedMLP) or not mlp.gate.compiled or not block.compiled_decode:
        return False
    matrices = _matrices(block)
    tensors = [block.attn_norm.weight, block.mlp_norm.weight, block.qkv.bias, *_norms(block),
               *(p.weight.qs if isinstance(p.weight, QuantizedWeight) else p.weight for p in matrices)]
    return all(p.kernel_rows for p in matrices) and all(t is None or t.is_contiguous() for t in tensors)


class FusedDecode:
    def __init__(self, blocks: list[Block]):
        self.lib = kernels.library()
        spec = blocks[0].spec
        self.hidden = spec.hidden_size
        self.layers = (kernels.DecodeLayer * len(blocks))(*[
            kernels.DecodeLayer(_pointer(b.attn_norm.weight), _pointer(b.mlp_norm.weight), _pointer(b.qkv.bias),
                                *(_matrix(p.weight) for p in _matrices(b)), spec.num_heads,
                                spec.num_kv_heads, spec.head_dim, b.window or 0, b.eps, b.scale,
                                spec.attn_softcap or 0.0, *map(_pointer, _norms(b)), b.mlp.gate.gelu,
                                b.rope_kind == "local")
            for b in blocks])
        # up to the rows where every product is still a compiled kernel's
        self.max_rows = min(p.kernel_rows for b in blocks for p in _matrices(b))

    @classmethod
    def for_blocks(cls, blocks: list[Block]) -> FusedDecode | None:
        """The fused step for these blocks, or None where one is not fusable (or there are no kernels)."""
        if not blocks or not all(_fusable(b) for b in blocks):
            return None
        return cls(blocks)

    def applies(self, batch: PackedBatch, tokens: int) -> bool:
        return not batch.chunks and tokens <= self.max_rows

    def __call__(self, x: torch.Tensor, batch: PackedBatch, kv: torch.Tensor) -> torch.Tensor:
        """x [seqs, hidden] after the layers; kv: the shard's pool [layers, 2, kv_heads, slots, dim]."""
        x = x.clone(memory_format=torch.contiguous_format)  # (a received input may be read-only)
        rope = batch.rope  # (the kinds the shard's layers turn by: one may be absent)
        cos, sin = (t[:, 0].contiguous() for t in rope.get("global", rope.get("local")))
        local_cos, local_sin = (t[:, 0].contiguous() for t in rope.get("local", rope.get("global")))
        write_slots, slots = batch.write_slots.contiguous(), batch.decode_slots.contiguous()
        totals = batch.decode_totals.contiguous()
        step = kernels.DecodeStep(cos.data_ptr(), sin.data_ptr(), cos.shape[-1], local_cos.data_ptr(),
                                  local_sin.data_ptr(), local_cos.shape[-1], kv.data_ptr(), kv.shape[3],
                                  write_slots.data_ptr(), slots.data_ptr(), totals.data_ptr(), x.shape[0],
                                  slots.shape[1], DIRECT_ROWS)
        self.lib.sw_decode_layers(self.layers, len(self.layers), ctypes.byref(step), self.hidden, x.data_ptr())
        return x
