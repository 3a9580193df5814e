"""LLM: the Python API, shaped like vLLM's (generate, chat, stream, close).

Requests become sequences that the Scheduler steps with continuous batching and
chunked prefill, in this process or over a pipeline of Ray stages.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shardwise.cluster.plan import DEFAULT_KV_TOKENS, STAGE_TIMEOUT_S, Plan
from shardwise.engine.executor import LocalExecutor
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.scheduler import RequestOutput, Scheduler, Sequence
from shardwise.engine.shard import ShardModel
from shardwise.engine.worker import Worker
from shardwise.errors import ShardwiseError
from shardwise.model.registry import DEFAULT_MODEL, resolve
from shardwise.model.spec import require_supported
from shardwise.model.tokenizer import Tokenizer
from shardwise.model.weights import Weights, open_weights

if TYPE_CHECKING:
    from shardwise.planner.cluster import Cluster

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """stages=N or plan=Plan / "plan.json" run the model as a pipeline of Ray actors (address:
    an existing Ray cluster, e.g. "auto"; micro_batches: steps kept in flight, by default one
    per compute resource the stages occupy); otherwise it runs in this process on `device`.
    max_num_seqs sequences run at once, each step holds at most max_batch_tokens tokens, and
    kv_tokens is the KV cache (in tokens) that running sequences may reserve; the rest queue.
    A pipeline stage that dies or answers nothing for stage_timeout seconds is replaced and
    the running sequences replayed: generation pauses, and carries on unchanged. spare_stages
    keeps a warm empty stage process on each node, so that the replacement only loads layers.
    cluster (a cluster file or Cluster, as `shardwise plan` reads) lets the planner place the
    stages by `objective` (latency or throughput) unless a plan is given, and is what the
    model is split over anew when a node dies (without one: the surviving Ray nodes)."""

    def __init__(self, model: str = DEFAULT_MODEL, *, stages: int | None = None, plan: Plan | str | None = None,
                 address: str | None = None, micro_batches: int | None = None, device: str = "cpu",
                 dtype: str | None = None, threads: int | None = None, max_num_seqs: int = 32,
                 max_batch_tokens: int = 512, kv_tokens: int = DEFAULT_KV_TOKENS,
                 stage_timeout: float = STAGE_TIMEOUT_S, spare_stages: bool = False,
                 cluster: Cluster | str | None = None, objective: str = "throughput"):
        if threads:
            torch.set_num_threads(threads)
        weights = self._open(model)
        if stages is not None and (plan is not None or cluster is not None):
            raise ShardwiseError("give stages, or a plan and/or a cluster, not both")
        if isinstance(plan, str | Path):
            plan = Plan.load(plan)
        if cluster is not None:
            from shardwise.planner.cluster import Cluster, plan_cluster

            cluster = Cluster.load(cluster) if isinstance(cluster, str | Path) else cluster
            if plan is None:
                plan, _ = plan_cluster(self.spec, cluster, objective, quant=dtype, kv_tokens=kv_tokens)
        if plan is None and (stages is not None or address is not None):
            plan = Plan.even(self.spec, stages or 1, device=device)
        if plan is None:
            self.executor = LocalExecutor(Worker(ShardModel(self.spec, weights=weights, device=device, dtype=dtype)))
        else:
            from shardwise.cluster.pipeline import Pipeline  # Ray is imported only for pipelines

            self.executor = Pipeline(self.path, self.spec, plan, dtype=dtype, address=address, kv_tokens=kv_tokens,
                                     micro_batches=micro_batches, stage_timeout=stage_timeout, spares=spare_stages,
                                     cluster=cluster, objective=objective)
        self.scheduler = Scheduler(self.executor, self.spec, self.tokenizer, max_num_seqs=max_num_seqs,
                                   max_batch_tokens=max_batch_tokens, kv_capacity=kv_tokens)
        self._ids = itertools.count()

    def _open(self, model: str) -> Weights:
        """Find and open the model: its path, spec, tokenizer and the name a server calls it by."""
        self.path = resolve(model)
        weights = open_weights(self.path)
        self.spec = weights.spec
        require_supported(self.spec)  # here, not first inside a Ray stage
        self.tokenizer = Tokenizer(self.path, weights.eos_token_ids())
        self.name = self.path.stem if Path(model).exists() else str(model)
        return weights

    # --- public API ---------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._complete([self.prompt_ids(p) for p in prompts], params)

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
            ids = self.prompt_ids(prompt)
        seq = self.new_sequence(ids, params or SamplingParams())
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
        seqs = [self.new_sequence(ids, p) for ids, p in zip(prompt_ids, params, strict=True)]
        for _ in self._run(seqs):
            pass
        return [s.output for s in seqs]

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, or the given ids once checked against the vocabulary."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            if any(not 0 <= t < self.spec.vocab_size for t in prompt):
                raise ShardwiseError(f"prompt token ids must lie in [0, {self.spec.vocab_size})")
            return list(prompt)
        raise ShardwiseError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def stages(self) -> list[dict[str, Any]]:
        """Where each pipeline stage runs now (layers, Ray node, process id); [] in one process."""
        return self.executor.describe()

    def stage_stats(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Each stage's (one, in one process) layers, node, memory, KV and step times."""
        return self.executor.stats(timeout)

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """A sequence for the scheduler (the server adds it from its engine thread)."""
        if self.executor is None:
            raise ShardwiseError("this LLM is closed: create a new one")
        return self.scheduler.make_sequence(next(self._ids), prompt_ids, params)

    def _run(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, str]]:
        """Step until every sequence finishes, yielding (sequence, new text) as tokens arrive."""
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            while not all(s.output.finished for s in seqs):
                yield from self.scheduler.step()
        except Exception:
            if self.executor is not None:
                self.scheduler.release_all()  # an error must not leak KV
            raise
        finally:  # an abandoned stream frees its sequences
            for seq in seqs:
                self.scheduler.abort(seq)
