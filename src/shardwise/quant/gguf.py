"""GGUF's block formats read into QuantizedWeight without a round trip through floats.

Q8_0 and Q4_1 are our formats already (bar the order of fields); Q4_0 is Q4_1 with min = -8 *
scale; Q4_K's sub-blocks of 32 have 6-bit scales and mins under two fp16 factors, which
multiply out to one fp16 scale and min a block. Other types return None (the caller
dequantises them with the gguf library and rounds them to the format asked for).
"""

from __future__ import annotations

import numpy as np
import torch

from shardwise.quant.quantized import QuantizedWeight

Q4_0, Q4_1, Q8_0, Q4_K = 2, 3, 8, 12  # GGMLQuantizationType
# the types whose blocks, read here, dequantise to the very floats the gguf library's numpy code
# gives (Q4_K's scales multiply out to fp16 here, so not it), in a twentieth of its time
EXACT_TYPES = (Q4_0, Q4_1, Q8_0)


def _fp16(raw: np.ndarray, start: int) -> np.ndarray:
    return raw[..., start : start + 2].copy().view(np.float16)[..., 0]


def _weight(bits: int, qs: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, shape) -> QuantizedWeight:
    """From per-block arrays [rows, blocks, ...] to tensors of the weight's shape."""
    rows = tuple(shape[:-1])
    return QuantizedWeight(
        bits, torch.from_numpy(np.ascontiguousarray(qs).reshape(*rows, -1)),
        torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float16).reshape(*rows, -1)),
        None if mins is None else torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float16).reshape(*rows, -1)))


def from_gguf(qtype: int, data: np.ndarray, shape: tuple[int, ...]) -> QuantizedWeight | None:
    """data: the tensor's bytes as rows of its innermost dimension; shape: HF order."""
    if qtype == Q8_0:  # fp16 d, 32 x int8
        raw = data.reshape(data.shape[0], -1, 34)
        return _weight(8, raw[..., 2:], _fp16(raw, 0), None, shape)
    if qtype == Q4_0:  # fp16 d, 16 bytes; w = d * (q - 8)
        raw = data.reshape(data.shape[0], -1, 18)
        d = _fp16(raw, 0)
        return _weight(4, raw[..., 2:], d, -8 * d, shape)
    if qtype == Q4_1:  # fp16 d, fp16 m, 16 bytes; w = d * q + m
        raw = data.reshape(data.shape[0], -1, 20)
        return _weight(4, raw[..., 4:], _fp16(raw, 0), _fp16(raw, 2), shape)
    if qtype == Q4_K:
        return _from_q4_k(data.reshape(data.shape[0], -1, 144), shape)
    return None


def _from_q4_k(raw: np.ndarray, shape) -> QuantizedWeight:
    """Super-blocks of 256: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and mins,
    128 bytes of nibbles (32 bytes per pair of sub-blocks: low nibbles the first, high the second).
    w = d * sc * q - dmin * m."""
    d, dmin = _fp16(raw, 0).astype(np.float32), _fp16(raw, 2).astype(np.float32)
    packed = raw[..., 4:16].astype(np.uint8)
    sc = np.empty((*raw.shape[:-1], 8), np.uint8)
    m = np.empty_like(sc)
    sc[..., :4], m[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    sc[..., 4:] = (packed[..., 8:12] & 0x0F) | ((packed[..., 0:4] >> 6) << 4)
    m[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    scales = (d[..., None] * sc).astype(np.float16)  # [rows, super-blocks, 8]
    mins = (-dmin[..., None] * m).astype(np.float16)
    nibbles = raw[..., 16:].reshape(*raw.shape[:-1], 4, 32)
    values = np.stack((nibbles & 0x0F, nibbles >> 4), axis=-2)  # [rows, super, 4, 2, 32]: sub-blocks in order
    values = values.reshape(*raw.shape[:-1], 8, 32)
    qs = values[..., :16] | (values[..., 16:] << 4)  # our order: element j low, j + 16 high
    return _weight(4, qs, scales, mins, shape)
