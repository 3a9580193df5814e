"""shardwise's GPU kernel: a product that reads quantised weights (QuantizedWeight's blocks) in
place, written in Triton, which ships with CUDA builds of torch.

Each program computes a BLOCK_M x BLOCK_N tile of y = x . W^T: it walks the weight's blocks of 32
along k, widens each [BLOCK_N, 32] tile of blocks to x's dtype in registers (q8: scale * q; q4:
scale * q + min, the low nibbles of a block's 16 bytes its first 16 values and the high nibbles
the rest) and multiplies it on the tensor cores, so a token reads each weight byte once instead
of a dequantised copy. Where `takes` says no (not a CUDA tensor, no Triton) the caller
dequantises instead. Under TRITON_INTERPRET=1 the same kernel runs on CPU tensors, which is how
the tests check it on machines without a GPU.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardwise.quant.quantized import QuantizedWeight

log = logging.getLogger(__name__)


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
    def quant_matmul(x_ptr, qs_ptr, scales_ptr, mins_ptr, bias_ptr, y_ptr, M, N, K,
                     Q4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        HALF: tl.constexpr = 16
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        half = tl.arange(0, HALF)
        blocks = K // 32
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b in range(0, blocks):
            k0 = b * 32
            scale = tl.load(scales_ptr + cols * blocks + b, mask=col_ok, other=0.0).to(tl.float32)
            x_lo = tl.load(x_ptr + rows[:, None] * K + k0 + half[None, :], mask=row_ok[:, None], other=0.0)
            x_hi = tl.load(x_ptr + rows[:, None] * K + k0 + HALF + half[None, :], mask=row_ok[:, None], other=0.0)
            if Q4:  # [16, BLOCK_N] bytes of the block, transposed: values j and j + 16 in byte j
                packed = tl.load(qs_ptr + cols[None, :] * (K // 2) + b * HALF + half[:, None], mask=col_ok[None, :],
                                 other=0)
                low, high = (packed & 0x0F).to(tl.float32), (packed >> 4).to(tl.float32)
                minimum = tl.load(mins_ptr + cols * blocks + b, mask=col_ok, other=0.0).to(tl.float32)
                w_lo = low * scale[None, :] + minimum[None, :]
                w_hi = high * scale[None, :] + minimum[None, :]
            else:
                at = qs_ptr + cols[None, :] * K + k0 + half[:, None]
                w_lo = tl.load(at, mask=col_ok[None, :], other=0).to(tl.int8, bitcast=True).to(tl.float32)
                w_hi = tl.load(at + HALF, mask=col_ok[None, :], other=0).to(tl.int8, bitcast=True).to(tl.float32)
                w_lo, w_hi = w_lo * scale[None, :], w_hi * scale[None, :]
            acc += tl.dot(x_lo, w_lo.to(x_lo.dtype))
            acc += tl.dot(x_hi, w_hi.to(x_hi.dtype))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    return quant_matmul


def takes(device: torch.device) -> bool:
    """Whether the Triton kernel runs on this device: a CUDA one, where Triton is installed."""
    return device.type == "cuda" and _kernel() is not None


def quant_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, k] . W^T (+ bias) in x's dtype, for one matrix; where takes(x.device), or on CPU
    tensors under TRITON_INTERPRET=1."""
    kernel = _kernel()
    x = x.contiguous()
    rows, (n, k) = x.shape[0], weight.shape
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_m = 16 if rows <= 16 else 64  # tensor-core tiles are at least 16 rows; decode pads up to them
    grid = (-(-rows // block_m), -(-n // 64))
    mins = weight.mins if weight.mins is not None else weight.scales  # (unread for 8 bits)
    kernel[grid](x, weight.qs, weight.scales, mins, bias if bias is not None else y, y, rows, n, k,
                 Q4=weight.bits == 4, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=64)
    return y
