"""Worker: a ShardModel plus, when it holds the last layers, the samplers.

It is the unit of execution: the one-process engine runs one Worker with every
layer, and each pipeline stage wraps one Worker with its slice. Only the last
worker turns logits into token ids, so logits never leave it.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any, NamedTuple

import psutil
import torch

from shardwise.engine.prefix_cache import CachedPrefix
from shardwise.engine.sampling import SamplingParams, SequenceSampler, TokenLogprobs, sample_batch, token_logprobs
from shardwise.engine.shard import ShardModel
from shardwise.engine.structured import Grammars, allocate_masks, apply_masks
from shardwise.errors import ShardwiseError

log = logging.getLogger("shardwise.engine")


class Sampled(NamedTuple):
    """What the last worker returns for a step: one token id per sequence (None where it did not
    sample), log-probabilities by row for the sequences that asked for them, and by row the
    error of any sequence whose sampling failed (that sequence alone fails; the others go on).
    A pipeline adds each stage's seconds of compute for the step, first stage first."""

    tokens: list[int | None]
    logprobs: dict[int, TokenLogprobs]
    errors: dict[int, str]
    stage_seconds: tuple[float, ...] = ()
    more: dict[int, list[int]] | None = None  # by row, the tokens after tokens[row] a speculative step gave


class Moving(NamedTuple):
    """A sequence leaving a worker for a new split of the layers: its KV for the worker's layers
    (the first of them `first_layer`) and, from the last worker, its sampler."""

    first_layer: int
    kv: torch.Tensor  # [layers, 2, kv_heads, length, head_dim]
    sampler: SequenceSampler | None


class Worker:
    """grammars: compiles the constraints of structured output at the last worker (None: a
    constrained sequence is refused)."""

    def __init__(self, shard: ShardModel, grammars: Grammars | None = None):
        self.shard, self.grammars = shard, grammars
        self.samplers: dict[int, SequenceSampler] = {}
        self.steps, self.busy_s, self.last_step_s = 0, 0.0, 0.0  # time in step(), for the dashboard

    def add(self, seq_id: int, params: SamplingParams, generated: list[int] = (),
            prefix: CachedPrefix | None = None) -> None:
        """generated: the tokens it already produced, when it comes back after a lost stage.
        prefix: the cached blocks it starts with."""
        grammar = None
        if self.shard.is_last and params.constraint is not None:
            if self.grammars is None:
                raise ShardwiseError("structured output is not available here: run the model in this process "
                                     "or as a Ray pipeline")
            grammar = self.grammars.follow(params.constraint, generated)
        self.shard.allocate(seq_id, prefix.keys if prefix else ())
        if self.shard.is_last:
            self.samplers[seq_id] = SequenceSampler(params, generated, grammar)
            if prefix:
                self.samplers[seq_id].observe(prefix.tokens)

    def keep(self, seq_id: int, first: int, keys: list[bytes]) -> None:
        """Keep a sequence's full blocks from block `first` on, under these keys (prefix caching)."""
        self.shard.kv.keep(seq_id, first, keys)

    def evict(self, keys: list[bytes]) -> None:
        self.shard.kv.evict(keys)

    def free(self, seq_id: int) -> None:
        self.shard.free(seq_id)
        self.samplers.pop(seq_id, None)

    def rewind(self, seq_id: int, length: int) -> None:
        """Keep only the first `length` positions of a sequence's KV (after a step that failed)."""
        if seq_id in self.shard.kv:
            self.shard.kv.rewind(seq_id, length)

    def reset(self) -> None:
        """Drop every sequence and kept block (a pipeline rebuilding its KV after a lost stage)."""
        for seq_id in self.shard.kv.sequences():
            self.free(seq_id)
        self.evict(self.shard.kv.kept_keys())

    def export(self, seq_ids: list[int], heads: tuple[int, ...] | None = None) -> dict[int, Moving]:
        """The state of these sequences, for workers holding the same layers split anew. heads:
        which of the model's key/value heads this worker holds, where its KV is to go among all
        of them (KVCache.extract)."""
        return {seq_id: Moving(self.shard.start, self.shard.kv.extract(seq_id, heads, self.shard.spec.num_kv_heads),
                               self.samplers.get(seq_id))
                for seq_id in seq_ids}

    def adopt(self, *exports: dict[int, Moving]) -> None:
        """Take in the sequences that workers of the old split exported (each export covering
        some layers): each gets its KV for this worker's layers and, here at the last, its sampler."""
        start, end = self.shard.start, self.shard.end
        arriving = exports[0] if exports else {}
        self.shard.kv.make_room([m.kv.shape[3] for m in arriving.values()])
        for seq_id in arriving:
            parts = [e[seq_id] for e in exports]
            self.shard.kv.insert(seq_id, [
                (max(m.first_layer, start) - start, m.kv[max(start - m.first_layer, 0):end - m.first_layer])
                for m in parts if m.first_layer < end and m.first_layer + len(m.kv) > start])
            if self.shard.is_last:
                self.samplers[seq_id] = next(m.sampler for m in parts if m.sampler is not None)

    def step(self, seq_ids: list[int], chunks: list[list[int]], sample: list[int],
             hidden: torch.Tensor | None = None) -> torch.Tensor | Sampled:
        """Run one packed step. chunks: each sequence's new token ids (the first worker embeds
        them; the last one feeds them to the penalties). sample: for each sequence, 0 where it
        needs no token this step (its prompt is not complete), 1 where it needs one (True and
        False do), and n > 1 where its chunk ends in n - 1 drafted tokens to verify (speculative
        decoding). Returns hidden states, or at the last worker what it Sampled."""
        started = time.perf_counter()
        try:
            return self._step(seq_ids, chunks, sample, hidden)
        finally:
            self.last_step_s = time.perf_counter() - started
            self.busy_s += self.last_step_s
            self.steps += 1

    def _step(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool],
              hidden: torch.Tensor | None) -> torch.Tensor | Sampled:
        lengths = [len(c) for c in chunks]
        inputs = torch.tensor([t for c in chunks for t in c]) if self.shard.is_first else hidden
        verify = [n > 1 for n in sample]
        out = self.shard.forward(seq_ids, lengths, inputs, verify=verify)
        if not self.shard.is_last:
            return out
        for seq_id, chunk in zip(seq_ids, chunks, strict=True):
            self.samplers[seq_id].observe(chunk)
        tokens: list[int | None] = [None] * len(seq_ids)
        errors: dict[int, str] = {}
        more: dict[int, list[int]] = {}
        if any(verify):  # each verified sequence's rows out, the others' one row kept
            heads = [len(c) if v else 1 for c, v in zip(chunks, verify, strict=True)]
            ends = list(itertools.accumulate(heads))
            for i in (i for i, v in enumerate(verify) if v):
                self._verify(i, seq_ids[i], out[ends[i] - heads[i]:ends[i]], chunks[i][1:], tokens, more, errors)
            out = out[[end - 1 for end in ends]]
        rows = [i for i, n in enumerate(sample) if n == 1]
        if not rows:
            return Sampled(tokens, {}, errors, more=more)
        samplers = [self.samplers[seq_ids[i]] for i in rows]
        masks = self._grammar_masks(rows, samplers, errors)  # on a GPU, while the forward's kernels run
        raw = out if len(rows) == len(out) else out[rows]  # no copy if all
        logits = raw
        if masks is not None:  # logprobs stay the model's own (vLLM's raw logprobs)
            logits = raw.clone()
            apply_masks(logits, *masks)
        picked = sample_batch(logits, samplers)
        logprobs: dict[int, TokenLogprobs] = {}
        for i, token, sampler, row in zip(rows, picked, samplers, raw, strict=True):
            if i in errors:  # its grammar failed
                continue
            try:
                if isinstance(token, Exception):
                    raise token
                if sampler.params.logprobs is not None:
                    logprobs[i] = token_logprobs(row, token, sampler.params.logprobs)
                tokens[i] = token
            except Exception as e:  # this request's alone: its neighbours keep their tokens
                log.warning("sampling failed for sequence %d: %s", seq_ids[i], e)
                errors[i] = f"sampling failed for this request ({type(e).__name__}: {e})"
        return Sampled(tokens, logprobs, errors, more=more)

    def _verify(self, row: int, seq_id: int, logits: torch.Tensor, drafts: list[int], tokens: list[int | None],
                more: dict[int, list[int]], errors: dict[int, str]) -> None:
        """One sequence's drafts checked against the model's logits at their positions."""
        try:
            accepted = self.samplers[seq_id].verify(logits, drafts)
        except Exception as e:  # this request's alone
            log.warning("verifying drafts failed for sequence %d: %s", seq_id, e)
            errors[row] = f"sampling failed for this request ({type(e).__name__}: {e})"
            return
        tokens[row], more[row] = accepted[0], accepted[1:]

    def _grammar_masks(self, rows: list[int], samplers: list[SequenceSampler],
                       errors: dict[int, str]) -> tuple[torch.Tensor, list[int]] | None:
        """The token masks of the constrained sequences among those sampling (and the positions
        of their rows among the sampled logits); a sequence whose grammar fails is noted in errors."""
        constrained = [j for j, s in enumerate(samplers) if s.grammar is not None]
        if not constrained:
            return None
        masks = allocate_masks(len(rows), self.shard.spec.vocab_size)
        for j in constrained:
            try:
                samplers[j].grammar.fill(masks, j)
            except Exception as e:
                log.warning("grammar failed for sequence row %d: %s", rows[j], e)
                errors[rows[j]] = f"structured output failed for this request ({e})"
        return masks, constrained

    def stats(self) -> dict[str, Any]:
        """What this worker holds and how busy it is: layers, memory, KV and step times."""
        shard, kv = self.shard, self.shard.kv
        return {"layers": [shard.start, shard.end], "device": str(shard.device), "dtype": shard.weight_dtype,
                "pid": os.getpid(), "weight_bytes": shard.weight_bytes(), "kv_pool_bytes": kv.nbytes,
                "kv_blocks_in_use": kv.blocks_in_use, "kv_blocks_kept": kv.blocks_kept, "sequences": len(kv),
                "steps": self.steps, "busy_s": self.busy_s, "last_step_s": self.last_step_s,
                **device_memory(shard.device)}


def device_memory(device: torch.device) -> dict[str, int]:
    """This process's memory on the device, and the device's total and free memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"memory_used_bytes": torch.cuda.memory_reserved(device), "memory_total_bytes": total,
                "memory_available_bytes": free}
    host = psutil.virtual_memory()
    return {"memory_used_bytes": psutil.Process().memory_info().rss, "memory_total_bytes": host.total,
            "memory_available_bytes": host.available}
