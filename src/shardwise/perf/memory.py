"""One memory model: the bytes a stage of a model holds on its devices. The plan checks, the
planner and the estimator all ask it, so "does it fit" has one answer."""

from __future__ import annotations

from shardwise.model.spec import ModelSpec
from shardwise.perf.hardware import dtype_bytes, edge_dtype


def kv_dtype_for(weights: str) -> str:
    """The KV cache's dtype unless one is given: the weights', but fp32 beside int8 / int4 weights
    (their activations and cache stay float)."""
    return "fp32" if weights in ("int8", "int4") else weights


def weight_bytes(spec: ModelSpec, layers: tuple[int, int], dtype: str, tp: int = 1, ep: int = 1) -> float:
    """Layers [start, end) at `dtype` on each of tp x ep devices (experts split over ep, the rest
    over tp), with the embedding on the first stage and the final norm and head on the last (a
    tied head counted there too, unless the stage is also the first)."""
    start, end = layers
    h, v = spec.hidden_size, spec.vocab_size
    per_layer = spec.layer_parameters()
    if spec.num_experts:
        experts = 3 * h * spec.intermediate_size * spec.num_experts
        per_layer = (per_layer - experts) / tp + experts / (tp * ep)
    else:
        per_layer /= tp
    params, edges = (end - start) * per_layer, 0.0
    if start == 0:
        edges += v * h / tp
    if end == spec.num_layers:
        params += h
        edges += 0 if spec.tie_embeddings and start == 0 else v * h / tp
    return params * dtype_bytes(dtype) + edges * dtype_bytes(edge_dtype(dtype))


def kv_bytes(spec: ModelSpec, layers: tuple[int, int], tokens: float, kv_dtype: str, tp: int = 1) -> float:
    """The KV cache of `tokens` tokens for layers [start, end) on each of tp devices (KV heads
    split over tp, replicated where there are fewer than devices)."""
    kv_heads = max(1.0, spec.num_kv_heads / tp)
    return tokens * 2 * kv_heads * spec.head_dim * dtype_bytes(kv_dtype) * (layers[1] - layers[0])


def stage_bytes(spec: ModelSpec, layers: tuple[int, int], dtype: str, kv_tokens: int,
                kv_dtype: str | None = None) -> float:
    """What a pipeline stage must fit: its weights at `dtype` and a KV budget of kv_tokens tokens."""
    return weight_bytes(spec, layers, dtype) + kv_bytes(spec, layers, kv_tokens, kv_dtype or kv_dtype_for(dtype))
