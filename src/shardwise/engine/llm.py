"""LLM: the Python API, shaped like vLLM's (generate, chat, stream, close).

Requests become sequences; each step packs the running decodes (one token each)
and then chunks of waiting prompts into one batch under a token budget, so a long
prompt is prefilled in pieces and never blocks the sequences already decoding.
On a pipeline of S stages the running sequences form S micro-batches, each with a
step in flight, so that every stage has work.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardwise.cluster.plan import Plan
from shardwise.engine.executor import LocalExecutor
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.shard import ShardModel
from shardwise.engine.worker import Worker
from shardwise.errors import ShardwiseError
from shardwise.model.registry import DEFAULT_MODEL, resolve
from shardwise.model.tokenizer import Detokenizer, Tokenizer
from shardwise.model.weights import open_weights

Prompt = str | list[int]
Messages = list[dict[str, Any]]


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" once finished
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.finish_time is None or self.first_token_time is None or len(self.token_ids) < 2:
            return None
        return (len(self.token_ids) - 1) / max(self.finish_time - self.first_token_time, 1e-9)


class _Sequence:
    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer):
        self.id, self.prompt, self.params = seq_id, prompt_ids, params
        self.fed = 0  # tokens already run through the model
        self.detok = Detokenizer(tokenizer, params.stop)
        self.output = RequestOutput(seq_id, prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.fed >= len(self.prompt)

    def next_chunk(self, budget: int) -> list[int]:
        if self.prefilled:
            return [self.output.token_ids[-1]]
        return self.prompt[self.fed : self.fed + budget]


class LLM:
    """stages=N or plan=Plan / "plan.json" run the model as a pipeline of Ray actors (address:
    an existing Ray cluster, e.g. "auto"; micro_batches: steps kept in flight, by default one
    per compute resource the stages occupy); otherwise it runs in this process on `device`."""

    def __init__(self, model: str = DEFAULT_MODEL, *, stages: int | None = None, plan: Plan | str | None = None,
                 address: str | None = None, micro_batches: int | None = None, device: str = "cpu",
                 dtype: str | None = None, threads: int | None = None, max_num_seqs: int = 32,
                 max_batch_tokens: int = 512):
        if threads:
            torch.set_num_threads(threads)
        path = resolve(model)
        weights = open_weights(path)
        self.spec = weights.spec
        self.tokenizer = Tokenizer(path, weights.eos_token_ids())
        if plan is not None and stages is not None:
            raise ShardwiseError("give either stages or plan, not both")
        if isinstance(plan, str | Path):
            plan = Plan.load(plan)
        if plan is None and (stages is not None or address is not None):
            plan = Plan.even(self.spec, stages or 1, device=device)
        if plan is None:
            self.executor = LocalExecutor(Worker(ShardModel(self.spec, weights=weights, device=device, dtype=dtype)))
        else:
            from shardwise.cluster.pipeline import Pipeline  # Ray is imported only for pipelines

            self.executor = Pipeline(path, self.spec, plan, dtype=dtype, address=address, micro_batches=micro_batches)
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max(max_batch_tokens, max_num_seqs)
        self._ids = itertools.count()

    # --- public API ---------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._complete([self._prompt_ids(p) for p in prompts], params)

    def chat(self, messages: Messages | list[Messages],
             params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Answer one conversation, or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self._complete([self.tokenizer.apply_chat_template(c) for c in conversations], params)

    def stream(self, prompt: Prompt | Messages, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces as tokens arrive (a list of messages goes through the chat template)."""
        for piece, _ in self.stream_outputs(prompt, params):
            if piece:
                yield piece

    def stream_outputs(self, prompt: Prompt | Messages,
                       params: SamplingParams | None = None) -> Iterator[tuple[str, RequestOutput]]:
        """Like stream, with the request's output (token ids, timings) beside each piece."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            ids = self.tokenizer.apply_chat_template(prompt)
        else:
            ids = self._prompt_ids(prompt)
        seq = self._sequence(ids, params or SamplingParams())
        for _, piece in self._run([seq]):
            yield piece, seq.output

    def close(self) -> None:
        """Release the model; a pipeline's stage actors are killed."""
        if self.executor is not None:
            self.executor.close()
            self.executor = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the step loop ------------------------------------------------------------------------
    def _complete(self, prompt_ids: list[list[int]], params) -> list[RequestOutput]:
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise ShardwiseError(f"{len(prompt_ids)} prompts but {len(params)} SamplingParams: give one or one each")
        seqs = [self._sequence(ids, p) for ids, p in zip(prompt_ids, params, strict=True)]
        for _ in self._run(seqs):
            pass
        return [s.output for s in seqs]

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            if any(not 0 <= t < self.spec.vocab_size for t in prompt):
                raise ShardwiseError(f"prompt token ids must lie in [0, {self.spec.vocab_size})")
            return list(prompt)
        raise ShardwiseError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _sequence(self, prompt_ids: list[int], params: SamplingParams) -> _Sequence:
        if self.executor is None:
            raise ShardwiseError("this LLM is closed: create a new one")
        if not prompt_ids:
            raise ShardwiseError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.spec.context_length:
            raise ShardwiseError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                f"{self.spec.context_length}: shorten the prompt"
            )
        return _Sequence(next(self._ids), prompt_ids, params, self.tokenizer)

    def _run(self, seqs: list[_Sequence]) -> Iterator[tuple[_Sequence, str]]:
        """Step until every sequence finishes, yielding (sequence, new text) as tokens arrive."""
        executor = self.executor
        waiting = deque(seqs)
        groups: list[list[_Sequence]] = [[] for _ in range(executor.parallelism)]  # micro-batches
        in_flight: list[tuple[Any, int, list[tuple[_Sequence, list[int]]]]] = []  # (handle, group, batch)
        try:
            while waiting or any(groups):
                while waiting and sum(map(len, groups)) < self.max_num_seqs:
                    seq = waiting.popleft()
                    executor.add(seq.id, seq.params)
                    min(groups, key=len).append(seq)  # joins its group's next step
                busy = {g for _, g, _ in in_flight}
                for g, group in enumerate(groups):
                    if g not in busy and group:
                        batch = self._schedule(group)
                        handle = executor.submit([s.id for s, _ in batch], [c for _, c in batch],
                                                 [s.fed + len(c) >= len(s.prompt) for s, c in batch])
                        in_flight.append((handle, g, batch))
                handle, g, batch = in_flight.pop(executor.wait([h for h, _, _ in in_flight]))
                for (seq, chunk), token in zip(batch, executor.result(handle), strict=True):
                    seq.fed += len(chunk)
                    if token is None:
                        continue
                    piece = self._append(seq, token)
                    if seq.output.finished:
                        executor.free(seq.id)
                        groups[g].remove(seq)
                    yield seq, piece
        finally:  # an error or an abandoned stream must not leak KV
            if self.executor is not None:
                for group in groups:
                    for seq in group:
                        executor.free(seq.id)

    def _schedule(self, running: list[_Sequence]) -> list[tuple[_Sequence, list[int]]]:
        """Decodes first (one token each), then prompt chunks while the token budget lasts."""
        batch = [(s, s.next_chunk(1)) for s in running if s.prefilled]
        budget = self.max_batch_tokens - len(batch)
        for seq in running:
            if not seq.prefilled and budget > 0:
                chunk = seq.next_chunk(budget)
                batch.append((seq, chunk))
                budget -= len(chunk)
        return batch

    def _append(self, seq: _Sequence, token: int) -> str:
        out, params = seq.output, seq.params
        now = time.perf_counter()
        out.first_token_time = out.first_token_time or now
        out.token_ids.append(token)
        is_eos = token in self.tokenizer.eos_token_ids and not params.ignore_eos
        piece = "" if is_eos else seq.detok.add(token)
        if is_eos or token in params.stop_token_ids or seq.detok.stopped:
            out.finish_reason = "stop"
        elif len(out.token_ids) >= params.max_tokens or seq.fed + 1 >= self.spec.context_length:
            out.finish_reason = "length"
        if out.finished:
            piece += seq.detok.finish()
            out.finish_time = now
        out.text = seq.detok.text
        return piece

