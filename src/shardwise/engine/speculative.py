"""Speculative decoding: a drafter proposes a sequence's next tokens cheaply, and one step of the
model checks them all (SamplingParams' sampler accepts or rejects each: lossless).

The drafter here is prompt lookup (n-gram): the continuation of the most recent earlier place
where the sequence's last n tokens occurred, in its prompt or its output. It needs no second
model and pays off where the output repeats its input (code edits, summaries, retrieval).
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.errors import ShardwiseError

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: the drafter. gamma: most tokens drafted per step (each sequence adapts below it
    to what it accepts). ngram: the longest and shortest runs of tokens prompt lookup matches.
    max_batch: sequences speculate only while at most this many decode (a bigger batch keeps
    the cores busy already, and every rejected draft's compute is lost)."""

    method: str = "ngram"
    gamma: int = 4
    max_ngram: int = 4
    min_ngram: int = 2
    max_batch: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ShardwiseError(f"unknown speculative method '{self.method}': use one of {', '.join(METHODS)}")
        if self.gamma < 1 or not 1 <= self.min_ngram <= self.max_ngram or self.max_batch < 1:
            raise ShardwiseError("speculative decoding needs gamma >= 1, 1 <= min_ngram <= max_ngram and "
                                 f"max_batch >= 1, got {self}")


class NgramDrafter:
    def __init__(self, config: SpeculativeConfig):
        self.max_ngram, self.min_ngram = config.max_ngram, config.min_ngram

    def propose(self, tokens: list[int], count: int) -> list[int]:
        """Up to `count` tokens that followed the most recent earlier occurrence of the longest
        run of tokens (max_ngram down to min_ngram long) that `tokens` ends with."""
        for size in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-size:]
            for start in range(len(tokens) - size - 1, -1, -1):
                if tokens[start] == tail[0] and tokens[start:start + size] == tail:
                    return tokens[start + size:start + size + count]
        return []


def next_gamma(gamma: int, drafted: int, accepted: int, limit: int) -> int:
    """A sequence's next draft length: one more after every draft was accepted, else just past
    what was (a sequence whose drafts keep failing drafts one token at a time)."""
    return min(gamma + 1, limit) if accepted == drafted else max(accepted + 1, 1)
