"""Read a model's tensors one at a time, under one naming scheme.

Both readers memory-map their files and materialise only the tensors asked for,
so a stage that loads layers [a, b) never holds the rest of the model.
Canonical names: ``embed.weight``, ``norm.weight``, ``head.weight`` and
``layers.{i}.{part}.{weight|bias}`` with the parts of ``LAYER_PARTS``; tensors
come back as float32 in HF layout ([out_features, in_features]).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec

# canonical part -> (GGUF tensor part, HF tensor part)
LAYER_PARTS: dict[str, tuple[str, str]] = {
    "attn_norm": ("attn_norm", "input_layernorm"),
    "q": ("attn_q", "self_attn.q_proj"),
    "k": ("attn_k", "self_attn.k_proj"),
    "v": ("attn_v", "self_attn.v_proj"),
    "o": ("attn_output", "self_attn.o_proj"),
    "mlp_norm": ("ffn_norm", "post_attention_layernorm"),
    "gate": ("ffn_gate", "mlp.gate_proj"),
    "up": ("ffn_up", "mlp.up_proj"),
    "down": ("ffn_down", "mlp.down_proj"),
}
GLOBAL_TENSORS: dict[str, tuple[str, str]] = {
    "embed.weight": ("token_embd.weight", "model.embed_tokens.weight"),
    "norm.weight": ("output_norm.weight", "model.norm.weight"),
    "head.weight": ("output.weight", "lm_head.weight"),
}


def _native_name(name: str, which: int) -> str:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name][which]
    _, layer, part, kind = name.split(".")
    prefix = "blk" if which == 0 else "model.layers"
    return f"{prefix}.{layer}.{LAYER_PARTS[part][which]}.{kind}"


class Weights(ABC):
    """A model's tensors by canonical name, plus its ModelSpec."""

    spec: ModelSpec
    path: Path

    @abstractmethod
    def has(self, name: str) -> bool: ...

    @abstractmethod
    def get(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def eos_token_ids(self) -> set[int]:
        """Tokens that end generation, beyond the tokenizer's eos (e.g. Llama 3's <|eot_id|>)."""

    def require(self, name: str) -> torch.Tensor:
        if not self.has(name):
            raise ShardwiseError(f"{self.path}: tensor '{name}' is missing; the file is incomplete")
        return self.get(name)


class GGUFWeights(Weights):
    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except Exception as e:  # the gguf library raises many kinds on bad input
            raise ShardwiseError(
                f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                "it may be truncated or corrupt: download it again"
            ) from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        size = os.path.getsize(path)
        end = max((t.data_offset + t.n_bytes for t in self._tensors.values()), default=0)
        if end > size:
            raise ShardwiseError(
                f"{path} is truncated ({size} bytes, its tensors need {end}): download it again"
            )
        self.metadata = _gguf_metadata(self._reader)
        matrices = [t.tensor_type.name.lower() for t in self._tensors.values() if len(t.shape) > 1]
        try:
            self.spec = ModelSpec.from_gguf(
                self.metadata,
                tie_embeddings="output.weight" not in self._tensors,
                dtype=max(set(matrices), key=matrices.count, default="f32"),
            )
        except (KeyError, TypeError) as e:
            raise ShardwiseError(f"{path}: GGUF metadata lacks {e}; the file is incomplete") from None

    def has(self, name: str) -> bool:
        return _native_name(name, 0) in self._tensors

    def eos_token_ids(self) -> set[int]:
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        return {int(self.metadata[k]) for k in keys if k in self.metadata}

    def get(self, name: str) -> torch.Tensor:
        import gguf

        t = self._tensors[_native_name(name, 0)]
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        values = values.reshape(shape)
        part = name.split(".")[2] if name.startswith("layers.") else ""
        if self.spec.architecture == "llama" and part in ("q", "k"):
            heads = self.spec.num_heads if part == "q" else self.spec.num_kv_heads
            values = _unpermute_rope(values, heads)
        if not values.flags.writeable:  # unquantized tensors are views of the read-only map
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values))


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves in q/k rows;
    undo it so the weights match HF's rotate-half RoPE."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            meta[key + ".count"] = len(field.data)  # large arrays: only their length is needed here
            continue
        meta[key] = field.contents()
    return meta


class SafetensorsWeights(Weights):
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.spec = ModelSpec.from_hf_config(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ShardwiseError(f"{path} has config.json but no *.safetensors weights")
        self._files = {}
        self._where: dict[str, Any] = {}
        for file in files:
            handle = safe_open(file, framework="pt")
            self._files[file] = handle
            for key in handle.keys():
                self._where[key] = handle

    def has(self, name: str) -> bool:
        return _native_name(name, 1) in self._where

    def eos_token_ids(self) -> set[int]:
        config = self.path / "generation_config.json"
        eos = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def get(self, name: str) -> torch.Tensor:
        native = _native_name(name, 1)
        return self._where[native].get_tensor(native).float()


def open_weights(path: Path) -> Weights:
    """Open a .gguf file or an HF model directory (use registry.resolve first for names)."""
    if path.is_dir():
        return SafetensorsWeights(path)
    return GGUFWeights(path)

