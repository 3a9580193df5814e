"""shardwise's GPU kernel: a product that reads quantised weights (QuantizedWeight's blocks) in
place, written in Triton, which ships with CUDA builds of torch.

Each program computes a BLOCK_M x BLOCK_N tile of y = x . W^T over a range of k: it walks it
BLOCK_K values (whole blocks of 32) at a time, widens each [BLOCK_N, BLOCK_K] tile of blocks to x's
dtype in registers (q8: scale * q; q4: scale * q + min, the low nibbles of a block's 16 bytes its
first 16 values and the high nibbles the rest) and multiplies it on the tensor cores, so a token
reads each weight byte once instead of a dequantised copy. Where `takes` says no (not a CUDA
tensor, no Triton) the caller dequantises instead. Under TRITON_INTERPRET=1 the same kernel runs
on CPU tensors, which is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardwise.quant.quantized import QuantizedWeight

log = logging.getLogger(__name__)


# The tile's shape, chosen on an H200 by benchmarks/gpu_kernel.py's sweep over a 1B model's matrices:
# 4x faster than one block (32 values) along k per step, and within 10 % of the best at 1 and at 32 rows
BLOCK_N = 32
BLOCK_K = 128  # a row's values per step (whole blocks): a column reads 64 (q4) or 128 (q8) bytes in one go
BLOCK_K_FEW_ROWS = 256  # up to 16 rows (a decode step), where the weight's bytes are all the time there is
FILL = 2  # programs per multiprocessor that a product's grid should at least make, splitting k if need be


@functools.cache
def _kernel():
    """The jitted kernel, or None without Triton (logged once)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        log.warning("Triton is missing: quantised products on the GPU dequantise their weights (slower)")
        return None

    @triton.jit
    def quant_matmul(x_ptr, qs_ptr, scales_ptr, mins_ptr, bias_ptr, y_ptr, M, N, K, k_per_split,
                     Q4: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr, PARTIAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        HALF: tl.constexpr = BLOCK_K // 2
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        t = tl.arange(0, HALF)
        first = (t // 16) * 32 + t % 16  # the first halves of the chunk's blocks; t + 16 their second halves
        blocks = K // 32
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        start = tl.program_id(2) * k_per_split
        for k0 in range(start, tl.minimum(start + k_per_split, K), BLOCK_K):
            k_ok = k0 + first < K  # (K is whole blocks: a block's halves are in or out together)
            x_at = x_ptr + rows[:, None] * K + k0 + first[None, :]
            x_mask = row_ok[:, None] & k_ok[None, :]
            x_lo = tl.load(x_at, mask=x_mask, other=0.0)
            x_hi = tl.load(x_at + 16, mask=x_mask, other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            block = cols[None, :] * blocks + k0 // 32 + t[:, None] // 16
            scale = tl.load(scales_ptr + block, mask=w_mask, other=0.0).to(tl.float32)
            if Q4:  # [HALF, BLOCK_N] bytes, transposed: a block's values j and j + 16 in its byte j
                packed = tl.load(qs_ptr + cols[None, :] * (K // 2) + k0 // 2 + t[:, None], mask=w_mask, other=0)
                minimum = tl.load(mins_ptr + block, mask=w_mask, other=0.0).to(tl.float32)
                w_lo = (packed & 0x0F).to(tl.float32) * scale + minimum
                w_hi = (packed >> 4).to(tl.float32) * scale + minimum
            else:
                at = qs_ptr + cols[None, :] * K + k0 + first[:, None]
                w_lo = tl.load(at, mask=w_mask, other=0).to(tl.int8, bitcast=True).to(tl.float32) * scale
                w_hi = tl.load(at + 16, mask=w_mask, other=0).to(tl.int8, bitcast=True).to(tl.float32) * scale
            if FP32:  # full fp32 products, not the tensor cores' tf32 (10-bit mantissas)
                acc += tl.dot(x_lo, w_lo, input_precision="ieee")
                acc += tl.dot(x_hi, w_hi, input_precision="ieee")
            else:
                acc += tl.dot(x_lo, w_lo.to(x_lo.dtype))
                acc += tl.dot(x_hi, w_hi.to(x_hi.dtype))
        out = rows[:, None] * N + cols[None, :]
        if PARTIAL:  # one k range's fp32 sum, added up (with the bias) by the caller
            tl.store(y_ptr + tl.program_id(2) * M * N + out, acc, mask=row_ok[:, None] & col_ok[None, :])
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    return quant_matmul


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def takes(device: torch.device) -> bool:
    """Whether the Triton kernel runs on this device: a CUDA one, where Triton is installed."""
    return device.type == "cuda" and _kernel() is not None


def quant_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, k] . W^T (+ bias) in x's dtype, for one matrix; where takes(x.device), or on CPU
    tensors under TRITON_INTERPRET=1. A grid too small to fill the GPU (a decode step's few rows
    over a narrow matrix) splits k as well, each range summing into fp32 partials that are then
    added in a fixed order, so the result does not vary from run to run."""
    kernel = _kernel()
    x = x.contiguous()
    rows, (n, k) = x.shape[0], weight.shape
    block_m = 16 if rows <= 16 else 64  # tensor-core tiles are at least 16 rows; decode pads up to them
    block_k = BLOCK_K_FEW_ROWS if rows <= 16 else BLOCK_K
    tiles, chunks = -(-rows // block_m) * -(-n // BLOCK_N), -(-k // block_k)
    wanted = max(1, -(-FILL * _multiprocessors(x.device) // tiles))
    per_split = -(-chunks // min(chunks, wanted)) * block_k
    splits = -(-k // per_split)
    mins = weight.mins if weight.mins is not None else weight.scales  # (unread for 8 bits)
    out = (torch.empty(splits, rows, n, dtype=torch.float32, device=x.device) if splits > 1
           else torch.empty(rows, n, dtype=x.dtype, device=x.device))
    kernel[(-(-rows // block_m), -(-n // BLOCK_N), splits)](
        x, weight.qs, weight.scales, mins, bias if bias is not None else out, out, rows, n, k, per_split,
        Q4=weight.bits == 4, HAS_BIAS=bias is not None, FP32=x.dtype == torch.float32, PARTIAL=splits > 1,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k)
    if splits == 1:
        return out
    total = out.sum(0)
    return (total if bias is None else total + bias.float()).to(x.dtype)
