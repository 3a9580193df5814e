"""Shared fixtures: the real default model, loaded once per test session."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from shardwise.model.registry import DEFAULT_MODEL, resolve
from shardwise.model.weights import open_weights

if not torch.cuda.is_available():  # the GPU kernel's tests run it in Triton's interpreter (read at Triton's import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
]
TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
]


def cli(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `shardwise ARGS` in a fresh process (env: variables to set in it)."""
    return subprocess.run([sys.executable, "-m", "shardwise.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(log: Path, *args: str, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A real `shardwise serve ARGS` on a free 127.0.0.1 port, its output in `log`; yields its URL
    once healthy, and on leaving checks that SIGTERM shuts it down cleanly (stages killed). tls:
    what trusts its certificate, when ARGS make it serve HTTPS."""
    import httpx

    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shardwise.cli", "serve", "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"{'https' if tls else 'http'}://127.0.0.1:{port}", time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", verify=tls or True).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the server did not become healthy in 240 s")
    try:
        yield url
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]


API_KEY = "sk-shardwise-test"
API_KV_TOKENS = 4096
API_SERVER_ARGS = ("--stages", "2", "--prefill-stages", "1", "--prefill-min-tokens", "16", "--api-key", API_KEY,
                   "--kv-tokens", str(API_KV_TOKENS), "--max-batch-tokens", "64", "--draft", "int4")


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    """The server the API and dashboard tests share: the default model on 2 local Ray stages,
    behind an API key, speculating with drafts from its own weights as int4 in the server's
    process, verified through the stages (its greedy and seeded outputs are those of the
    one-process engine without speculation, which the tests compare them with). Disaggregated:
    prompts of 16 tokens or more prefill on a third stage (a pool of its own) and move with
    their KV to the two that decode; shorter ones prefill beside the decodes, so the API's
    tests cover both paths."""
    with running_server(tmp_path_factory.mktemp("server") / "log", *API_SERVER_ARGS) as url:
        yield url


@pytest.fixture(scope="session")
def machine_profile(tmp_path_factory):
    """`shardwise profile` of this machine, run once per session, --quick."""
    out = tmp_path_factory.mktemp("profile") / "this-machine.json"
    result = cli("profile", "--quick", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def model_path():
    return resolve(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def weights(model_path):
    return open_weights(model_path)


@pytest.fixture(scope="session")
def llm():
    from shardwise import LLM

    engine = LLM(DEFAULT_MODEL, dtype="float32")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hf_model(model_path):
    """The reference: transformers' own Llama on the same GGUF, dequantized to fp32."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, hf_model, llm):
    """The default model saved the HF way (config.json + fp32 safetensors + tokenizer files)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("hf-model")
    # transformers refuses to re-save a GGUF-loaded model, so write the HF layout directly
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, path / "model.safetensors")
    hf_model.config.to_json_file(path / "config.json")
    llm.tokenizer.hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (token auth stays on), shut down at the end."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
