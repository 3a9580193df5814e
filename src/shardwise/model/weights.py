"""Read a model's tensors one at a time, under one naming scheme.

Both readers memory-map their files and materialise only the tensors asked for,
so a stage that loads layers [a, b) never holds the rest of the model.
Canonical names: ``embed.weight``, ``norm.weight``, ``head.weight`` and
``layers.{i}.{part}.{weight|bias}`` with the parts of ``LAYER_PARTS``; tensors
come back as float32 in HF layout ([out_features, in_features]).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shardwise.cache import cache_dir
from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec
from shardwise.quant import QuantizedWeight, quantize
from shardwise.quant.gguf import EXACT_TYPES, from_gguf

Rows = list[tuple[int, int]] | None  # output rows [a, b) of a weight (elements of a vector), in order
Columns = tuple[int, int] | None  # input columns [a, b) of a weight

# The layer parts of each architecture: canonical part -> (GGUF tensor part, HF tensor part).
# "{e}" in an HF name: one tensor per expert, stacked here as GGUF stores them.
ATTENTION = {
    "attn_norm": ("attn_norm", "input_layernorm"),
    "q": ("attn_q", "self_attn.q_proj"),
    "k": ("attn_k", "self_attn.k_proj"),
    "v": ("attn_v", "self_attn.v_proj"),
    "o": ("attn_output", "self_attn.o_proj"),
}
QK_NORM = {"q_norm": ("attn_q_norm", "self_attn.q_norm"), "k_norm": ("attn_k_norm", "self_attn.k_norm")}
MLP = {"gate": ("ffn_gate", "mlp.gate_proj"), "up": ("ffn_up", "mlp.up_proj"), "down": ("ffn_down", "mlp.down_proj")}
LLAMA = {**ATTENTION, "mlp_norm": ("ffn_norm", "post_attention_layernorm"), **MLP}
GEMMA = {  # norms around both attention and the MLP; HF's post_attention_layernorm is a post-norm here
    **ATTENTION, "post_attn_norm": ("post_attention_norm", "post_attention_layernorm"),
    "mlp_norm": ("ffn_norm", "pre_feedforward_layernorm"), **MLP,
    "post_mlp_norm": ("post_ffw_norm", "post_feedforward_layernorm"),
}
LAYER_PARTS: dict[str, dict[str, tuple[str, str]]] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": {**LLAMA, **QK_NORM},
    "mixtral": {
        **ATTENTION, "mlp_norm": LLAMA["mlp_norm"], "router": ("ffn_gate_inp", "block_sparse_moe.gate"),
        "experts_gate": ("ffn_gate_exps", "block_sparse_moe.experts.{e}.w1"),
        "experts_up": ("ffn_up_exps", "block_sparse_moe.experts.{e}.w3"),
        "experts_down": ("ffn_down_exps", "block_sparse_moe.experts.{e}.w2"),
    },
    "phi3": {  # q, k, v and gate, up come fused
        "attn_norm": ATTENTION["attn_norm"], "qkv": ("attn_qkv", "self_attn.qkv_proj"), "o": ATTENTION["o"],
        "mlp_norm": LLAMA["mlp_norm"], "gate_up": ("ffn_up", "mlp.gate_up_proj"), "down": MLP["down"],
    },
    "gemma2": GEMMA,
    "gemma3": {**GEMMA, **QK_NORM},
}
GLOBAL_TENSORS: dict[str, tuple[str, str]] = {
    "embed.weight": ("token_embd.weight", "model.embed_tokens.weight"),
    "norm.weight": ("output_norm.weight", "model.norm.weight"),
    "head.weight": ("output.weight", "lm_head.weight"),
}
# llama.cpp's converter interleaves each head's rotary halves in these architectures' q/k rows
GGUF_ROPE_PERMUTED = ("llama", "mistral", "mixtral")
# Gemma's RMSNorm multiplies by (1 + weight): HF stores the weight, GGUF (like us) the multiplier
HF_NORM_OFFSET = {"gemma2": 1.0, "gemma3": 1.0}


def native_name(architecture: str, name: str, fmt: int) -> str:
    """A canonical tensor name as the file calls it: fmt 0 GGUF, 1 HF."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name][fmt]
    _, layer, part, kind = name.split(".")
    prefix = "blk" if fmt == 0 else "model.layers"
    return f"{prefix}.{layer}.{LAYER_PARTS[architecture][part][fmt]}.{kind}"


class Weights(ABC):
    """A model's tensors by canonical name, plus its ModelSpec."""

    spec: ModelSpec
    path: Path
    FORMAT: int  # 0: GGUF names, 1: HF names

    @property
    def layer_parts(self) -> tuple[str, ...]:
        return tuple(LAYER_PARTS[self.spec.architecture])

    def native_name(self, name: str) -> str:
        return native_name(self.spec.architecture, name, self.FORMAT)

    @abstractmethod
    def has(self, name: str) -> bool: ...

    @abstractmethod
    def get(self, name: str, rows: Rows = None, cols: Columns = None) -> torch.Tensor:
        """A tensor, or only these output rows (ranges, in order) and input columns of it (a
        tensor-parallel device's slice: the rest is never read)."""

    @abstractmethod
    def eos_token_ids(self) -> set[int]:
        """Tokens that end generation, beyond the tokenizer's eos (e.g. Llama 3's <|eot_id|>)."""

    def require(self, name: str, rows: Rows = None, cols: Columns = None) -> torch.Tensor:
        if not self.has(name):
            raise ShardwiseError(f"{self.path}: tensor '{name}' is missing; the file is incomplete")
        return self.get(name, rows, cols)

    def get_quantized(self, name: str, bits: int, rows: Rows = None,
                      cols: Columns = None) -> QuantizedWeight | torch.Tensor:
        """A weight matrix (or its slice, as get's) in blocks of `bits` bits, rounded from its
        floats (rows whose length is not a multiple of the block stay float)."""
        tensor = self.require(name, rows, cols)
        return tensor if tensor.shape[-1] % 32 else quantize(tensor, bits)


@dataclass(frozen=True)
class GGUFTensor:
    type: int  # GGMLQuantizationType
    shape: tuple[int, ...]  # HF order: outermost first
    offset: int  # where its bytes start in the file
    nbytes: int


class GGUFWeights(Weights):
    FORMAT = 0

    def __init__(self, path: Path):
        self.path = path
        self.metadata, self._tensors = _gguf_index(path)
        self._bytes = np.memmap(path, dtype=np.uint8, mode="r")
        matrices = [_quant_name(t.type) for t in self._tensors.values() if len(t.shape) > 1]
        try:
            self.spec = ModelSpec.from_gguf(
                self.metadata,
                tie_embeddings="output.weight" not in self._tensors,
                dtype=max(set(matrices), key=matrices.count, default="f32"),
            )
        except (KeyError, TypeError) as e:
            raise ShardwiseError(f"{path}: GGUF metadata lacks {e}; the file is incomplete") from None
        if "rope_freqs.weight" in self._tensors:  # llama.cpp's form of Llama 3 RoPE scaling
            factors = self._dequantize(self._tensors["rope_freqs.weight"]).tolist()
            self.spec = replace(self.spec, rope_scaling={"rope_type": "freq_factors", "factors": factors})

    def has(self, name: str) -> bool:
        return self.native_name(name) in self._tensors

    def eos_token_ids(self) -> set[int]:
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        return {int(self.metadata[k]) for k in keys if k in self.metadata}

    def _cut(self, t: GGUFTensor, rows: Rows, cols: Columns) -> tuple[np.ndarray, tuple[int, ...], Columns]:
        """The bytes of these rows and columns of the tensor (as rows of its innermost dimension),
        their shape, and the columns still to cut from their floats: columns are cut in whole
        blocks, so a cut inside a block reads the blocks around it."""
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type)]
        shape = list(t.shape)
        data = self._bytes[t.offset : t.offset + t.nbytes].reshape(*shape[:-1], -1)
        if len(shape) == 1 and rows is not None:  # a vector's rows are its elements (biases: floats)
            data = np.concatenate([data.reshape(shape[0], -1)[a:b] for a, b in rows])
            shape, rows = [len(data)], None
        if rows is not None:
            data = np.concatenate([data[..., a:b, :] for a, b in rows], axis=-2)
            shape[-2] = sum(b - a for a, b in rows)
        left = None
        if cols is not None:
            first, end = cols[0] // block * block, -(-cols[1] // block) * block
            data = data[..., first // block * size : end // block * size]
            shape[-1] = end - first
            left = None if (first, end) == cols else (cols[0] - first, cols[1] - first)
        return np.ascontiguousarray(data).reshape(math.prod(shape[:-1]), -1), tuple(shape), left

    def _dequantize(self, t: GGUFTensor, rows: Rows = None, cols: Columns = None) -> np.ndarray:
        import gguf

        data, shape, left = self._cut(t, rows, cols)
        if t.type in EXACT_TYPES:
            values = from_gguf(t.type, data, shape).dequantize().numpy().reshape(shape)
        else:
            values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t.type))
            values = values.astype(np.float32, copy=False).reshape(shape)
        return values if left is None else values[..., left[0] : left[1]]

    def _rope_permuted(self, name: str) -> bool:
        """Whether llama.cpp permuted this tensor's rows within each head."""
        part = name.split(".")[2] if name.startswith("layers.") else ""
        return self.spec.architecture in GGUF_ROPE_PERMUTED and part in ("q", "k")

    def get(self, name: str, rows: Rows = None, cols: Columns = None) -> torch.Tensor:
        values = self._dequantize(self._tensors[self.native_name(name)], rows, cols)
        if self._rope_permuted(name):
            values = _unpermute_rope(values, len(values) // self.spec.head_dim)
        if not values.flags.writeable:  # unquantized tensors are views of the read-only map
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values))

    def get_quantized(self, name: str, bits: int, rows: Rows = None,
                      cols: Columns = None) -> QuantizedWeight | torch.Tensor:
        """The file's own Q8_0 / Q4_0 / Q4_1 / Q4_K blocks as they are (exact) when they are no
        wider than asked (4-bit blocks asked for as 8 stay 4-bit: widening adds bytes, not
        precision); any other type, or columns cut inside a block, is rounded from its floats."""
        if not self.has(name):
            return super().get_quantized(name, bits, rows, cols)  # which reports the missing tensor
        t = self._tensors[self.native_name(name)]
        data, shape, left = self._cut(t, rows, cols)
        kept = None if left is not None else from_gguf(t.type, data, shape)
        if kept is None or kept.bits > bits:
            return super().get_quantized(name, bits, rows, cols)
        if self._rope_permuted(name):
            heads = shape[0] // self.spec.head_dim
            kept = kept.permute_rows(torch.from_numpy(_unpermute_rope(np.arange(shape[0]), heads)))
        return kept


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves in q/k rows;
    undo it so the weights match HF's rotate-half RoPE."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quant_name(qtype: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(qtype).name.lower()


def _gguf_index(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """The file's metadata and tensor table. The gguf library's reader takes seconds on a file
    with a large vocabulary (every stage that starts would pay it), so what it finds is kept
    beside the model cache, keyed by the file's path, size and modification time."""
    import gguf

    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    cached = cache_dir() / "gguf-index" / f"{key}.json"
    if cached.is_file():
        index = json.loads(cached.read_text())
        return index["metadata"], {name: GGUFTensor(t[0], tuple(t[1]), t[2], t[3])
                                   for name, t in index["tensors"].items()}
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the gguf library raises many kinds on bad input
        raise ShardwiseError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
            "it may be truncated or corrupt: download it again"
        ) from None
    tensors = {t.name: GGUFTensor(int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)),  # GGUF: innermost first
                                  int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    end = max((t.offset + t.nbytes for t in tensors.values()), default=0)
    if end > stat.st_size:
        raise ShardwiseError(f"{path} is truncated ({stat.st_size} bytes, its tensors need {end}): download it again")
    metadata = _gguf_metadata(reader)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")  # stages may write it at once: replace atomically
    partial.write_text(json.dumps({"metadata": metadata, "tensors": {
        name: [t.type, list(t.shape), t.offset, t.nbytes] for name, t in tensors.items()}}))
    partial.replace(cached)
    return metadata, tensors


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
    FORMAT = 1

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
        return self.native_name(name).format(e=0) in self._where

    def eos_token_ids(self) -> set[int]:
        config = self.path / "generation_config.json"
        eos = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def get(self, name: str, rows: Rows = None, cols: Columns = None) -> torch.Tensor:
        native = self.native_name(name)
        if "{e}" in native:
            return torch.stack([self.get_native(native.format(e=e), rows, cols) for e in range(self.spec.num_experts)])
        tensor = self.get_native(native, rows, cols)
        if name.endswith("norm.weight"):
            tensor += HF_NORM_OFFSET.get(self.spec.architecture, 0.0)
        return tensor

    def get_native(self, native: str, rows: Rows = None, cols: Columns = None) -> torch.Tensor:
        if rows is None and cols is None:
            return self._where[native].get_tensor(native).float()
        sliced = self._where[native].get_slice(native)  # reads only the ranges asked for
        c = slice(*cols) if cols is not None else slice(None)
        if len(sliced.get_shape()) == 1:
            return torch.cat([sliced[a:b] for a, b in rows]).float()
        return torch.cat([sliced[slice(*r), c] for r in rows or [(None, None)]]).float()


def open_weights(path: Path) -> Weights:
    """Open a .gguf file or an HF model directory (use registry.resolve first for names)."""
    if path.is_dir():
        return SafetensorsWeights(path)
    return GGUFWeights(path)

