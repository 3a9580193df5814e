"""Plan: which layers run where. Small, JSON-serialisable, validated before anything loads.

    {"stages": [{"layers": [0, 15], "placement": "local", "device": "cpu", "threads": 1},
                {"layers": [15, 30], "placement": "10.0.0.7", "device": "cuda:0"}]}

placement is "local" (the driver's node), a Ray node id, or a node's IP address.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec
from shardwise.perf.hardware import dtype_bytes, edge_dtype

DEFAULT_KV_TOKENS = 16384  # KV budget each stage must fit besides its weights
STAGE_TIMEOUT_S = 60.0  # no pipeline step finishing for this long means a stage hangs


@dataclass(frozen=True)
class StageSpec:
    layers: tuple[int, int]  # [start, end)
    placement: str = "local"
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads; None: share this node's cores among its stages


@dataclass(frozen=True)
class Plan:
    stages: tuple[StageSpec, ...]

    @classmethod
    def even(cls, spec: ModelSpec, n: int, **stage: Any) -> Plan:
        """n stages of (nearly) equal layer counts, earlier stages taking the remainder."""
        if not 1 <= n <= spec.num_layers:
            raise ShardwiseError(f"cannot split {spec.num_layers} layers into {n} stages: use 1..{spec.num_layers}")
        size, extra = divmod(spec.num_layers, n)
        bounds = [0]
        for i in range(n):
            bounds.append(bounds[-1] + size + (i < extra))
        return cls(tuple(StageSpec((a, b), **stage) for a, b in zip(bounds, bounds[1:], strict=False)))

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"stages": [{**asdict(s), "layers": list(s.layers)} for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
            raise ShardwiseError('a plan needs a non-empty "stages" list, e.g. {"stages": [{"layers": [0, 15]}, ...]}')
        stages = []
        for i, s in enumerate(data["stages"]):
            if not isinstance(s, dict) or "layers" not in s:
                raise ShardwiseError(f'plan stage {i} needs "layers": [start, end]')
            unknown = set(s) - {"layers", "placement", "device", "threads"}
            if unknown:
                raise ShardwiseError(f"plan stage {i} has unknown fields {sorted(unknown)}: "
                                     "allowed are layers, placement, device, threads")
            layers = s["layers"]
            if not (isinstance(layers, list | tuple) and len(layers) == 2 and all(type(x) is int for x in layers)):
                raise ShardwiseError(f'plan stage {i}: "layers" must be two integers [start, end], got {layers!r}')
            threads = s.get("threads")
            if threads is not None and (type(threads) is not int or threads < 1):
                raise ShardwiseError(f'plan stage {i}: "threads" must be a positive integer, got {threads!r}')
            stages.append(StageSpec((layers[0], layers[1]), str(s.get("placement", "local")),
                                    str(s.get("device", "cpu")), threads))
        return cls(tuple(stages))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ShardwiseError(f"plan file '{path}' does not exist") from None
        except json.JSONDecodeError as e:
            raise ShardwiseError(f"plan file '{path}' is not valid JSON ({e})") from None
        return cls.from_dict(data)

    # --- validation ---------------------------------------------------------------------------
    def check_layers(self, spec: ModelSpec) -> None:
        """Stages must cover layers 0..L-1 in order, each non-empty, with no gap or overlap."""
        expected = 0
        for i, stage in enumerate(self.stages):
            start, end = stage.layers
            if end <= start:
                raise ShardwiseError(f"plan stage {i} is empty or reversed: layers [{start}, {end})")
            if start > expected:
                raise ShardwiseError(f"plan has a gap: layers [{expected}, {start}) belong to no stage "
                                     f"(stage {i} starts at {start})")
            if start < expected:
                raise ShardwiseError(f"plan stages overlap: stage {i} starts at layer {start}, "
                                     f"but layers up to {expected - 1} are already placed")
            expected = end
        if expected != spec.num_layers:
            raise ShardwiseError(f"plan covers layers [0, {expected}) but the model has {spec.num_layers}: "
                                 f"the last stage must end at {spec.num_layers}")

    def check_memory(self, spec: ModelSpec, dtypes: list[str], where: list[str], capacity: dict[str, int],
                     kv_tokens: int) -> None:
        """The stages placed on one memory (where[i], e.g. "10.0.0.7/cpu") must fit it together:
        weights at their dtype plus a KV budget of kv_tokens tokens each."""
        need: dict[str, float] = {}
        for stage, dtype, key in zip(self.stages, dtypes, where, strict=True):
            need[key] = need.get(key, 0) + stage_bytes(spec, stage.layers, dtype, kv_tokens)
        for key, total in need.items():
            if key in capacity and total > capacity[key]:
                ids = [i for i, k in enumerate(where) if k == key]
                raise ShardwiseError(
                    f"plan stages {ids} on {key} need {total / 2**30:.2f} GiB (weights + KV for {kv_tokens} "
                    f"tokens) but it has {capacity[key] / 2**30:.2f} GiB: move layers elsewhere, add stages "
                    "on other devices, or lower the KV budget"
                )


def stage_bytes(spec: ModelSpec, layers: tuple[int, int], dtype: str, kv_tokens: int,
                kv_dtype: str | None = None) -> float:
    """Memory a stage holds: its layers' weights at `dtype`, embedding / head at the ends, and a
    KV budget of kv_tokens tokens at kv_dtype (default: dtype; fp32 for int8 / int4 weights, whose
    activations and cache stay float)."""
    start, end = layers
    params = (end - start) * spec.layer_parameters()
    embed, edges = spec.vocab_size * spec.hidden_size, 0
    if start == 0:
        edges += embed
    if end == spec.num_layers:
        params += spec.hidden_size
        edges += embed if not (spec.tie_embeddings and start == 0) else 0
    kv_dtype = kv_dtype or ("fp32" if dtype in ("int8", "int4") else dtype)
    kv = 2 * (end - start) * spec.kv_size * dtype_bytes(kv_dtype) * kv_tokens
    return params * dtype_bytes(dtype) + edges * dtype_bytes(edge_dtype(dtype)) + kv
