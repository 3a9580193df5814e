"""The operator list of a forward step, derived from ModelSpec.

For each operator: FLOPs and bytes moved (weights at their precision, activations,
KV-cache reads and writes), for any mix of prefill chunks and decodes. Each number
is per device: tensor parallelism splits heads and the MLP, expert parallelism
splits experts. The engine builds its layers from the same ModelSpec, so the two
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shardwise.model.spec import ModelSpec
from shardwise.perf.hardware import canonical_dtype, dtype_bytes, edge_dtype


@dataclass(frozen=True)
class Precision:
    weights: str = "bf16"
    kv: str = "bf16"
    activations: str = "bf16"

    def __post_init__(self) -> None:
        for name in ("weights", "kv", "activations"):
            object.__setattr__(self, name, canonical_dtype(getattr(self, name)))

    @property
    def matmul_dtype(self) -> str:
        """fp8 and int8 weights multiply natively (W8A8) where a device can; other
        quantised weights are dequantised and multiplied at the activation dtype."""
        return self.weights if self.weights in ("fp8", "int8") else self.activations


@dataclass(frozen=True)
class Work:
    """What one forward step processes: per sequence, (new tokens, tokens already cached)."""

    sequences: tuple[tuple[int, int], ...]
    logit_rows: int | None = None  # rows the LM head computes; default: one per sequence

    @classmethod
    def prefill(cls, batch: int, tokens: int, cached: int = 0) -> Work:
        """batch prompts of `tokens` tokens, the first `cached` of each already in the KV cache."""
        return cls(((tokens - cached, cached),) * batch)

    @classmethod
    def decode(cls, batch: int, context: int, new: int = 1) -> Work:
        """batch sequences with `context` tokens cached; new > 1 verifies speculated tokens."""
        return cls(((new, context),) * batch, logit_rows=batch * new)

    def __add__(self, other: Work) -> Work:
        return Work(self.sequences + other.sequences, self.rows + other.rows)

    @property
    def tokens(self) -> int:
        return sum(new for new, _ in self.sequences)

    @property
    def rows(self) -> int:
        return len(self.sequences) if self.logit_rows is None else self.logit_rows

    def attention_pairs(self, window: int | None = None) -> int:
        """(query, key) pairs under the causal mask, each query seeing at most `window` keys."""
        return sum(_visible(past + new, window) - _visible(past, window) for new, past in self.sequences)

    def keys_read(self, window: int | None = None) -> int:
        return sum(min(new + past, window or new + past) for new, past in self.sequences)


def _visible(n: int, window: int | None) -> int:
    """sum over positions j = 1..n of min(j, window): the keys the first n queries see."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


@dataclass(frozen=True)
class Operator:
    name: str
    kind: str  # matmul, attention, vector or collective
    flops: float = 0.0
    weight_bytes: float = 0.0
    activation_bytes: float = 0.0
    kv_bytes: float = 0.0
    dtype: str = "bf16"  # the dtype whose peak FLOP/s applies
    rows: int = 0  # a matmul's rows (tokens): small ones run below the roofline on many devices
    weights: str = ""  # a matmul's weight format (its measured efficiency may differ by format)
    collective: str = ""  # all-reduce, all-gather or all-to-all
    participants: int = 1
    message_bytes: float = 0.0  # per participant

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0


def _matmul(name: str, tokens: int, k: int, n: int, p: Precision, *, weights: float | None = None,
            bias: bool = False) -> Operator:
    """tokens x k activations times a k x n weight; `weights` overrides the weight elements read."""
    w = (k * n + (n if bias else 0)) if weights is None else weights
    ab = dtype_bytes(p.activations)
    return Operator(name, "matmul", 2.0 * tokens * k * n, w * dtype_bytes(p.weights),
                    tokens * (k + n) * ab, dtype=p.matmul_dtype, rows=tokens, weights=p.weights)


def _vector(name: str, flops: float, elements_moved: float, p: Precision, weights: float = 0) -> Operator:
    return Operator(name, "vector", flops, weights * dtype_bytes(p.activations),
                    elements_moved * dtype_bytes(p.activations), dtype="fp32")


def collective(name: str, kind: str, participants: int, nbytes: float) -> Operator:
    return Operator(name, "collective", collective=kind, participants=participants, message_bytes=nbytes)


def layer_operators(spec: ModelSpec, work: Work, p: Precision, tp: int = 1, ep: int = 1,
                    layer: int = 0) -> list[Operator]:
    """One transformer block (the layer-th: layers differ only in their attention window) on one
    of tp x ep devices."""
    t, h, hd = work.tokens, spec.hidden_size, spec.head_dim
    q_heads, kv_heads = spec.num_heads / tp, max(1.0, spec.num_kv_heads / tp)
    window = spec.window(layer)
    pairs, keys = work.attention_pairs(window), work.keys_read(window)
    ab, kvb = dtype_bytes(p.activations), dtype_bytes(p.kv)
    qkv = (q_heads + 2 * kv_heads) * hd
    ops = [
        _vector("attn_norm", 4 * t * h, 2 * t * h, p, weights=h),
        _matmul("qkv_proj", t, h, int(qkv), p, bias=spec.attention_bias),
        _vector("rope", 3 * t * (q_heads + kv_heads) * hd, 2 * t * (q_heads + kv_heads) * hd, p),
        Operator("attention", "attention", 4.0 * q_heads * hd * pairs,
                 activation_bytes=2 * t * q_heads * hd * ab,
                 kv_bytes=2 * kv_heads * hd * (keys + t) * kvb,  # read K and V, write the new ones
                 dtype=p.activations),
        _vector("softmax", 5.0 * q_heads * pairs, 0, p),  # stays on chip (flash attention)
        _matmul("o_proj", t, int(q_heads * hd), h, p),
    ]
    if tp > 1:
        ops.append(collective("attn_all_reduce", "all-reduce", tp, t * h * ab))
    ops += [_vector("residual_add", t * h, 3 * t * h, p), _vector("mlp_norm", 4 * t * h, 2 * t * h, p)]
    inter = spec.intermediate_size / tp
    if spec.num_experts:
        e, k = spec.num_experts, spec.experts_per_token
        routed = t * k / ep  # token-expert pairs on this device, balanced
        touched = (e / ep) * (1 - (1 - k / e) ** t)  # experts with at least one token: their weights are read
        ops += [
            _matmul("router", t, h, e, p),
            _matmul("experts_gate_up", int(routed), h, int(2 * inter), p, weights=touched * h * 2 * inter),
            _vector("activation", 5 * routed * inter, 3 * routed * inter, p),
            _matmul("experts_down", int(routed), int(inter), h, p, weights=touched * h * inter),
        ]
        if ep > 1:
            ops[-3:-3] = [collective("dispatch_all_to_all", "all-to-all", ep, t * k * h * ab)]
            ops.append(collective("combine_all_to_all", "all-to-all", ep, t * k * h * ab))
    else:
        ops += [
            _matmul("gate_up_proj", t, h, int(2 * inter), p),
            _vector("activation", 5 * t * inter, 3 * t * inter, p),
            _matmul("down_proj", t, int(inter), h, p),
        ]
    if tp > 1:
        ops.append(collective("mlp_all_reduce", "all-reduce", tp, t * h * ab))
    ops.append(_vector("residual_add", t * h, 3 * t * h, p))
    return ops


def embedding_operators(spec: ModelSpec, work: Work, p: Precision) -> list[Operator]:
    """A row gather: bytes only."""
    t, h = work.tokens, spec.hidden_size
    return [Operator("embedding", "vector", 0.0, t * h * dtype_bytes(edge_dtype(p.weights)),
                     t * h * dtype_bytes(p.activations))]


def head_operators(spec: ModelSpec, work: Work, p: Precision, tp: int = 1) -> list[Operator]:
    """Final norm, LM head and sampling, on the rows that produce logits (not every prompt token)."""
    rows, h, v = work.rows, spec.hidden_size, spec.vocab_size
    head = replace(p, weights=edge_dtype(p.weights))
    ops = [_vector("final_norm", 4 * rows * h, 2 * rows * h, p, weights=h), _matmul("lm_head", rows, h, v // tp, head)]
    if tp > 1:
        ops.append(collective("logits_all_gather", "all-gather", tp, rows * v * 4))
    # softmax, top-k/p and the draw read the fp32 logits a few times
    ops.append(Operator("sampling", "vector", 10.0 * rows * v, activation_bytes=3 * rows * v * 4.0, dtype="fp32"))
    return ops
