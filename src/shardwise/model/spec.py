"""ModelSpec: the single description of a transformer architecture.

The engine builds layers from it and the performance model derives its operator
list from it, so the two cannot drift apart. It needs no weights: it comes from
GGUF metadata, an HF config.json, the catalog, or is written by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from shardwise.errors import ShardwiseError

# Architectures the engine can run, by their GGUF / HF model_type name.
SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    activation: str = "silu"
    attention_bias: bool = False  # bias on q, k, v projections
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    sliding_window: int | None = None
    num_experts: int = 0  # 0: dense MLP
    experts_per_token: int = 0
    context_length: int = 4096
    dtype: str = "float32"  # how the weights are stored: float32, bfloat16, q4_1, ...
    name: str = ""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ShardwiseError(
                f"model spec: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}); fix the config"
            )

    # --- sizes the estimator and planner use -------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_parameters(self, active: bool = False) -> int:
        """Parameters in one transformer block; with active=True, only those a token uses (MoE)."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * self.intermediate_size
        if self.num_experts:
            experts = self.experts_per_token if active else self.num_experts
            mlp = mlp * experts + h * self.num_experts  # experts + router
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attn + mlp + norms

    def parameters(self, active: bool = False) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else embed
        return embed + head + self.hidden_size + self.num_layers * self.layer_parameters(active)

    def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """KV-cache bytes one token takes across all layers."""
        return 2 * self.num_layers * self.kv_size * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # --- readers ------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> ModelSpec:
        """From an HF config.json (a dict, the file, or the model directory)."""
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config = json.loads(path.read_text())
        c = config
        arch = c.get("model_type", "")
        heads = c["num_attention_heads"]
        experts = c.get("num_local_experts") or c.get("num_experts") or 0
        return cls(
            architecture=arch,
            name=c.get("_name_or_path", ""),
            num_layers=c["num_hidden_layers"],
            hidden_size=c["hidden_size"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or 0,
            intermediate_size=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            rope_theta=float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_hf_rope_scaling(c),
            norm_eps=float(c.get("rms_norm_eps", c.get("layer_norm_eps", 1e-5))),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            activation=c.get("hidden_act", "silu"),
            attention_bias=bool(c.get("attention_bias", False)),
            sliding_window=c.get("sliding_window") if c.get("use_sliding_window", True) else None,
            num_experts=experts,
            experts_per_token=c.get("num_experts_per_tok", 0) if experts else 0,
            context_length=c.get("max_position_embeddings", 4096),
            dtype=str(c.get("torch_dtype") or c.get("dtype") or "float32"),
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], *, tie_embeddings: bool, dtype: str) -> ModelSpec:
        """From GGUF key/value metadata (values decoded). GGUF has no key for tied
        embeddings: the reader knows it from the absence of an output tensor."""
        arch = metadata.get("general.architecture", "")

        def get(key: str, default: Any = None) -> Any:
            return metadata.get(f"{arch}.{key}", default)

        heads = get("attention.head_count")
        hidden = get("embedding_length")
        vocab = get("vocab_size") or metadata.get("tokenizer.ggml.tokens.count")
        scaling = None
        if get("rope.scaling.type") not in (None, "none"):
            scaling = {
                "rope_type": get("rope.scaling.type"),
                "factor": get("rope.scaling.factor", 1.0),
                "original_max_position_embeddings": get("rope.scaling.original_context_length"),
            }
        return cls(
            architecture=arch,
            name=metadata.get("general.name", ""),
            num_layers=get("block_count"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv") or heads,
            head_dim=get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
            intermediate_size=get("feed_forward_length"),
            vocab_size=vocab,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings=tie_embeddings,
            sliding_window=get("attention.sliding_window"),
            num_experts=get("expert_count", 0) or 0,
            experts_per_token=get("expert_used_count", 0) or 0,
            context_length=get("context_length", 4096),
            dtype=dtype,
        )


def _hf_rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not scaling:
        return None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    return {**scaling, "rope_type": kind}


def require_supported(spec: ModelSpec) -> None:
    if spec.architecture not in SUPPORTED_ARCHITECTURES:
        raise ShardwiseError(
            f"architecture '{spec.architecture}' is not supported yet; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

