"""llama.cpp's own `llama-server` (and `llama-bench`) for the benchmarks that measure against them.

A binary on PATH is used as it is; otherwise it is built once (~10 minutes on 2 cores) from the
llama.cpp sources vendored in llama-cpp-python's sdist (the version the `bench` extra pins),
natively for this CPU (GGML_NATIVE), into shardwise's cache.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from server import launch

from shardwise.cache import cache_dir

SDIST = "llama-cpp-python==0.3.36"  # as in pyproject's bench extra
BUILD = cache_dir() / "llama.cpp" / "build"
# llama.cpp's AMX kernels (Sapphire-Rapids-class Xeons) segfault on every multi-token batch on this
# project's machine (as in llama.cpp #20824): both peers are built without them. The flags win
# over GGML_NATIVE's -march=native, which would turn them on. (The Makefile's bench target passes
# the same to llama-cpp-python's build.)
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() == "x86_64" else ""


def binary(name: str) -> str:
    """The path of llama.cpp's `name` (llama-server or llama-bench), built here if missing."""
    if found := shutil.which(name):
        return found
    built = BUILD / "bin" / name
    if not built.is_file():
        _build()
    return str(built)


def _build() -> None:
    print(f"building llama-server and llama-bench from {SDIST}'s sources (once) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", tmp], check=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as sdist:
            sdist.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("*/vendor/llama.cpp"))
        subprocess.run(["cmake", "-S", str(source), "-B", str(BUILD), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF",
                        f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"],  # (no run path into BUILD)
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["ninja", "-C", str(BUILD), "llama-server", "llama-bench"], check=True,
                       stdout=subprocess.DEVNULL)


def start_llama_server(model: str, threads: int, parallel: int, context_per_slot: int) -> tuple[subprocess.Popen, str]:
    """`llama-server` on a free 127.0.0.1 port with `parallel` slots and continuous batching;
    returns it and its URL once it answers /health."""
    return launch(lambda port: [binary("llama-server"), "-m", model, "--host", "127.0.0.1", "--port", str(port),
                                "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-cb",
                                "-c", str(parallel * context_per_slot), "--no-webui"], "llama-server")


def require_llama_cpp():
    """llama-cpp-python's Llama class, or an exit naming how to install it."""
    try:
        from llama_cpp import Llama, llama_print_system_info
    except ImportError:
        raise SystemExit("llama-cpp-python is missing: `make bench` installs it (builds llama.cpp)") from None
    if b"AMX_INT8 = 1" in llama_print_system_info():
        raise SystemExit("llama-cpp-python was built with llama.cpp's AMX kernels, which crash on multi-token "
                         "batches on this CPU: rebuild it without them with\n  .venv/bin/uv pip install "
                         "--reinstall-package llama-cpp-python --no-deps -C cmake.define.CMAKE_C_FLAGS="
                         f"'{NO_AMX}' -C cmake.define.CMAKE_CXX_FLAGS='{NO_AMX}' '{SDIST}'")
    return Llama


def llama_cpp_decode_rate(llama, prompt: list[int], n: int) -> float:
    """Tokens/s of llama-cpp-python decoding n tokens greedily after the prompt (from the first new token)."""
    llama.reset()
    llama.eval(prompt)
    start = time.perf_counter()
    for _ in range(n - 1):
        llama.eval([llama.sample(temp=0.0)])
    return (n - 1) / (time.perf_counter() - start)


def llama_bench(model: str, threads: int, prompts: tuple[int, ...], generate: int) -> dict[str, float]:
    """llama-bench's mean tokens/s: {"pp128": ..., "tg64": ...} (its own repeats, an empty context)."""
    out = subprocess.run([binary("llama-bench"), "-m", model, "-t", str(threads), "-p", ",".join(map(str, prompts)),
                          "-n", str(generate), "-r", "3", "-o", "json"], check=True, capture_output=True, text=True)
    return {f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}": t["avg_ts"] for t in json.loads(out.stdout)}
