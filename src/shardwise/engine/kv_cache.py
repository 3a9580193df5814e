"""Paged KV storage for the layers of one shard.

All sequences share one pool of token slots, [layers, 2, kv_heads, slots, head_dim],
handed out in blocks of BLOCK_SIZE. A sequence's block table maps its positions
to slots, so a whole batch's new keys are written, and a whole decode batch's
keys are gathered, with one tensor op per layer however many sequences there
are. A sequence is allocated, reserves room before each step, and on free its
blocks return to the pool at once. The pool doubles when it runs out (copying all of it: a
server sizes it to its budget once, at the start, instead of stalling a step mid-serve).
Full blocks can be kept under a key after their sequence ends, and a new sequence can start
with kept blocks (prefix caching); which, and when they go, the scheduler's PrefixCache
decides for every stage alike. A kept block is only read: sequences write past it.
Keys are stored after RoPE. Head-major, so a gather yields the [kv_heads, ...]
layout that attention multiplies without another copy.
"""

from __future__ import annotations

import torch

from shardwise.errors import ShardwiseError

BLOCK_SIZE = 16  # tokens per block


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, initial_blocks: int = 64):
        # zeros, not empty: padded gathers read unused slots, and garbage there could be NaN,
        # which a -inf mask does not cancel.
        self.data = torch.zeros((num_layers, 2, kv_heads, initial_blocks * BLOCK_SIZE, head_dim),
                                dtype=dtype, device=device)
        self._free = list(range(initial_blocks - 1, -1, -1))  # a stack: low block ids first
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._kept: dict[bytes, int] = {}  # prefix-cache key -> block
        self._kept_blocks: set[int] = set()

    # --- lifecycle ------------------------------------------------------------------------------
    def allocate(self, seq_id: int, prefix: list[bytes] = ()) -> None:
        """A new sequence, starting with the kept blocks of these keys (a cached prefix)."""
        if seq_id in self._tables:
            raise ShardwiseError(f"sequence {seq_id} already has a KV cache on this shard")
        try:
            table = [self._kept[key] for key in prefix]
        except KeyError:
            raise ShardwiseError(f"sequence {seq_id}: a block of its cached prefix is not kept on this shard") from None
        self._tables[seq_id], self._lengths[seq_id] = table, len(table) * BLOCK_SIZE

    def free(self, seq_id: int) -> None:
        self._free.extend(b for b in reversed(self._tables.pop(seq_id, [])) if b not in self._kept_blocks)
        self._lengths.pop(seq_id, None)

    def keep(self, seq_id: int, first: int, keys: list[bytes]) -> None:
        """Keep a sequence's full blocks from block `first` on under these keys, past its end
        (a key kept already keeps its own block: this sequence's copy goes when it does)."""
        for key, block in zip(keys, self._table(seq_id)[first:first + len(keys)], strict=True):
            if key not in self._kept:
                self._kept[key] = block
                self._kept_blocks.add(block)

    def evict(self, keys: list[bytes]) -> None:
        """Give kept blocks back to the pool (no sequence uses them any more)."""
        for key in keys:
            block = self._kept.pop(key, None)
            if block is not None:
                self._kept_blocks.discard(block)
                self._free.append(block)

    def kept_keys(self) -> list[bytes]:
        return list(self._kept)

    def sequences(self) -> list[int]:
        return list(self._tables)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def reserve(self, seq_id: int, new_tokens: int) -> None:
        """Make room for new_tokens more before a forward pass writes them."""
        table = self._table(seq_id)
        need = -(-(self._lengths[seq_id] + new_tokens) // BLOCK_SIZE) - len(table)
        if need > len(self._free):
            self._grow(need - len(self._free))
        table.extend(self._free.pop() for _ in range(need))

    def rewind(self, seq_id: int, length: int) -> None:
        """Forget positions from `length` on (a failed step's writes): the next step rewrites them."""
        self._lengths[seq_id] = min(self._lengths[seq_id], length)

    def advance(self, seq_id: int, new_tokens: int) -> None:
        """Count new_tokens as stored, once every layer has written them."""
        self._lengths[seq_id] += new_tokens

    def extract(self, seq_id: int, heads: tuple[int, ...] | None = None, of: int = 0) -> torch.Tensor:
        """A copy of a sequence's stored KV, [layers, 2, kv_heads, length, head_dim]: what
        insert() takes on another shard (a sequence moving with its layers). heads: where this
        cache's heads go among `of` (a tensor-parallel device's of the model's key/value heads:
        the others' are left for them to fill in)."""
        slots = self.slots(seq_id, 0, self.length(seq_id)).to(self.data.device)
        if heads is None:
            return self.data.index_select(3, slots)
        layers, _, _, _, dim = self.data.shape
        kv = self.data.new_empty((layers, 2, of, len(slots), dim))
        for i, head in enumerate(heads):
            torch.index_select(self.data[:, :, i], 2, slots, out=kv[:, :, head])
        return kv

    def insert(self, seq_id: int, pieces: list[tuple[int, torch.Tensor]]) -> None:
        """Allocate a sequence holding the KV of `pieces`: (the first of this cache's layers it
        holds, KV as extract() gives it), together covering every layer once."""
        length = pieces[0][1].shape[3]
        held = sorted((first, first + len(kv)) for first, kv in pieces)
        if [layer for a, b in held for layer in range(a, b)] != list(range(len(self.data))):
            raise ShardwiseError(f"sequence {seq_id}: the KV given holds layers {held} of this cache's "
                                 f"{len(self.data)}")
        self.allocate(seq_id)
        self.reserve(seq_id, length)
        slots = self.slots(seq_id, 0, length).to(self.data.device)
        for first, kv in pieces:
            self.data[first:first + len(kv)].index_copy_(3, slots, kv.to(self.data.device, self.data.dtype))
        self.advance(seq_id, length)

    def make_room(self, lengths: list[int]) -> None:
        """Grow the pool once where new sequences of these lengths would not fit its free blocks
        (a move's sequences arriving together: one at a time, each doubling copied it all)."""
        short = sum(-(-n // BLOCK_SIZE) for n in lengths) - len(self._free)
        if short > 0:
            self._grow(short)

    def hold_at_least(self, tokens: int) -> None:
        """Grow the pool, once, to room for `tokens` tokens (it still doubles past them if it must)."""
        short = -(-tokens // BLOCK_SIZE) - self.data.shape[3] // BLOCK_SIZE
        if short > 0:
            self._grow(short)

    def _grow(self, at_least: int) -> None:
        blocks = self.data.shape[3] // BLOCK_SIZE
        extra = max(at_least, blocks)
        shape = list(self.data.shape)
        shape[3] = extra * BLOCK_SIZE
        self.data = torch.cat([self.data, self.data.new_zeros(shape)], dim=3)
        self._free[:0] = range(blocks + extra - 1, blocks - 1, -1)

    # --- addressing -----------------------------------------------------------------------------
    def length(self, seq_id: int) -> int:
        self._table(seq_id)
        return self._lengths[seq_id]

    def slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Pool slot of each position in [start, end) of a sequence."""
        return self.slot_grid([seq_id], torch.arange(start, end))[0]

    def slot_grid(self, seq_ids: list[int], positions: torch.Tensor) -> torch.Tensor:
        """[sequences, positions] slots; positions past a sequence's blocks map to slot 0
        (callers mask them out)."""
        tables = [self._table(s) for s in seq_ids]
        width = max(len(t) for t in tables)
        grid = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        blocks = (positions // BLOCK_SIZE).clamp(max=width - 1)
        return grid[:, blocks] * BLOCK_SIZE + positions % BLOCK_SIZE

    def _table(self, seq_id: int) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise ShardwiseError(f"sequence {seq_id} has no KV cache on this shard: allocate it first") from None

    # --- accounting -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._tables)

    @property
    def blocks_in_use(self) -> int:
        """Blocks the running sequences use that the prefix cache does not keep."""
        return len({b for t in self._tables.values() for b in t} - self._kept_blocks)

    @property
    def blocks_kept(self) -> int:
        """Blocks the prefix cache keeps (some of them also in running sequences' use)."""
        return len(self._kept_blocks)

    @property
    def nbytes(self) -> int:
        """Bytes of the pool (used or free)."""
        return self.data.numel() * self.data.element_size()
