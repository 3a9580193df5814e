"""QuantizedWeight: a weight matrix (or a stack of them) kept in blocks of 32 along its rows.

bits 8: int8 values, w = scale * q (GGUF's Q8_0). bits 4: two values a byte, element j of a
block in the low nibble of byte j and element j + 16 in its high nibble, w = scale * q + min
(GGUF's Q4_1; Q4_0 and Q4_K convert to it exactly). Scales and mins are fp16, one a block.
A product reads these bytes directly: on a CPU by the compiled kernels, on a GPU by the Triton
kernel; elsewhere (no compiler, no Triton) the weight is dequantised for each product, which is
correct but not fast (shardwise.model.product chooses, per weight, when it loads).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from shardwise import kernels

BLOCK = 32
BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantizedWeight:
    bits: int
    qs: torch.Tensor  # uint8 [..., rows, cols (8 bits) or cols / 2 (4 bits)]
    scales: torch.Tensor  # float16 [..., rows, cols / 32]
    mins: torch.Tensor | None  # float16 like scales (4 bits), else None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.scales.shape[:-1], self.scales.shape[-1] * BLOCK))

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.mins) if t is not None)

    def _map(self, fn) -> QuantizedWeight:
        return replace(self, qs=fn(self.qs), scales=fn(self.scales), mins=None if self.mins is None else fn(self.mins))

    def __getitem__(self, index: int) -> QuantizedWeight:
        """One matrix of a stack (an expert)."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return self._map(lambda t: t.to(device))

    def row_blocks(self, rows: int) -> list[QuantizedWeight]:
        if self.qs.shape[0] <= rows:
            return [self]  # (no new views per product for most layer weights)
        return [self._map(lambda t, a=a: t[a : a + rows]) for a in range(0, self.qs.shape[0], rows)]

    def permute_rows(self, order: torch.Tensor) -> QuantizedWeight:
        return self._map(lambda t: t.index_select(-2, order))

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """The parts stacked along their rows (fused projections); all of one kind."""
        if len({p.bits for p in parts}) > 1:  # e.g. a 4-bit gate beside an 8-bit up: widen all to 8 bits
            parts = [quantize(p.dequantize(), 8) if p.bits == 4 else p for p in parts]
        first = parts[0]
        return replace(first, qs=torch.cat([p.qs for p in parts], -2), scales=torch.cat([p.scales for p in parts], -2),
                       mins=None if first.mins is None else torch.cat([p.mins for p in parts], -2))

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or the given rows of it: an embedding lookup) as dtype."""
        lib = kernels.library() if self.device.type == "cpu" and self.qs.dim() == 2 and rows is None else None
        if lib is not None:
            out = torch.empty(self.shape)
            lib.sw_dequantize(self.bits, self.qs.data_ptr(), self.scales.data_ptr(), self._mins_ptr(),
                              out.shape[0], out.shape[1], out.data_ptr())
            return out.to(dtype)
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        qs, scales = pick(self.qs), pick(self.scales).to(dtype)[..., None]
        if self.bits == 8:
            values = qs.view(torch.int8).unflatten(-1, (-1, BLOCK)).to(dtype) * scales
        else:
            nibbles = qs.unflatten(-1, (-1, BLOCK // 2))
            values = torch.cat((nibbles & 0x0F, nibbles >> 4), -1).to(dtype) * scales
            values += pick(self.mins).to(dtype)[..., None]
        return values.flatten(-2)

    def _mins_ptr(self) -> int | None:
        return None if self.mins is None else self.mins.data_ptr()


def quantize(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    """Round a float weight [..., rows, cols] (cols a multiple of 32) to blocks: 8 bits
    symmetric (scale = max|w| / 127), 4 bits over each block's range (min, scale = range / 15)."""
    blocks = weight.float().unflatten(-1, (-1, BLOCK))
    if bits == 8:
        scales = blocks.abs().amax(-1, keepdim=True) / 127
        q = torch.where(scales > 0, blocks / scales, 0).round().clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(8, q.view(torch.uint8).flatten(-2), scales.squeeze(-1).half(), None)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    scales = ((high - low) / 15).half().float()  # rounded as stored, so the values round against it
    mins = low.half().float()
    q = torch.where(scales > 0, (blocks - mins) / scales, 0).round().clamp(0, 15).to(torch.uint8)
    packed = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
    return QuantizedWeight(4, packed.flatten(-2), scales.squeeze(-1).half(), mins.squeeze(-1).half())
