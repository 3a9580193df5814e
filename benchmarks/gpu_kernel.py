"""The Triton product of quantised weights (kernels/gpu.py) on a GPU, side by side with cuBLAS on
the same weight in bf16 (what an engine without the kernel runs, at 2-4x the bytes) and with
dequantising the blocks before cuBLAS (the fallback route), on a Llama-3.2-1B's matrices at 1 to
128 rows. Each is reported as weight bytes read per second; a sweep of the kernel's tile shape
(BLOCK_N x BLOCK_K) and grid fill (programs per multiprocessor, splitting k to reach it) picks
its constants. Times are triton.testing.do_bench's medians.

    python benchmarks/gpu_kernel.py [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import triton.testing

from shardwise.kernels import gpu
from shardwise.quant.quantized import quantize

MATRICES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
ROWS = (1, 8, 32, 128)


def dequantised(x: torch.Tensor, weight) -> torch.Tensor:
    return x @ weight.dequantize().to(x.dtype).t()


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median")


def gbps(nbytes: int, ms: float) -> str:
    return f"{nbytes / ms / 1e6:7.0f}"


def with_constants(block_n: int, block_k: int, fill: int, run):
    saved = gpu.BLOCK_N, gpu.BLOCK_K, gpu.BLOCK_K_FEW_ROWS, gpu.FILL
    gpu.BLOCK_N, gpu.BLOCK_K, gpu.BLOCK_K_FEW_ROWS, gpu.FILL = block_n, block_k, block_k, fill
    try:
        return run()
    finally:
        gpu.BLOCK_N, gpu.BLOCK_K, gpu.BLOCK_K_FEW_ROWS, gpu.FILL = saved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time every tile shape and fill too")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; weight GB/s (higher is better); kernel: BLOCK_N={gpu.BLOCK_N} "
          f"BLOCK_K={gpu.BLOCK_K} ({gpu.BLOCK_K_FEW_ROWS} up to 16 rows) FILL={gpu.FILL}")
    print(f"{'matrix':<8} {'bits':>4} {'rows':>4} {'kernel':>7} {'bf16 cuBLAS':>11} {'dequantised':>11} "
          f"{'kernel/bf16 time':>16}")
    sweep: dict[tuple, list[float]] = {}
    for (name, (n, k)), bits in itertools.product(MATRICES.items(), (4, 8)):
        weight = quantize(torch.randn(n, k) * 0.02, bits).to("cuda")
        dense = weight.dequantize().to("cuda", torch.bfloat16)
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            kernel = partial(gpu.quant_linear, x, weight)
            ours, cublas = median_ms(kernel), median_ms(partial(torch.matmul, x, dense.t()))
            fallback = median_ms(partial(dequantised, x, weight))
            print(f"{name:<8} {bits:>4} {rows:>4} {gbps(weight.nbytes, ours)} {gbps(dense.nbytes, cublas):>11} "
                  f"{gbps(weight.nbytes, fallback):>11} {ours / cublas:>16.2f}", flush=True)
            if args.sweep and bits == 4 and rows in (1, 32):
                for block_n, block_k, fill in itertools.product((32, 64, 128), (32, 64, 128, 256), (0, 1, 2, 4)):
                    ms = with_constants(block_n, block_k, fill, partial(median_ms, kernel))
                    sweep.setdefault((block_n, block_k, fill, rows), []).append(ms / cublas)
    if sweep:
        print("\nsweep, q4: kernel time / bf16 cuBLAS time, geometric mean over the matrices (lower is better)")
        scores = {key: torch.tensor(v).log().mean().exp().item() for key, v in sweep.items()}
        for rows in (1, 32):
            ranked = sorted((s, key) for key, s in scores.items() if key[3] == rows)
            for s, (block_n, block_k, fill, _) in ranked[:6] + ranked[-2:]:
                print(f"rows {rows:>3}: BLOCK_N {block_n:>3} BLOCK_K {block_k:>3} FILL {fill}: {s:.2f}")
        both = {key[:3]: scores[(*key[:3], 1)] * scores[(*key[:3], 32)] for key in scores if key[3] == 1}
        best = min(both, key=both.get)
        print(f"best for both (product of the two means): BLOCK_N {best[0]} BLOCK_K {best[1]} FILL {best[2]}")


if __name__ == "__main__":
    main()
