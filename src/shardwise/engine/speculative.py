"""Speculative decoding: a drafter proposes a sequence's next tokens cheaply, and one step of the
model checks them all (SamplingParams' sampler accepts or rejects each: lossless).

Two drafters share one interface (propose for a batch of sequences, release a finished one):
- prompt lookup (n-gram): the continuation of the most recent earlier place where the
  sequence's last n tokens occurred, in its prompt or its output. No second model; pays off
  where the output repeats its input (code edits, summaries, retrieval).
- a draft model of the same vocabulary, greedy: by default the target's own weights in a
  cheaper format (int4 drafting for fp32), or a smaller model. It keeps a KV cache of its own
  in the driver's process; the target's own weights, where the target runs in that process
  too, copy the target's KV of the tokens it already ran instead of running them.
"""

from __future__ import annotations

import itertools
from typing import Protocol

import torch

from shardwise.config import SpeculativeConfig
from shardwise.engine.shard import ShardModel
from shardwise.errors import ShardwiseError

# (sequence id, its tokens so far, most tokens to draft)
Wanted = tuple[int, list[int], int]


class Drafter(Protocol):
    def propose(self, wanted: list[Wanted]) -> list[list[int]]:
        """For each sequence, up to its count of tokens likely to follow its tokens."""

    def release(self, seq_id: int) -> None:
        """Forget a sequence (it ended, or gave its KV back)."""


class NgramDrafter:
    def __init__(self, config: SpeculativeConfig):
        self.max_ngram, self.min_ngram = config.max_ngram, config.min_ngram

    def propose(self, wanted: list[Wanted]) -> list[list[int]]:
        return [self.lookup(tokens, count) for _, tokens, count in wanted]

    def release(self, seq_id: int) -> None:
        pass  # it holds nothing

    def lookup(self, tokens: list[int], count: int) -> list[int]:
        """Up to `count` tokens that followed the most recent earlier occurrence of the longest
        run of tokens (max_ngram down to min_ngram long) that `tokens` ends with."""
        for size in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-size:]
            for start in range(len(tokens) - size - 1, -1, -1):
                if tokens[start] == tail[0] and tokens[start:start + size] == tail:
                    return tokens[start + size:start + size + count]
        return []


class ModelDrafter:
    """Greedy drafts from a whole model in this process. Its KV follows each sequence's tokens:
    before drafting it keeps what still agrees with them (its accepted drafts) and runs only
    the rest, so a sequence costs one prefill and then a few tokens per step."""

    # a catch-up this short runs as decode rows (the fused decode path takes them)
    SHORT = 8

    def __init__(self, shard: ShardModel):
        if not (shard.is_first and shard.is_last):
            raise ShardwiseError("a draft model must hold every layer")
        self.shard = shard
        self.seen: dict[int, list[int]] = {}  # the tokens each sequence's draft KV holds
        self.target: ShardModel | None = None  # the model whose KV the draft copies (follow)

    def follow(self, target: ShardModel) -> None:
        """Copy the KV of the tokens the model already ran from the model itself (every layer, in
        this process, a pool of the same layout: the draft is its own weights in another format)
        rather than run them: a prompt costs the draft no prefill, an accepted draft no catch-up,
        and the drafts attend over the model's exact KV. Drafts only ever save time, so this
        changes speed, never output."""
        mine, theirs = self.shard.kv.data, target.kv.data
        if (mine.dtype, mine.device, mine.shape[:3], mine.shape[4:]) == (theirs.dtype, theirs.device, theirs.shape[:3],
                                                                          theirs.shape[4:]):
            self.target = target

    def propose(self, wanted: list[Wanted]) -> list[list[int]]:
        context = self.shard.spec.context_length  # (a smaller draft model's may be shorter)
        wanted = [(seq_id, tokens, min(count, context - len(tokens))) for seq_id, tokens, count in wanted]
        feeds = [self._catch_up(seq_id, tokens) if count > 0 else [] for seq_id, tokens, count in wanted]
        drafts: list[list[int]] = [[] for _ in wanted]
        active = [i for i, (_, _, count) in enumerate(wanted) if count > 0]
        while active:
            picks = self._forward([wanted[i][0] for i in active], [feeds[i] for i in active])
            for i, token in zip(active, picks, strict=True):
                self.seen[wanted[i][0]] += feeds[i]
                drafts[i].append(token)
                feeds[i] = [token]
            active = [i for i in active if len(drafts[i]) < wanted[i][2]]
        return drafts

    def release(self, seq_id: int) -> None:
        if self.seen.pop(seq_id, None) is not None:
            self.shard.free(seq_id)

    def _catch_up(self, seq_id: int, tokens: list[int]) -> list[int]:
        """The tokens to run for a sequence: those past what its KV holds that still agrees
        (at least its last, whose logits give the first draft)."""
        seen = self.seen.get(seq_id)
        if seen is None:
            self.shard.allocate(seq_id)
            seen = self.seen[seq_id] = []
        keep = min(len(seen), len(tokens))
        if seen[:keep] != tokens[:keep]:  # (rare: the common case compares at C speed)
            keep = next(i for i, (a, b) in enumerate(zip(seen, tokens, strict=False)) if a != b)
        keep = min(keep, len(tokens) - 1)
        self.shard.kv.rewind(seq_id, keep)
        del seen[keep:]
        copied = self._copy(seq_id, keep, len(tokens) - 1)
        seen += tokens[keep:keep + copied]
        return tokens[keep + copied:]

    def _copy(self, seq_id: int, start: int, end: int) -> int:
        """Copy what the model holds of positions [start, end) of a sequence into the draft's KV
        (follow); how many positions were copied."""
        if self.target is None or seq_id not in self.target.kv:
            return 0
        source, kv = self.target.kv, self.shard.kv
        end = min(end, source.length(seq_id))
        if end <= start:
            return 0
        kv.reserve(seq_id, end - start)
        rows = source.data.index_select(3, source.slots(seq_id, start, end).to(source.data.device))
        kv.data.index_copy_(3, kv.slots(seq_id, start, end).to(kv.data.device), rows)
        kv.advance(seq_id, end - start)
        return end - start

    def _forward(self, seq_ids: list[int], feeds: list[list[int]]) -> list[int]:
        """Each sequence's most likely next token after its feed."""
        short = [len(f) <= self.SHORT for f in feeds]
        logits = self.shard.forward(seq_ids, [len(f) for f in feeds], torch.tensor([t for f in feeds for t in f]),
                                    verify=short)
        rows = [len(f) if s else 1 for f, s in zip(feeds, short, strict=True)]
        last = [end - 1 for end in itertools.accumulate(rows)]
        return logits[last].argmax(-1).tolist()


def next_gamma(gamma: int, drafted: int, accepted: int, limit: int) -> int:
    """A sequence's next draft length: one more after every draft was accepted, else just past
    what was (a sequence whose drafts keep failing drafts one token at a time)."""
    return min(gamma + 1, limit) if accepted == drafted else max(accepted + 1, 1)
