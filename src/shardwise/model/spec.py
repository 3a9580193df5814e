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

# Architectures the engine can run (HF model_type / GGUF general.architecture names), and the
# features each turns on that its config does not spell out.
ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "mixtral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
    "phi3": {},
    "gemma2": {"scale_embeddings": True, "sandwich_norms": True, "activation": "gelu_pytorch_tanh",
               "global_every": 2},
    "gemma3": {"scale_embeddings": True, "sandwich_norms": True, "activation": "gelu_pytorch_tanh",
               "global_every": 6, "qk_norm": True, "rope_local_theta": 10000.0},
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURE_DEFAULTS)
HF_ALIASES = {"gemma3_text": "gemma3"}  # Gemma 3's text-only checkpoints


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
    rotary_dim: int = 0  # dims of each head that RoPE rotates; 0: all (Phi-3 style partial rotary otherwise)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers (Gemma 3)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    activation: str = "silu"  # of the gated MLP: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    attention_bias: bool = False  # bias on q, k, v projections
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3, Gemma 3)
    sliding_window: int | None = None  # a token attends to itself and the window - 1 before it
    global_every: int = 0  # with a window: every Nth layer attends globally (Gemma); 0: none do
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    sandwich_norms: bool = False  # RMSNorm after attention and after the MLP too (Gemma 2/3)
    query_scale: float = 0.0  # attention scores scaled by query_scale ** -0.5; 0: head_dim
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the logits
    num_experts: int = 0  # 0: dense MLP
    experts_per_token: int = 0
    context_length: int = 4096
    dtype: str = "float32"  # how the weights are stored: float32, bfloat16, q4_1, ...
    name: str = ""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise ShardwiseError(
                f"model spec: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}); fix the config"
            )

    def window(self, layer: int) -> int | None:
        """The sliding window of this layer, or None where it attends to everything."""
        if self.sliding_window is None or self.global_every and (layer + 1) % self.global_every == 0:
            return None
        return self.sliding_window

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
        norms = (4 if self.sandwich_norms else 2) * h + (2 * self.head_dim if self.qk_norm else 0)
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
        return cls._with_defaults(data.get("architecture", ""), {k: v for k, v in data.items() if k in known})

    # --- readers ------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> ModelSpec:
        """From an HF config.json (a dict, the file, or the model directory)."""
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config = json.loads(path.read_text())
        arch = HF_ALIASES.get(config.get("model_type", ""), config.get("model_type", ""))
        try:
            return cls._read_hf_config(arch, config)
        except KeyError as e:
            require_architecture(arch)  # an unsupported one names its config keys its own way
            raise ShardwiseError(f"config.json lacks {e}; the model directory is incomplete") from None

    @classmethod
    def _read_hf_config(cls, arch: str, c: dict[str, Any]) -> ModelSpec:
        heads = c["num_attention_heads"]
        experts = c.get("num_local_experts") or c.get("num_experts") or 0
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        rope, local_theta = _hf_rope(c)
        rotary_dim, theta = int(head_dim * rope.pop("partial_rotary_factor", 1.0)), rope.pop("rope_theta", 10000.0)
        window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
        found = {
            "architecture": arch,
            "name": c.get("_name_or_path", ""),
            "num_layers": c["num_hidden_layers"],
            "hidden_size": c["hidden_size"],
            "num_heads": heads,
            "num_kv_heads": c.get("num_key_value_heads") or heads,
            "head_dim": head_dim,
            "rotary_dim": rotary_dim,
            "intermediate_size": c["intermediate_size"],
            "vocab_size": c["vocab_size"],
            "rope_theta": float(theta),
            "rope_scaling": rope or None,
            "rope_local_theta": local_theta,
            "norm_eps": float(c.get("rms_norm_eps", c.get("layer_norm_eps", 1e-5))),
            "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
            "activation": c.get("hidden_activation") or c.get("hidden_act"),
            "attention_bias": c.get("attention_bias"),
            "sliding_window": window,
            "global_every": _global_every(c.get("layer_types"), c.get("sliding_window_pattern")) if window else None,
            "query_scale": c.get("query_pre_attn_scalar"),
            "attn_softcap": c.get("attn_logit_softcapping"),
            "final_softcap": c.get("final_logit_softcapping"),
            "num_experts": experts,
            "experts_per_token": c.get("num_experts_per_tok", 0) if experts else 0,
            "context_length": c.get("max_position_embeddings", 4096),
            "dtype": str(c.get("torch_dtype") or c.get("dtype") or "float32"),
        }
        return cls._with_defaults(arch, found)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], *, tie_embeddings: bool, dtype: str) -> ModelSpec:
        """From GGUF key/value metadata (values decoded). GGUF has no key for tied
        embeddings: the reader knows it from the absence of an output tensor."""
        arch = metadata.get("general.architecture", "")

        def get(key: str, default: Any = None) -> Any:
            return metadata.get(f"{arch}.{key}", default)

        heads = get("attention.head_count")
        hidden = get("embedding_length")
        head_dim = get("attention.key_length") or hidden // heads
        vocab = get("vocab_size") or metadata.get("tokenizer.ggml.tokens.count")
        scaling = None
        if get("rope.scaling.type") not in (None, "none"):
            scaling = {
                "rope_type": get("rope.scaling.type"),
                "factor": get("rope.scaling.factor", 1.0),
                "original_max_position_embeddings": get("rope.scaling.original_context_length"),
            }
        experts = get("expert_count", 0) or 0
        window = get("attention.sliding_window")
        found = {
            # llama.cpp files Mistral and Mixtral under llama; experts tell Mixtral apart
            "architecture": "mixtral" if arch == "llama" and experts else arch,
            "name": metadata.get("general.name", ""),
            "num_layers": get("block_count"),
            "hidden_size": hidden,
            "num_heads": heads,
            "num_kv_heads": get("attention.head_count_kv") or heads,
            "head_dim": head_dim,
            "rotary_dim": get("rope.dimension_count") or head_dim,
            "intermediate_size": get("feed_forward_length"),
            "vocab_size": vocab,
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "rope_scaling": scaling,
            "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            "tie_embeddings": tie_embeddings,
            "sliding_window": window,
            "global_every": _gguf_global_every(get("attention.sliding_window_pattern")) if window else None,
            "rope_local_theta": get("rope.freq_base_swa"),
            "query_scale": get("attention.query_pre_attn_scalar") or _llama_cpp_query_scale(arch, hidden, heads, get),
            "attn_softcap": get("attn_logit_softcapping"),
            "final_softcap": get("final_logit_softcapping"),
            "num_experts": experts,
            "experts_per_token": get("expert_used_count", 0) or 0,
            "context_length": get("context_length", 4096),
            "dtype": dtype,
        }
        return cls._with_defaults(found["architecture"], found)

    @classmethod
    def _with_defaults(cls, arch: str, found: dict[str, Any]) -> ModelSpec:
        """What the file says, over what its architecture implies, over the field defaults."""
        given = {k: v for k, v in found.items() if v is not None}
        return cls(**{**ARCHITECTURE_DEFAULTS.get(arch, {}), **given})


def _hf_rope(config: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """(RoPE settings of the global layers: rope_theta, scaling keys, partial_rotary_factor;
    the RoPE base of the sliding layers, if they have their own). Reads both the older
    rope_theta / rope_scaling keys and transformers 5's rope_parameters (per layer type for Gemma 3)."""
    params = dict(config.get("rope_parameters") or {})
    local = None
    if "full_attention" in params:
        local = params.get("sliding_attention", {}).get("rope_theta")
        params = dict(params["full_attention"])
    params.update(config.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if config.get(key) is not None:
            params[key] = config[key]
    local = config.get("rope_local_base_freq", local)
    kind = params.pop("type", None) or params.pop("rope_type", None)
    if kind not in (None, "default"):
        params["rope_type"] = kind
    return params, local


def _global_every(layer_types: list[str] | None, pattern: int | None) -> int:
    """Which layers attend globally, as 'every Nth' (0: none), from transformers' layer_types."""
    if not layer_types:
        return pattern or 0
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    every = full[0] + 1 if full else 0
    if every and full != list(range(every - 1, len(layer_types), every)):
        raise ShardwiseError(f"layer_types {layer_types}: only every-Nth-layer global attention is supported")
    return every


def _gguf_global_every(pattern: int | list[bool] | None) -> int | None:
    """GGUF's sliding_window_pattern: N (every Nth layer global), or per layer True where sliding."""
    if isinstance(pattern, list):
        return _global_every(["sliding_attention" if sliding else "full_attention" for sliding in pattern], None)
    return pattern


def _llama_cpp_query_scale(arch: str, hidden: int, heads: int, get) -> float | None:
    """GGUF has no key for Gemma's query_pre_attn_scalar: llama.cpp uses hidden / heads for
    the 27B models (46 and 62 layers) and head_dim for the others."""
    if arch in ("gemma2", "gemma3") and get("block_count") in (46, 62):
        return hidden / heads
    return None


def require_architecture(architecture: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ShardwiseError(
            f"architecture '{architecture}' is not supported yet; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def require_supported(spec: ModelSpec) -> None:
    require_architecture(spec.architecture)
    if spec.activation not in ("silu", "gelu_pytorch_tanh"):
        raise ShardwiseError(f"activation '{spec.activation}' is not supported yet; supported: "
                             "silu, gelu_pytorch_tanh")


# --- splitting the layers -------------------------------------------------------------------------
def even_layer_ranges(num_layers: int, n: int) -> list[tuple[int, int]]:
    """n contiguous ranges of (nearly) equal layer counts, earlier ranges taking the remainder."""
    if not 1 <= n <= num_layers:
        raise ShardwiseError(f"cannot split {num_layers} layers into {n} stages: use 1..{num_layers}")
    size, extra = divmod(num_layers, n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + size + (i < extra))
    return list(zip(bounds, bounds[1:], strict=False))


def check_layer_ranges(ranges: list[tuple[int, int]], num_layers: int) -> None:
    """Stages must cover layers 0..L-1 in order, each non-empty, with no gap or overlap."""
    expected = 0
    for i, (start, end) in enumerate(ranges):
        if end <= start:
            raise ShardwiseError(f"plan stage {i} is empty or reversed: layers [{start}, {end})")
        if start > expected:
            raise ShardwiseError(f"plan has a gap: layers [{expected}, {start}) belong to no stage "
                                 f"(stage {i} starts at {start})")
        if start < expected:
            raise ShardwiseError(f"plan stages overlap: stage {i} starts at layer {start}, "
                                 f"but layers up to {expected - 1} are already placed")
        expected = end
    if expected != num_layers:
        raise ShardwiseError(f"plan covers layers [0, {expected}) but the model has {num_layers}: "
                             f"the last stage must end at {num_layers}")
