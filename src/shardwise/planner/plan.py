"""Plan: which layers run where. Small, JSON-serialisable, validated before anything loads.

    {"stages": [{"layers": [0, 15], "placement": "local", "device": "cpu", "threads": 1},
                {"layers": [15, 30], "placement": "10.0.0.7", "device": "cuda:0"}]}

placement is "local" (the driver's node), a Ray node id, or a node's IP address. A stage
may split its layers among several devices (tensor parallelism), each taking its share of
every layer's heads and columns:

    {"layers": [0, 30], "devices": [{"placement": "local", "share": 0.75},
                                    {"placement": "10.0.0.7", "share": 0.25}]}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from shardwise.config import EngineConfig
from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec, check_layer_ranges, even_layer_ranges
from shardwise.model.tensor_split import split
from shardwise.perf.memory import stage_bytes

DEFAULT_KV_TOKENS = EngineConfig.kv_tokens  # KV budget each stage must fit besides its weights


@dataclass(frozen=True)
class TensorDevice:
    """One device of a tensor-parallel stage: its node, and its share of each layer's work."""

    placement: str = "local"
    share: float = 1.0


@dataclass(frozen=True)
class StageSpec:
    layers: tuple[int, int]  # [start, end)
    placement: str = "local"  # (a tensor-parallel stage's first device's)
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads; None: share this node's cores among its stages
    devices: tuple[TensorDevice, ...] = ()  # two or more: the layers split among them

    @property
    def shares(self) -> list[tuple[str, float]]:
        """Each device's placement and fraction of the stage's work (one device: all of it)."""
        if not self.devices:
            return [(self.placement, 1.0)]
        total = sum(d.share for d in self.devices)
        return [(d.placement, d.share / total) for d in self.devices]


@dataclass(frozen=True)
class Plan:
    stages: tuple[StageSpec, ...]

    @classmethod
    def even(cls, spec: ModelSpec, n: int, **stage: Any) -> Plan:
        """n stages of (nearly) equal layer counts, earlier stages taking the remainder."""
        return cls(tuple(StageSpec(layers, **stage) for layers in even_layer_ranges(spec.num_layers, n)))

    def tensor_parallel(self, n: int) -> Plan:
        """Each stage's layers split among n equal devices on its node (tensor parallelism)."""
        if type(n) is not int or n < 1:
            raise ShardwiseError(f"a number of tensor-parallel devices must be a positive integer, got {n!r}")
        return Plan(tuple(replace(s, devices=(TensorDevice(s.placement),) * n if n > 1 else ())
                          for s in self.stages))

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        stages = []
        for s in self.stages:
            stage = {**asdict(s), "layers": list(s.layers)}
            if not s.devices:
                del stage["devices"]
            stages.append(stage)
        return {"stages": stages}

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
            raise ShardwiseError('a plan needs a non-empty "stages" list, e.g. {"stages": [{"layers": [0, 15]}, ...]}')
        stages = []
        for i, s in enumerate(data["stages"]):
            if not isinstance(s, dict) or "layers" not in s:
                raise ShardwiseError(f'plan stage {i} needs "layers": [start, end]')
            unknown = set(s) - {"layers", "placement", "device", "threads", "devices"}
            if unknown:
                raise ShardwiseError(f"plan stage {i} has unknown fields {sorted(unknown)}: "
                                     "allowed are layers, placement, device, threads, devices")
            layers = s["layers"]
            if not (isinstance(layers, list | tuple) and len(layers) == 2 and all(type(x) is int for x in layers)):
                raise ShardwiseError(f'plan stage {i}: "layers" must be two integers [start, end], got {layers!r}')
            threads = s.get("threads")
            if threads is not None and (type(threads) is not int or threads < 1):
                raise ShardwiseError(f'plan stage {i}: "threads" must be a positive integer, got {threads!r}')
            devices = _devices(i, s.get("devices", []))
            placement = devices[0].placement if devices else str(s.get("placement", "local"))
            stages.append(StageSpec((layers[0], layers[1]), placement, str(s.get("device", "cpu")), threads,
                                    devices if len(devices) > 1 else ()))
        return cls(tuple(stages))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(read_file(path, "plan", json.loads, json.JSONDecodeError, "JSON"))

    # --- validation ---------------------------------------------------------------------------
    def check_layers(self, spec: ModelSpec) -> None:
        """Stages must cover layers 0..L-1 in order, each non-empty, with no gap or overlap; a
        tensor-parallel stage must have no more devices than the model has heads."""
        check_layer_ranges([s.layers for s in self.stages], spec.num_layers)
        for i, stage in enumerate(self.stages):
            if stage.devices:
                try:
                    split(spec, tuple(d.share for d in stage.devices))
                except ShardwiseError as e:
                    raise ShardwiseError(f"plan stage {i}: {e}") from None

    def check_memory(self, spec: ModelSpec, dtypes: list[str], where: list[list[str]], capacity: dict[str, int],
                     kv_tokens: int) -> None:
        """The stages placed on one memory (where[i]: each of stage i's devices', e.g. "10.0.0.7/cpu")
        must fit it together: weights at their dtype plus a KV budget of kv_tokens tokens each."""
        need: dict[str, float] = {}
        for stage, dtype, keys in zip(self.stages, dtypes, where, strict=True):
            for key, (_, fraction) in zip(keys, stage.shares, strict=True):  # a device holds its share
                need[key] = need.get(key, 0) + fraction * stage_bytes(spec, stage.layers, dtype, kv_tokens)
        for key, total in need.items():
            if key in capacity and total > capacity[key]:
                ids = [i for i, keys in enumerate(where) if key in keys]
                raise ShardwiseError(
                    f"plan stages {ids} on {key} need {total / 2**30:.2f} GiB (weights + KV for {kv_tokens} "
                    f"tokens) but it has {capacity[key] / 2**30:.2f} GiB: move layers elsewhere, add stages "
                    "on other devices, or lower the KV budget"
                )


def _devices(i: int, given: Any) -> tuple[TensorDevice, ...]:
    """A stage's "devices" list, checked."""
    if not isinstance(given, list) or not all(isinstance(d, dict) for d in given):
        raise ShardwiseError(f'plan stage {i}: "devices" must be a list of {{"placement": ..., "share": ...}}')
    devices = []
    for d in given:
        unknown = set(d) - {"placement", "share"}
        share = d.get("share", 1.0)
        if unknown:
            raise ShardwiseError(f"plan stage {i}: a device has unknown fields {sorted(unknown)}: "
                                 "allowed are placement, share")
        if type(share) not in (int, float) or not share > 0:
            raise ShardwiseError(f'plan stage {i}: a device\'s "share" must be a positive number, got {share!r}')
        devices.append(TensorDevice(str(d.get("placement", "local")), float(share)))
    return tuple(devices)


def read_file(path: str | Path, what: str, parse: Callable[[str], Any], malformed: type[Exception],
              language: str) -> Any:
    """A plan or cluster file's parsed contents, or a ShardwiseError saying what is wrong with it."""
    try:
        return parse(Path(path).read_text())
    except FileNotFoundError:
        raise ShardwiseError(f"{what} file '{path}' does not exist") from None
    except malformed as e:
        raise ShardwiseError(f"{what} file '{path}' is not valid {language} ({e})") from None
