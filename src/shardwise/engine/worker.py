"""Worker: a ShardModel plus, when it holds the last layers, the samplers.

It is the unit of execution: the one-process engine runs one Worker with every
layer, and each pipeline stage wraps one Worker with its slice. Only the last
worker turns logits into token ids, so logits never leave it.
"""

from __future__ import annotations

import torch

from shardwise.engine.sampling import SamplingParams, SequenceSampler, TokenLogprobs, sample_batch, token_logprobs
from shardwise.engine.shard import ShardModel

# What the last worker returns for a step: one token id per sequence (None where it did not
# sample), and log-probabilities by row for the sequences that asked for them.
Sampled = tuple[list[int | None], dict[int, TokenLogprobs]]


class Worker:
    def __init__(self, shard: ShardModel):
        self.shard = shard
        self.samplers: dict[int, SequenceSampler] = {}

    def add(self, seq_id: int, params: SamplingParams, generated: list[int] = ()) -> None:
        """generated: the tokens it already produced, when it comes back after a lost stage."""
        self.shard.allocate(seq_id)
        if self.shard.is_last:
            self.samplers[seq_id] = SequenceSampler(params, generated)

    def free(self, seq_id: int) -> None:
        self.shard.free(seq_id)
        self.samplers.pop(seq_id, None)

    def reset(self) -> None:
        """Drop every sequence (a pipeline rebuilding its KV after a lost stage)."""
        for seq_id in self.shard.kv.sequences():
            self.free(seq_id)

    def step(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool],
             hidden: torch.Tensor | None = None) -> torch.Tensor | Sampled:
        """Run one packed step. chunks: each sequence's new token ids (the first worker embeds
        them; the last one feeds them to the penalties). sample: which sequences need a token
        this step (those whose prompt is complete). Returns hidden states, or at the last
        worker what it Sampled."""
        lengths = [len(c) for c in chunks]
        inputs = torch.tensor([t for c in chunks for t in c]) if self.shard.is_first else hidden
        out = self.shard.forward(seq_ids, lengths, inputs)
        if not self.shard.is_last:
            return out
        for seq_id, chunk in zip(seq_ids, chunks, strict=True):
            self.samplers[seq_id].observe(chunk)
        rows = [i for i, wanted in enumerate(sample) if wanted]
        tokens: list[int | None] = [None] * len(seq_ids)
        logprobs: dict[int, TokenLogprobs] = {}
        if rows:
            samplers = [self.samplers[seq_ids[i]] for i in rows]
            picked = sample_batch(out[rows], samplers)
            for i, token, sampler in zip(rows, picked, samplers, strict=True):
                tokens[i] = token
                if sampler.params.logprobs is not None:
                    logprobs[i] = token_logprobs(out[i], token, sampler.params.logprobs)
        return tokens, logprobs
