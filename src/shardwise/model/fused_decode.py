"""A pure decode step through all of a shard's layers in one call to the CPU kernels.

Op by op, a layer of a decode step is ~10 Python calls around the kernels (norms, products,
attention, SwiGLU, residual adds): on SmolLM2-135M a third of a single-stream step. Where every
layer is plain (pre-norm attention without q/k norms, a SwiGLU MLP, one RoPE, CPU fp32 or
quantised matrices) `sw_decode_layers` runs them all from one description built at load; the
kernels and their order are the same, so is the output.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from shardwise import kernels
from shardwise.model.layers import TILED_ROWS, Block, GatedMLP, PackedBatch
from shardwise.quant import QuantizedWeight
from shardwise.quant.quantized import DIRECT_ROWS, KERNEL_ROWS


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _matrix(weight: torch.Tensor | QuantizedWeight) -> kernels.Matrix:
    if isinstance(weight, QuantizedWeight):
        return kernels.Matrix(weight.bits, weight.qs.data_ptr(), weight.scales.data_ptr(), _pointer(weight.mins),
                              *weight.shape)
    return kernels.Matrix(0, weight.data_ptr(), None, None, *weight.shape)


def _plain(block: Block) -> bool:
    """Whether cpu.cpp's DecodeLayer describes the block: what sw_decode_layers runs."""
    mlp = block.mlp
    if not isinstance(mlp, GatedMLP) or mlp.act is not F.silu or block.rope_kind != "global":
        return False
    if any(t is not None for t in (block.q_norm, block.post_attn_norm, block.post_mlp_norm)):
        return False
    matrices = (block.qkv, block.o, mlp.gate_up, mlp.down)
    floats = [t for t in (block.attn_norm, block.mlp_norm, block.qkv_bias, *matrices)
              if isinstance(t, torch.Tensor)]
    quantised = [w for w in matrices if isinstance(w, QuantizedWeight)]
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in floats) and all(
        w.device.type == "cpu" and w.qs.is_contiguous() for w in quantised)


class FusedDecode:
    def __init__(self, blocks: list[Block]):
        self.lib = kernels.library()
        spec = blocks[0].spec
        self.hidden = spec.hidden_size
        self.layers = (kernels.DecodeLayer * len(blocks))(*[
            kernels.DecodeLayer(_pointer(b.attn_norm), _pointer(b.mlp_norm), _pointer(b.qkv_bias), _matrix(b.qkv),
                                _matrix(b.o), _matrix(b.mlp.gate_up), _matrix(b.mlp.down), spec.num_heads,
                                spec.num_kv_heads, spec.head_dim, b.window or 0, b.eps, b.scale,
                                spec.attn_softcap or 0.0)
            for b in blocks])
        # fp32 matrices take the register-tiled kernel, which beats MKL up to TILED_ROWS rows
        all_quantised = all(isinstance(w, QuantizedWeight) for b in blocks for w in (b.qkv, b.o, b.mlp.gate_up,
                                                                                      b.mlp.down))
        self.max_rows = KERNEL_ROWS if all_quantised else TILED_ROWS

    @classmethod
    def for_blocks(cls, blocks: list[Block]) -> FusedDecode | None:
        """The fused step for these blocks, or None where one is not plain or there are no kernels."""
        if not blocks or not all(_plain(b) for b in blocks) or kernels.library() is None:
            return None
        return cls(blocks)

    def applies(self, batch: PackedBatch, tokens: int) -> bool:
        return not batch.chunks and tokens <= self.max_rows

    def __call__(self, x: torch.Tensor, batch: PackedBatch, kv: torch.Tensor) -> torch.Tensor:
        """x [seqs, hidden] after the layers; kv: the shard's pool [layers, 2, kv_heads, slots, dim]."""
        x = x.clone(memory_format=torch.contiguous_format)  # (a received input may be read-only)
        cos, sin = (t[:, 0].contiguous() for t in batch.rope["global"])
        write_slots, slots = batch.write_slots.contiguous(), batch.decode_slots.contiguous()
        totals = batch.decode_totals.contiguous()
        step = kernels.DecodeStep(cos.data_ptr(), sin.data_ptr(), cos.shape[-1], kv.data_ptr(), kv.shape[3],
                                  write_slots.data_ptr(), slots.data_ptr(), totals.data_ptr(), x.shape[0],
                                  slots.shape[1], DIRECT_ROWS)
        self.lib.sw_decode_layers(self.layers, len(self.layers), ctypes.byref(step), self.hidden, x.data_ptr())
        return x
