"""Automatic prefix caching: full KV blocks are kept after their sequence ends, keyed by
their tokens and everything before them, so a later prompt that starts the same way
(a chat's system prompt and earlier turns, an agent's tool list) prefills only the rest.

The scheduler owns this index and every stage follows it: the index decides which block
keys exist, which a new sequence starts with and which are evicted, and sends each decision
to the stages in the order it makes them (KVCache.allocate / keep / evict). So every stage,
each holding its own layers of a block, agrees on the same hit length by construction, with
no round trip. A block a running sequence uses is never evicted; unused ones go least recently
used first. A stage replaced or moved starts empty: the scheduler then clears the index.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from shardwise.engine.kv_cache import BLOCK_SIZE


def block_keys(tokens: list[int], start: int = 0, parent: bytes = b"") -> list[bytes]:
    """The key of each full block of `tokens` from block `start` on (parent: the key of the
    block before it): a digest of the block's tokens and its parent's key, so equal keys
    mean equal tokens from the start of the sequence (vLLM's scheme)."""
    keys = []
    for first in range(start * BLOCK_SIZE, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
        block = np.asarray(tokens[first:first + BLOCK_SIZE], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


class CachedPrefix(NamedTuple):
    """The cached blocks a new sequence starts with: their keys, and the tokens they hold (a
    last stage's sampler sees them as if prefilled, for repetition penalties)."""

    keys: list[bytes]
    tokens: list[int]


class PrefixCache:
    def __init__(self) -> None:
        # key -> running sequences holding the block; unheld ones in least-recently-used order first
        self._holders: OrderedDict[bytes, int] = OrderedDict()
        self.unused = 0  # blocks no running sequence holds: what eviction can free
        self.query_tokens = self.hit_tokens = 0  # prompt tokens looked up and found, for the hit rate

    @property
    def blocks(self) -> int:
        """Blocks cached (held or not). (A property, not len(): an empty cache must stay truthy.)"""
        return len(self._holders)

    def match(self, keys: list[bytes]) -> int:
        """How many of these leading blocks are cached."""
        n = 0
        while n < len(keys) and keys[n] in self._holders:
            n += 1
        return n

    def hold(self, keys: list[bytes]) -> None:
        for key in keys:
            self.unused -= self._holders[key] == 0
            self._holders[key] += 1

    def insert(self, keys: list[bytes]) -> list[bytes]:
        """Cache a sequence's blocks that just became full, held by it; returns the keys that
        were new (a block another sequence computed at the same time stays that one's)."""
        new = [key for key in keys if key not in self._holders]
        for key in new:
            self._holders[key] = 1
        return new

    def release(self, keys: list[bytes]) -> None:
        """A sequence ends: its blocks become evictable, its last block first (a prefix outlives
        its continuations)."""
        for key in reversed(keys):
            self._holders[key] -= 1
            self.unused += self._holders[key] == 0
            self._holders.move_to_end(key)

    def evict(self, blocks: int) -> list[bytes]:
        """Free up to `blocks` unused blocks, least recently used first; returns their keys."""
        gone = [key for key, holders in self._holders.items() if holders == 0][:blocks]
        for key in gone:
            del self._holders[key]
        self.unused -= len(gone)
        return gone

    def clear(self) -> None:
        self._holders.clear()
        self.unused = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
