"""shardwise's CPU kernels (cpu.cpp): products on quantised weights, a register-tiled fp32 product
for few rows, decode attention over the paged KV pool, RMSNorm, SwiGLU's and GeGLU's act * up,
and a whole decode step through a shard's layers (sw_decode_layers), built and loaded (ctypes)
when the first CPU shard is made (each weight's product is chosen then: shardwise.model.product).

The library is built with the machine's C++ compiler against the installed torch (so its
threads are torch's own), once per source, torch version and CPU, into the shardwise cache;
stages that start together build it once (a lock) and later processes just load it. Where it
cannot be built (no compiler, no AVX2, not x86) `library()` returns None and shards load with
torch ops instead (quantised weights: dequantise, then multiply): correct, slower; the reason is
logged once.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch

from shardwise.cache import cache_dir

SOURCE = Path(__file__).with_name("cpu.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
log = logging.getLogger(__name__)


def _unavailable(reason: str) -> None:
    log.warning("shardwise CPU kernels unavailable (%s): falling back to slower torch ops", reason)


class Matrix(ctypes.Structure):
    """cpu.cpp's Matrix: fmt 0 an fp32 [n, k] weight at data, 8 / 4 quantised blocks (qs at data)."""
    _fields_ = [("fmt", ctypes.c_int64), ("data", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("mins", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


class DecodeLayer(ctypes.Structure):
    """cpu.cpp's DecodeLayer: one decoder layer's weights and attention shape."""
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv_bias", ctypes.c_void_p),
                ("qkv", Matrix), ("o", Matrix), ("gate_up", Matrix), ("down", Matrix), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("dim", ctypes.c_int64), ("window", ctypes.c_int64),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("post_attn_norm", ctypes.c_void_p),
                ("post_mlp_norm", ctypes.c_void_p), ("gelu", ctypes.c_int64), ("local", ctypes.c_int64)]


class DecodeStep(ctypes.Structure):
    """cpu.cpp's DecodeStep: where a decode step's tokens go (RoPE, KV pool slots)."""
    _fields_ = [("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("rotary", ctypes.c_int64),
                ("local_cos", ctypes.c_void_p), ("local_sin", ctypes.c_void_p), ("local_rotary", ctypes.c_int64),
                ("kv", ctypes.c_void_p), ("pool_slots", ctypes.c_int64), ("write_slots", ctypes.c_void_p),
                ("slots", ctypes.c_void_p), ("totals", ctypes.c_void_p), ("seqs", ctypes.c_int64),
                ("longest", ctypes.c_int64), ("direct_rows", ctypes.c_int64)]


@functools.cache
def library() -> ctypes.CDLL | None:
    if platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        _unavailable("this CPU has no AVX2")
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None or shutil.which(compiler) is None:
        _unavailable(f"no C++ compiler found{f' (CXX={compiler})' if compiler else ''}: install g++")
        return None
    torch_dir = Path(torch.__file__).parent
    key = hashlib.sha1(SOURCE.read_bytes() + f"{torch.__version__}|{FLAGS}".encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"cpu-{key}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds; the others wait, then load
        if not target.exists():
            log.info("shardwise CPU kernels: building %s (once per source, torch version and CPU)", target.name)
            partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            command = [compiler, *FLAGS, f"-I{torch_dir / 'include'}", str(SOURCE), "-o", str(partial),
                       f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                _unavailable(f"the build failed: {done.stderr.strip()[-500:]}")
                return None
            partial.replace(target)
    lib = ctypes.CDLL(str(target))
    log.info("shardwise CPU kernels: loaded %s", target)
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.sw_quant_linear.argtypes = [ctypes.c_int, pointer, size, pointer, pointer, pointer, size, size, pointer,
                                    pointer]
    lib.sw_dequantize.argtypes = [ctypes.c_int, pointer, pointer, pointer, size, size, pointer]
    lib.sw_decode_attention.argtypes = [pointer, pointer, pointer, size, pointer, pointer, size, pointer, pointer,
                                        pointer, size, size, size, size, size, size, ctypes.c_float, ctypes.c_float,
                                        pointer, pointer, ctypes.c_float, pointer]
    lib.sw_rms_norm.argtypes = [pointer, pointer, size, size, ctypes.c_float, pointer]
    lib.sw_linear_f32.argtypes = [pointer, size, pointer, size, size, pointer, pointer]
    lib.sw_quant_linear_f32.argtypes = lib.sw_quant_linear.argtypes
    lib.sw_silu_mul.argtypes = lib.sw_gelu_mul.argtypes = [pointer, size, size, pointer]
    lib.sw_decode_layers.argtypes = [ctypes.POINTER(DecodeLayer), size, ctypes.POINTER(DecodeStep), size, pointer]
    lib.sw_packed_panels.argtypes, lib.sw_packed_panels.restype = [], ctypes.c_int
    for function in (lib.sw_quant_linear, lib.sw_dequantize, lib.sw_decode_attention, lib.sw_rms_norm,
                     lib.sw_linear_f32, lib.sw_quant_linear_f32, lib.sw_silu_mul, lib.sw_gelu_mul,
                     lib.sw_decode_layers):
        function.restype = None
    return lib


def takes(t: torch.Tensor) -> bool:
    """Whether the kernels take tensors like t here: CPU fp32 ones, where they could be built.
    Asked once per weight when a shard loads; the functions below assume the answer was yes."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and library() is not None


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, write_slots: torch.Tensor, slots: torch.Tensor, totals: torch.Tensor,
                     heads: int, window: int | None, scale: float, softcap: float | None,
                     q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                     eps: float = 0.0) -> torch.Tensor:
    """A decode step's attention (one new token per sequence) from its fused projection qkv
    [seqs, (heads + 2 kv_heads) * dim]: each head of q and k RMS-normed by q_norm / k_norm [dim]
    where given, RoPE (cos, sin [seqs, rotary]) on q and k, k and v written
    into the pool keys/values [kv_heads, pool_slots, dim] at write_slots, then attention over each
    sequence's slots [seqs, longest] (the first totals[s] valid), read in place. Returns
    [seqs, heads * dim]."""
    lib = library()
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    kv_heads, pool_slots, dim = keys.shape
    out = torch.empty(qkv.shape[0], heads * dim)
    lib.sw_decode_attention(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[-1], keys.data_ptr(),
                            values.data_ptr(), pool_slots, write_slots.data_ptr(), slots.data_ptr(),
                            totals.data_ptr(), qkv.shape[0], slots.shape[1], heads, kv_heads, dim, window or 0,
                            scale, softcap or 0.0, None if q_norm is None else q_norm.data_ptr(),
                            None if k_norm is None else k_norm.data_ptr(), eps, out.data_ptr())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension (one fused pass: torch's CPU rms_norm is several
    ops)."""
    lib = library()
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.sw_rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps, out.data_ptr())
    return out


def gated(gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """act(gate) * up for gate_up [rows, 2 * inter] = [gate, up], in one pass: silu (SwiGLU), or
    with `gelu` the tanh-approximated gelu (GeGLU)."""
    lib = library()
    gate_up = gate_up.contiguous()
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2)
    (lib.sw_gelu_mul if gelu else lib.sw_silu_mul)(gate_up.data_ptr(), gate_up.shape[0], out.shape[1], out.data_ptr())
    return out


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, k] . weight [n, k]^T (+ bias) by the register-tiled fp32 kernel."""
    lib = library()
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0])
    lib.sw_linear_f32(x.data_ptr(), x.shape[0], weight.data_ptr(), weight.shape[0], weight.shape[1],
                      None if bias is None else bias.contiguous().data_ptr(), out.data_ptr())
    return out
