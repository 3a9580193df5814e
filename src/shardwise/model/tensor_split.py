"""How a layer's tensors divide among the devices of a tensor-parallel group, in any shares.

Megatron's split: attention by query heads (each device holds the key/value heads its query
heads read), the MLP by columns of gate/up and the matching rows of down; each device's
attention output and MLP output are partial sums, added up by one all-reduce each. Shares need
not be equal nor the devices a power of two: a device's heads and columns follow its share,
rounded to whole heads (to whole key/value groups where every device can have one) and to whole
quantisation blocks of columns. Where a device's query heads read their key/value heads unevenly
(more devices than key/value heads, and shares that cut a group), it holds one key/value head per
query head, copies of the shared ones, so its attention is plain multi-head attention.
The embedding and LM head stay whole on the first device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec

COLUMN_BLOCK = 32  # MLP columns go in whole quantisation blocks where the width allows


def apportion(total: int, shares: tuple[float, ...]) -> list[int]:
    """`total` units in proportion to `shares`, each at least one (largest remainders)."""
    if total < len(shares):
        raise ShardwiseError(f"{total} units cannot be split among {len(shares)} devices")
    want = [total * s / sum(shares) for s in shares]
    counts = [max(1, math.floor(w)) for w in want]
    while sum(counts) < total:
        counts[max(range(len(counts)), key=lambda i: want[i] - counts[i])] += 1
    while sum(counts) > total:
        counts[max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - want[i])] -= 1
    return counts


def _ranges(counts: list[int], unit: int) -> list[tuple[int, int]]:
    edges = [0]
    for n in counts:
        edges.append(edges[-1] + n * unit)
    return list(zip(edges, edges[1:], strict=False))


@dataclass(frozen=True)
class RankSlice:
    """What one device of the group holds of each layer."""

    rank: int
    q_heads: tuple[int, int]  # [first, end) of the model's query heads
    kv_heads: tuple[int, ...]  # the model's key/value heads it holds, in order (repeated where copied)
    columns: tuple[int, int]  # [first, end) of the MLP's intermediate columns

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The model as this device's blocks see it: its heads and columns only."""
        return replace(spec, num_heads=self.q_heads[1] - self.q_heads[0], num_kv_heads=len(self.kv_heads),
                       intermediate_size=self.columns[1] - self.columns[0])

    def rows(self, spec: ModelSpec, part: str) -> list[tuple[int, int]] | None:
        """The output rows of a layer part's weight (and bias) this device holds; None: all."""
        d, q = spec.head_dim, self.q_heads
        queries = [(q[0] * d, q[1] * d)]
        keys = _merged([(h * d, (h + 1) * d) for h in self.kv_heads])
        cols = [self.columns]
        match part:
            case "q":
                return queries
            case "k" | "v":
                return keys
            case "qkv":  # fused: the queries, then the keys, then the values
                return queries + _shifted(keys, spec.q_size) + _shifted(keys, spec.q_size + spec.kv_size)
            case "gate" | "up" | "experts_gate" | "experts_up":
                return cols
            case "gate_up":  # fused: the gates, then the ups
                return cols + _shifted(cols, spec.intermediate_size)
        return None

    def columns_of(self, spec: ModelSpec, part: str) -> tuple[int, int] | None:
        """The input columns of a layer part's weight this device holds; None: all."""
        if part == "o":
            return self.q_heads[0] * spec.head_dim, self.q_heads[1] * spec.head_dim
        if part in ("down", "experts_down"):
            return self.columns
        return None

    def keeps_bias(self, part: str) -> bool:
        """An output projection's bias is added once, by the first device (the others' partial sums lack it)."""
        return self.rank == 0 or part not in ("o", "down", "experts_down")


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _shifted(ranges: list[tuple[int, int]], by: int) -> list[tuple[int, int]]:
    return [(a + by, b + by) for a, b in ranges]


def split(spec: ModelSpec, shares: tuple[float, ...]) -> list[RankSlice]:
    """Each device's slice of every layer, for devices with these relative speeds."""
    n = len(shares)
    if n < 1 or any(not (s > 0) for s in shares):
        raise ShardwiseError(f"tensor-parallel shares must be positive numbers, got {list(shares)}")
    if n > spec.num_heads:
        raise ShardwiseError(f"{n} devices cannot share {spec.num_heads} attention heads: use at most "
                             f"{spec.num_heads} devices in one tensor-parallel group")
    group = spec.num_heads // spec.num_kv_heads
    if spec.num_kv_heads >= n:  # whole key/value groups: no device copies a key/value head
        heads = _ranges(apportion(spec.num_kv_heads, shares), group)
    else:
        heads = _ranges(apportion(spec.num_heads, shares), 1)
    block = COLUMN_BLOCK if spec.intermediate_size % COLUMN_BLOCK == 0 else 1
    columns = _ranges(apportion(spec.intermediate_size // block, shares), block)
    slices = []
    for rank, ((a, b), cols) in enumerate(zip(heads, columns, strict=True)):
        read = [h // group for h in range(a, b)]
        touched = sorted(set(read))
        even = all(read.count(kv) == len(read) // len(touched) for kv in touched)
        slices.append(RankSlice(rank, (a, b), tuple(touched if even else read), cols))
    return slices


def heads_of(kv: np.ndarray, kv_heads: tuple[int, ...]) -> np.ndarray:
    """A device's key/value heads of a sequence's KV holding all of the model's,
    [layers, 2, kv_heads, length, head_dim] (what a stage takes in when its sequences move)."""
    if kv_heads == tuple(range(kv.shape[2])):
        return kv
    part = np.empty((*kv.shape[:2], len(kv_heads), *kv.shape[3:]), kv.dtype)
    for i, head in enumerate(kv_heads):  # (a head at a time: numpy's fancy indexing is slower)
        part[:, :, i] = kv[:, :, head]
    return part


def put_heads(kv: np.ndarray, heads: tuple[int, ...], part: np.ndarray) -> None:
    """Write a device's KV (`part`, its key/value heads `heads`) into a sequence's KV of all the
    model's heads: the inverse of heads_of."""
    for i, head in enumerate(heads):
        kv[:, :, head] = part[:, :, i]
