"""Product: one weight's matrix product x [rows, k] . W^T (+ bias), its implementation chosen once,
when the weight loads, for each range of rows a step may bring.

The choices, measured on this project's 2-core AVX2 / AVX-512 machines on layer- and head-sized
weights (their benchmarks: benchmarks/decode.py, benchmarks/engine.py):
- fp32 on a CPU: up to TILED_ROWS the kernels' register-tiled product (1.2-3x MKL; at 17-24
  rows 1.1-1.5x the split GEMM next, a tie at 32: MKL's batched GEMM jumps at 17 rows); up to
  SPLIT_ROWS row blocks of the weight as one batched GEMM, a block per core (MKL threads such
  skinny products poorly: its GEMV uses one core); beyond, MKL's own GEMM.
- quantised blocks on a CPU: up to DIRECT_ROWS the kernels read the blocks directly (bound by
  memory: 2-4x fp32 at 1-2 rows); up to KERNEL_ROWS they dequantise a block of weights at a time
  into L1 and multiply in fp32 (on AVX-512 outer products over packed panels, up to PANEL_ROWS:
  1.9-6x the next at 32 rows); beyond, DEQUANTISED_ROWS weight rows at a
  time are dequantised for MKL's GEMM. (On an AVX2 core integer multiply-adds are no faster
  than fp32 FMAs.) On a GPU, Triton's kernel up to KERNEL_ROWS rows.
- the LM head (the vocabulary wide) on a CPU: the fp32 tile up to HEAD_TILED_ROWS (1.2-1.7x the
  blocks), then HEAD_BLOCK vocabulary rows at a time, each block's output staying in cache (~25 %
  faster than one GEMM from 8 rows up).
Where the compiled kernels cannot be built, the next route takes their rows (kernels/__init__.py
logs why, once).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from shardwise import kernels
from shardwise.kernels import gpu
from shardwise.quant import QuantizedWeight

TILED_ROWS = 32
SPLIT_ROWS = 64
DIRECT_ROWS = 8
KERNEL_ROWS = 128
PANEL_ROWS = 256  # (where the CPU kernels have AVX-512's packed panels: 1.0-1.8x MKL at 129-256 rows)
DEQUANTISED_ROWS = 2048  # a few MB of fp32 at a time: stays in the heap, no page faults
HEAD_TILED_ROWS = 64
HEAD_BLOCK = 2048
HEAD_GEMM_ROWS = 16  # (no tile for this dtype: one GEMM up to here, then vocabulary blocks)
ANY_ROWS = sys.maxsize


class Route(NamedTuple):
    max_rows: int  # the route takes products of up to this many rows (and more than the route before)
    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    compiled: bool = False  # shardwise's own kernel (what a fused decode step can run instead)


@dataclass(frozen=True)
class Product:
    weight: torch.Tensor | QuantizedWeight
    bias: torch.Tensor | None
    routes: tuple[Route, ...]  # by max_rows; the last takes any number

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.route_for(x.shape[0]).run(x)

    def route_for(self, rows: int) -> Route:
        for route in self.routes:
            if rows <= route.max_rows:
                return route
        raise AssertionError("the last route takes any number of rows")

    @property
    def kernel_rows(self) -> int:
        """Up to how many rows shardwise's compiled kernels make this product (0: never)."""
        return max((route.max_rows for route in self.routes if route.compiled), default=0)

    def __str__(self) -> str:
        low, ranges = 1, []
        for route in self.routes:
            high = "+" if route.max_rows == ANY_ROWS else f"-{route.max_rows}"
            ranges.append(f"{low}{high} {route.name}")
            low = route.max_rows + 1
        return ", ".join(ranges)


def product(weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None, *,
            tiled_rows: int = TILED_ROWS) -> Product:
    """The product for a float or quantised weight [n, k] (activations: the float weight's dtype;
    for quantised blocks the device's float dtype)."""
    if isinstance(weight, QuantizedWeight):
        return Product(weight, bias, _quantised_routes(weight, bias))
    routes = []
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        if kernels.takes(weight):
            routes.append(Route(tiled_rows, "fp32 tile", partial(_tiled, weight, bias), compiled=True))
        if SPLIT_ROWS > tiled_rows or not routes:
            routes.append(Route(SPLIT_ROWS, "split GEMM", partial(_split, weight, bias)))
    routes.append(Route(ANY_ROWS, "GEMM", partial(F.linear, weight=weight, bias=bias)))
    return Product(weight, bias, tuple(routes))


def head_product(weight: torch.Tensor | QuantizedWeight) -> Product:
    """The LM head's product (see the module's note)."""
    plain = product(weight, tiled_rows=HEAD_TILED_ROWS)
    if isinstance(weight, QuantizedWeight) or weight.device.type != "cpu":
        return plain
    few = plain.routes[:-1] or (Route(HEAD_GEMM_ROWS, "GEMM", plain.routes[-1].run),)
    return Product(weight, None, (*few, Route(ANY_ROWS, "vocabulary blocks", partial(_vocabulary_blocks, weight))))


def quantised_tile_rows() -> int:
    """Up to how many rows the CPU kernels' batched quantised product runs here."""
    lib = kernels.library()
    return PANEL_ROWS if lib is not None and lib.sw_packed_panels() else KERNEL_ROWS


def _quantised_routes(weight: QuantizedWeight, bias: torch.Tensor | None) -> tuple[Route, ...]:
    dequantised = Route(ANY_ROWS, "dequantised GEMM", partial(_dequantised, weight, bias))
    if weight.device.type == "cpu" and (lib := kernels.library()) is not None:
        return (Route(DIRECT_ROWS, f"q{weight.bits} direct", partial(_quantised, lib.sw_quant_linear, weight, bias),
                     compiled=True),
                Route(quantised_tile_rows(), f"q{weight.bits} tile",
                      partial(_quantised, lib.sw_quant_linear_f32, weight, bias), compiled=True),
                dequantised)
    if gpu.takes(weight.device):
        triton = partial(gpu.quant_linear, weight=weight, bias=bias)
        return Route(KERNEL_ROWS, f"q{weight.bits} Triton", triton), dequantised
    return (dequantised,)


def _tiled(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return kernels.linear_f32(x, weight, bias)


def _split(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Row blocks of the weight as one batched GEMM, a block per core (as many as divide the
    weight's rows: the cores a step may use change from step to step in a pipeline stage)."""
    parts = math.gcd(weight.shape[0], torch.get_num_threads())
    if parts == 1:
        return F.linear(x, weight, bias)
    blocks = torch.bmm(weight.view(parts, -1, weight.shape[1]), x.t().expand(parts, -1, -1))
    out = blocks.permute(2, 0, 1).reshape(x.shape[0], -1)  # [parts, out / parts, rows] -> [rows, out]
    return out if bias is None else out + bias


def _vocabulary_blocks(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.linear(x, block) for block in weight.split(HEAD_BLOCK)], dim=-1)


def _quantised(function, weight: QuantizedWeight, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.qs.shape[0], dtype=torch.float32)
    mins = None if weight.mins is None else weight.mins.data_ptr()
    function(weight.bits, x.data_ptr(), x.shape[0], weight.qs.data_ptr(), weight.scales.data_ptr(), mins,
             weight.qs.shape[0], x.shape[1], None if bias is None else bias.contiguous().data_ptr(), out.data_ptr())
    return out


def _dequantised(weight: QuantizedWeight, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    out = torch.cat([F.linear(x, block.dequantize(x.dtype)) for block in weight.row_blocks(DEQUANTISED_ROWS)],
                    dim=-1)
    return out if bias is None else out + bias
