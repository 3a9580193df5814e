"""Per-sequence KV storage for the layers of one shard.

Each sequence owns one tensor [layers, 2, capacity, kv_heads, head_dim] that is
allocated when the sequence arrives, grown in chunks as it lengthens, and
dropped the moment it is freed. Keys are stored after RoPE. Token-major, so a
sequence's keys are one contiguous block and a batch of them pads in one call.
"""

from __future__ import annotations

import torch

from shardwise.errors import ShardwiseError

GROW_STEP = 128  # tokens; capacity grows to the next multiple, at least doubling


class SequenceKV:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.length = 0  # tokens stored
        self._shape = (num_layers, 2, 0, kv_heads, head_dim)
        self.data = torch.empty(self._shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    def reserve(self, new_tokens: int) -> None:
        """Make room for new_tokens more before a forward pass writes them."""
        need = self.length + new_tokens
        if need <= self.capacity:
            return
        capacity = max(need, 2 * self.capacity)
        capacity = -(-capacity // GROW_STEP) * GROW_STEP
        shape = (*self._shape[:2], capacity, *self._shape[3:])
        grown = torch.empty(shape, dtype=self.data.dtype, device=self.data.device)
        grown[:, :, : self.length] = self.data[:, :, : self.length]
        self.data = grown

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([new, kv_heads, head_dim]) after the current length and return this
        layer's whole keys and values ([length + new, kv_heads, head_dim] views)."""
        end = self.length + k.shape[0]
        cache = self.data[layer]
        cache[0, self.length : end] = k
        cache[1, self.length : end] = v
        return cache[0, :end], cache[1, :end]

    def advance(self, new_tokens: int) -> None:
        """Count new_tokens as stored, once every layer has written them."""
        self.length += new_tokens

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class KVCache:
    """The KV of every live sequence on one shard, by sequence id."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self._layout = (num_layers, kv_heads, head_dim, dtype, device)
        self._sequences: dict[int, SequenceKV] = {}

    def allocate(self, seq_id: int) -> SequenceKV:
        if seq_id in self._sequences:
            raise ShardwiseError(f"sequence {seq_id} already has a KV cache on this shard")
        seq = self._sequences[seq_id] = SequenceKV(*self._layout)
        return seq

    def free(self, seq_id: int) -> None:
        self._sequences.pop(seq_id, None)

    def __getitem__(self, seq_id: int) -> SequenceKV:
        try:
            return self._sequences[seq_id]
        except KeyError:
            raise ShardwiseError(f"sequence {seq_id} has no KV cache on this shard: allocate it first") from None

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._sequences

    def __len__(self) -> int:
        return len(self._sequences)

    @property
    def nbytes(self) -> int:
        return sum(seq.nbytes for seq in self._sequences.values())
