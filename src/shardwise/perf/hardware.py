"""DeviceSpec and LinkSpec: what the performance model knows about hardware.

Devices come from the catalog (devices.yaml, datasheet rooflines) or from a file
that `shardwise profile` wrote (measured rooflines, efficiencies and overheads).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from shardwise.errors import ShardwiseError

# Bytes per stored value, block scales included: int8 / int4 are shardwise's blocks of 32 with an
# fp16 scale (int4: and an fp16 min), the size of GGUF's Q8_0 / Q4_1.
DTYPE_BYTES = {"fp32": 4.0, "tf32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0625, "int4": 0.625,
               "q8_0": 1.0625, "q4_1": 0.625, "q4_0": 0.5625}
# 4-bit formats keep the embedding and LM head at 8 bits (llama.cpp's Q4 files and shardwise both do)
EDGE_DTYPE = {"int4": "int8", "q4_0": "q8_0", "q4_1": "q8_0"}
DTYPE_ALIASES = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "float16": "fp16", "f16": "fp16",
                 "half": "fp16", "float8": "fp8"}


_FALLBACK = {"bf16": ("fp16",), "fp16": ("bf16",), "fp8": ("bf16", "fp16"), "int8": ("bf16", "fp16")}


def canonical_dtype(dtype: str) -> str:
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPE_BYTES:
        raise ShardwiseError(f"unknown precision '{dtype}': use one of {', '.join(DTYPE_BYTES)}")
    return name


def dtype_bytes(dtype: str) -> float:
    return DTYPE_BYTES[canonical_dtype(dtype)]


def edge_dtype(weights: str) -> str:
    """The dtype the embedding and LM head are stored at, for layers stored at `weights`."""
    name = canonical_dtype(weights)
    return EDGE_DTYPE.get(name, name)


def from_idle(seconds, burst, share):
    """Wall time of `seconds` of burst-speed work started from idle (numbers or arrays): at burst
    speed while the burst lasts, then at the sustained share of it (a CFS quota's budget per period)."""
    with np.errstate(invalid="ignore"):  # (inf - inf where nothing fits and bursts are unlimited: not taken)
        return np.where(seconds <= burst, seconds, burst + (seconds - burst) / share)


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_bytes: float
    bandwidth: float  # bytes/s from main memory
    flops: dict[str, float]  # peak FLOP/s by dtype
    kind: str = "gpu"  # gpu, soc or cpu
    compute_efficiency: float = 1.0  # share of peak FLOP/s that large matmuls reach
    memory_efficiency: float = 1.0  # share of peak bandwidth that streaming reads reach
    attention_efficiency: float = 1.0  # share of that roofline attention kernels reach
    op_overhead_s: float = 0.0  # fixed cost per operator: kernel launch, framework dispatch
    step_overhead_s: float = 0.0  # fixed cost per forward step: batching, sampling set-up
    # measured share of the roofline that matmuls reach, by rows (tokens): [[rows, efficiency], ...];
    # small-row matmuls often fall far below it. Empty: compute/memory efficiency apply.
    matmul_efficiency: list[list[float]] = field(default_factory=list)
    # the same, measured for weights kept in a quantised format ({"int4": [[rows, efficiency], ...]}):
    # a format's products read fewer bytes but unpack them, so they reach their own share of the roofline
    format_matmul_efficiency: dict[str, list[list[float]]] = field(default_factory=dict)
    default_dtype: str = "bf16"
    # A device that may not compute all the time (a CPU quota: a cgroup's, a shared or burstable
    # machine's) runs at the figures above in bursts, but keeps up only this share of that speed
    # when busy all the time; a burst from idle lasts burst_s seconds (None: as long as it needs).
    sustained_share: float = 1.0
    burst_s: float | None = None
    # CPU seconds a pipeline stage's node spends per step on the call itself (taking it, fetching its
    # input, storing its output: Ray's side), measured by `profile --address`; a busy node pays it
    # from its share on every step (from idle it is part of the hand-over's latency)
    task_cpu_s: float = 0.0
    # the fixed cost of one collective between processes on this device (tensor parallelism): an
    # NCCL-class launch on GPUs; on CPUs the engine's own over TCP, measured by `profile` (~30 µs)
    collective_s: float = 5e-6
    # the machine it runs on (a boot id; "": unknown) and the share of its speed it keeps while every
    # other device there computes too: devices on one machine share its memory bandwidth, caches
    # and the cores its own processes need. A tensor-parallel group's devices compute at once, a
    # sequence's products at a time (crowded_share); pipeline stages on hosts of one machine, only
    # with micro-batches in flight, several rows' (batched_crowded_share, 0: as crowded_share).
    # More rows per weight read lean less on the memory system, and are crowded less.
    machine: str = ""
    crowded_share: float = 1.0
    batched_crowded_share: float = 0.0
    source: str = ""
    measured: dict[str, Any] = field(default_factory=dict)  # what profile measured, for the record

    @property
    def crowded_in_flight(self) -> float:
        """The share of its speed it keeps while other hosts on its machine run micro-batches too."""
        return self.batched_crowded_share or self.crowded_share

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s at a dtype. Without native support, 8-bit runs at 16-bit rate (dequantised),
        fp16 and bf16 stand in for each other, and anything else falls back to fp32."""
        dtype = canonical_dtype(dtype)
        for candidate in (dtype, *_FALLBACK.get(dtype, ()), "fp32"):
            if candidate in self.flops:
                return self.flops[candidate]
        raise ShardwiseError(f"device '{self.name}' lists no FLOP/s for {dtype} or fp32")

    def matmul_efficiency_at(self, rows: int, weights: str = "") -> float | None:
        """The measured matmul efficiency at a row count, interpolated in log rows, for weights
        in this format where it was measured apart."""
        curve = self.format_matmul_efficiency.get(weights)
        if not curve or rows > curve[-1][0]:  # (more rows than measured: a format runs as float GEMMs)
            curve = self.matmul_efficiency
        if not curve:
            return None
        points = np.array(curve, dtype=float)
        return float(np.interp(np.log2(max(rows, 1)), np.log2(points[:, 0]), points[:, 1]))

    def step_seconds(self, seconds: float) -> float:
        """Wall time of work that takes `seconds` at burst speed, started from idle."""
        return float(from_idle(seconds, np.inf if self.burst_s is None else self.burst_s, self.sustained_share))

    def busy_seconds(self, seconds: float) -> float:
        """Wall time per step of a stage whose work takes `seconds` at burst speed, on a device busy
        all the time: the work and the call's own CPU, at its sustained speed."""
        return (seconds + self.task_cpu_s) / self.sustained_share

    def slower(self, factor: float) -> DeviceSpec:
        """The device taking `factor` times as long for everything it does, bursts and all."""
        return replace(self, flops={k: v / factor for k, v in self.flops.items()}, bandwidth=self.bandwidth / factor,
                       op_overhead_s=self.op_overhead_s * factor, step_overhead_s=self.step_overhead_s * factor,
                       task_cpu_s=self.task_cpu_s * factor)

    def sustaining(self, factor: float) -> DeviceSpec:
        """The device keeping up `factor` times as long for its work when busy (another tenant took
        its cores, its quota changed): its share of burst speed changes, its bursts only where the
        share cannot (a share above 1 is a faster burst)."""
        share = min(1.0, self.sustained_share / factor)
        burst = None if self.burst_s is None else self.burst_s * share / self.sustained_share
        return replace(self, sustained_share=share, burst_s=burst).slower(factor * share / self.sustained_share)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class LinkSpec:
    name: str
    bandwidth: float  # bytes/s, one direction
    latency: float  # seconds per message
    source: str = ""
    # the latency was measured with messages this large: their bytes (and the framing around them,
    # which on a slow link outweighs a decode step's hidden state) are in it already
    latency_bytes: float = 0.0
    # where measured (0: not), messages up to step_bytes (a decode step's hidden states for a
    # micro-batch) pass their extra bytes at step_bandwidth; only larger ones' further bytes go at
    # `bandwidth`. A shaped or lossy link can pass a short message at its rate and a long one far
    # slower (a stalled receiver overflows its queue, and TCP backs off)
    step_bytes: float = 0.0
    step_bandwidth: float = 0.0
    # the engine's all-reduce between two devices this link joins, where measured (0: not): its
    # fixed seconds and the bytes/s of its parts (a direct TCP connection, not a Ray call)
    collective_s: float = 0.0
    collective_bandwidth: float = 0.0

    def time(self, nbytes: float) -> float:
        if not nbytes:
            return 0.0
        extra = max(nbytes - self.latency_bytes, 0.0)
        if not self.step_bandwidth:
            return self.latency + extra / self.bandwidth
        near = min(extra, max(self.step_bytes - self.latency_bytes, 0.0))
        return self.latency + near / self.step_bandwidth + (extra - near) / self.bandwidth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# A link that costs nothing: the hand-over inside one device.
SAME_DEVICE = LinkSpec("same-device", float("inf"), 0.0)


@cache
def _catalog() -> dict[str, Any]:
    return yaml.safe_load(resources.files("shardwise.perf").joinpath("devices.yaml").read_text())


def catalog_devices() -> dict[str, DeviceSpec]:
    return {name: _device_from_catalog(name, entry) for name, entry in _catalog()["devices"].items()}


def catalog_links() -> dict[str, LinkSpec]:
    return {
        name: LinkSpec(name, e["bandwidth_gbs"] * 1e9, e["latency_us"] * 1e-6, e.get("source", ""))
        for name, e in _catalog()["links"].items()
    }


CPU_COLLECTIVE_S = 3e-5


def _device_from_catalog(name: str, e: dict[str, Any]) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        kind=e["kind"],
        memory_bytes=e["memory_gb"] * 1e9,
        bandwidth=e["bandwidth_gbs"] * 1e9,
        flops={dtype: tflops * 1e12 for dtype, tflops in e["tflops"].items()},
        default_dtype=e.get("default_dtype", "bf16"),
        source=e.get("source", ""),
        # CPUs and SoCs sum tensor-parallel parts over TCP between processes: as measured on a
        # 2-core x86 machine (profile measures a device's own)
        collective_s=CPU_COLLECTIVE_S if e["kind"] != "gpu" else DeviceSpec.collective_s,
    )


def catalog_key(name: str) -> str:
    """How a name is looked up in the device and link catalogs."""
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def load_profile(path: str | Path) -> dict[str, Any]:
    """A file `shardwise profile` wrote: {"devices": [...], "links": [...]}."""
    try:
        data = json.loads(Path(path).read_text())
        return {
            "devices": [DeviceSpec.from_dict(d) for d in data["devices"]],
            "links": [(link["from"], link["to"], LinkSpec.from_dict(link)) for link in data.get("links", [])],
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardwiseError(
            f"cannot read the profile '{path}' ({e}); write it with `shardwise profile --out {path}`"
        ) from None


def profile_link(a: str, b: str) -> LinkSpec | None:
    """The measured link between two devices named FILE#DEVICE (or FILE) in one profile file."""
    (path_a, _, dev_a), (path_b, _, dev_b) = a.partition("#"), b.partition("#")
    if path_a != path_b or not Path(path_a).is_file():
        return None
    profile = load_profile(path_a)
    names = [d.name for d in profile["devices"]]
    dev_a, dev_b = dev_a or names[0], dev_b or names[0]
    for u, v, link in profile["links"]:
        if {u, v} == {dev_a, dev_b}:
            return link
    return None


def load_device(name: str, files: bool = True) -> DeviceSpec:
    """A catalog name (e.g. h100), or a profile file (FILE or FILE#DEVICE when it holds several).
    files=False: catalog names only (a name from a remote user must never open a file here)."""
    path, _, which = name.partition("#")
    if files and Path(path).is_file():
        devices = load_profile(path)["devices"]
        chosen = [d for d in devices if not which or d.name == which]
        if len(chosen) != 1:
            raise ShardwiseError(
                f"the profile '{path}' holds devices {', '.join(d.name for d in devices)}: "
                f"name one as {path}#DEVICE"
            )
        return chosen[0]
    devices = catalog_devices()
    if catalog_key(name) not in devices:
        files_too = "a profile file from `shardwise profile` or " if files else ""
        raise ShardwiseError(f"unknown device '{name}': use {files_too}one of {', '.join(devices)}")
    return devices[catalog_key(name)]


def load_link(name: str) -> LinkSpec:
    """A catalog name (e.g. ethernet-10g) or 'GBPS:US', e.g. '1.25:50' for 1.25 GB/s and 50 µs."""
    links = catalog_links()
    if catalog_key(name) in links:
        return links[catalog_key(name)]
    try:
        gbps, us = (float(x) for x in name.split(":"))
        if gbps <= 0 or us < 0:
            raise ValueError
        return LinkSpec(name, gbps * 1e9, us * 1e-6)
    except ValueError:
        raise ShardwiseError(
            f"unknown link '{name}': use one of {', '.join(links)} or GBPS:US (e.g. 1.25:50)"
        ) from None
