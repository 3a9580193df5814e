"""Quantised weights kept quantised: int8 (q8) and 4-bit (q4) blocks that matmuls read directly."""

from shardwise.quant.quantized import QuantizedWeight, quantize

__all__ = ["QuantizedWeight", "quantize"]
