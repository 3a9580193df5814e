"""Plan: which layers run where. Small, JSON-serialisable, validated before anything loads.

    {"stages": [{"layers": [0, 15], "placement": "local", "device": "cpu", "threads": 1},
                {"layers": [15, 30], "placement": "10.0.0.7", "device": "cuda:0"}]}

placement is "local" (the driver's node), a Ray node id, or a node's IP address.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shardwise.config import EngineConfig
from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec, check_layer_ranges, even_layer_ranges
from shardwise.perf.memory import stage_bytes

DEFAULT_KV_TOKENS = EngineConfig.kv_tokens  # KV budget each stage must fit besides its weights


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
        return cls(tuple(StageSpec(layers, **stage) for layers in even_layer_ranges(spec.num_layers, n)))

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
        return cls.from_dict(read_file(path, "plan", json.loads, json.JSONDecodeError, "JSON"))

    # --- validation ---------------------------------------------------------------------------
    def check_layers(self, spec: ModelSpec) -> None:
        """Stages must cover layers 0..L-1 in order, each non-empty, with no gap or overlap."""
        check_layer_ranges([s.layers for s in self.stages], spec.num_layers)

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


def read_file(path: str | Path, what: str, parse: Callable[[str], Any], malformed: type[Exception],
              language: str) -> Any:
    """A plan or cluster file's parsed contents, or a ShardwiseError saying what is wrong with it."""
    try:
        return parse(Path(path).read_text())
    except FileNotFoundError:
        raise ShardwiseError(f"{what} file '{path}' does not exist") from None
    except malformed as e:
        raise ShardwiseError(f"{what} file '{path}' is not valid {language} ({e})") from None
