"""LLM: the Python API, shaped like vLLM's (generate, chat, stream, close), and the composition
root: it opens the model, builds the executor a factory describes (in this process, a pipeline of
Ray stages, or a collaborative session with a server) and steps requests through the Scheduler
with continuous batching and chunked prefill. The server and the collaborative client are faces
over this one class.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shardwise.cluster.membership import credentials_for
from shardwise.config import EngineConfig
from shardwise.engine.executor import LocalExecutor
from shardwise.engine.policy import make_policy
from shardwise.engine.prefix_cache import PrefixCache
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.scheduler import RequestOutput, Scheduler, Sequence
from shardwise.engine.shard import WEIGHT_DTYPES, ShardModel, default_dtype, resolve_device
from shardwise.engine.speculative import Drafter, ModelDrafter, NgramDrafter
from shardwise.engine.structured import model_grammars
from shardwise.engine.worker import Worker
from shardwise.errors import ShardwiseError
from shardwise.model.registry import DEFAULT_MODEL, resolve
from shardwise.model.spec import require_supported
from shardwise.model.tokenizer import Tokenizer
from shardwise.model.weights import Weights, open_weights
from shardwise.planner.plan import Plan

if TYPE_CHECKING:
    from shardwise.planner.topology import Cluster

Prompt = str | list[int]
Messages = list[dict[str, Any]]
ExecutorFactory = Callable[["LLM"], Any]  # the facade, its model opened -> the executor that runs it


def in_process(llm: LLM) -> LocalExecutor:
    """Every layer in this process, on config.device."""
    c = llm.config
    shard = ShardModel(llm.spec, weights=llm.weights, device=c.device, dtype=c.dtype)
    if c.preallocate_kv:
        shard.kv.hold_at_least(c.kv_tokens)
    return LocalExecutor(Worker(shard, llm.grammars))


def ray_pipeline(stages: int | None = None, plan: Plan | str | Path | None = None, address: str | None = None,
                 cluster: Cluster | str | Path | None = None, objective: str = "throughput",
                 prefill: int | Plan | str | Path | None = None,
                 tensor_parallel: int | None = None) -> ExecutorFactory:
    """A pipeline of Ray stage actors: stages=N splits the layers evenly, plan= places them as
    a plan says, cluster= (a cluster file or Cluster) lets the planner place them by objective
    and is what the model is split over anew when a node dies; address: an existing Ray
    cluster (e.g. "auto"), else a local Ray of our own. prefill: a second pipeline (N even local
    stages, or a plan) that runs the long prompts while the first decodes (disaggregated
    prefill; see cluster/disaggregated.py). tensor_parallel: each of the N stages' layers split
    among that many local devices (a plan names its devices itself)."""
    if stages is not None and (plan is not None or cluster is not None):
        raise ShardwiseError("give stages, or a plan and/or a cluster, not both")
    if tensor_parallel is not None and (plan is not None or cluster is not None):
        raise ShardwiseError("a plan names each stage's tensor-parallel devices itself (\"devices\"): "
                             "give tensor_parallel with stages only")
    credentials_for(address)  # (a cluster this machine cannot join says so now, not after the model loads)

    def build(llm: LLM):
        from shardwise.cluster.pipeline import Pipeline  # Ray is imported only for pipelines
        from shardwise.planner.topology import Cluster, plan_cluster, planning_batch

        c, chosen, where = llm.config, plan, cluster
        batch = planning_batch(objective, running=c.max_num_seqs)
        if where is not None:
            where = Cluster.load(where) if isinstance(where, str | Path) else where
            if chosen is None:
                chosen, _ = plan_cluster(llm.spec, where, objective, batch=batch, quant=c.dtype, kv_tokens=c.kv_tokens)
        pools = [_plan_of(llm, stages if chosen is None else chosen)]
        if tensor_parallel is not None:
            pools[0] = pools[0].tensor_parallel(tensor_parallel)
        if prefill is not None:
            pools.append(_plan_of(llm, prefill))
        for pool in pools:
            pool.check_layers(llm.spec)  # both bad or good before either starts
        pipelines = []
        try:
            for pool in pools:  # (the decode pool first: it starts Ray, and closes it last)
                pipelines.append(Pipeline(
                    llm.path, llm.spec, pool, dtype=c.dtype, address=address, kv_tokens=c.kv_tokens,
                    micro_batches=c.micro_batches, stage_timeout=c.stage_timeout, spares=c.spare_stages,
                    cluster=None if prefill is not None else where, objective=objective, batch=batch,
                    drift_threshold=c.drift_threshold, drift_window_s=c.drift_window_s, move_kv=c.move_kv,
                    preallocate_kv=c.preallocate_kv, join_nodes=c.join_nodes, fetch_weights=c.fetch_weights,
                    weights_index=c.weights_index, verify_share=c.verify_share))
        except BaseException:
            for pipeline in reversed(pipelines):
                pipeline.close()
            raise
        if prefill is None:
            return pipelines[0]
        from shardwise.cluster.disaggregated import Disaggregated

        return Disaggregated(prefill=pipelines[1], decode=pipelines[0])

    return build


def _plan_of(llm: LLM, plan: int | Plan | dict | str | Path | None) -> Plan:
    """A plan (or its file, or its JSON as a dict), or N even stages on the local node (None: one)."""
    if isinstance(plan, str | Path):
        return Plan.load(plan)
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if isinstance(plan, Plan):
        return plan
    if plan is not None and (type(plan) is not int or plan < 1):
        raise ShardwiseError(f"a number of stages must be a positive integer, got {plan!r}")
    return Plan.even(llm.spec, plan or 1, device=llm.config.device)


class LLM:
    """model: a catalog name, .gguf file or HF model directory. Where it runs: in this process
    by default; stages / plan / cluster / address (see ray_pipeline) run it as a pipeline of Ray
    stages, where a stage that dies or hangs is replaced and the running sequences replayed
    (generation pauses and carries on unchanged); tensor_parallel=N splits each of those stages
    among N local devices; prefill (N local stages or a plan) adds a second
    pipeline that runs the long prompts (disaggregated prefill); executor= takes any factory instead (e.g.
    shardwise.collab.client.collaborative). config: the runtime options (EngineConfig); keyword
    options override its fields, e.g. LLM(dtype="int4", kv_tokens=4096)."""

    def __init__(self, model: str = DEFAULT_MODEL, *, stages: int | None = None, plan: Plan | str | None = None,
                 address: str | None = None, cluster: Cluster | str | None = None, objective: str = "throughput",
                 prefill: int | Plan | str | None = None, tensor_parallel: int | None = None,
                 executor: ExecutorFactory | None = None, config: EngineConfig | None = None, **options: Any):
        self.config = (config or EngineConfig()).with_options(**options)
        placed = any(x is not None for x in (stages, plan, cluster, address, prefill, tensor_parallel))
        if executor is not None and placed:
            raise ShardwiseError("give an executor, or stages / plan / cluster / address / prefill / "
                                 "tensor_parallel, not both")
        if placed:
            executor = ray_pipeline(stages, plan, address, cluster, objective, prefill, tensor_parallel)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.executor = None
        self.weights = self._open(model)
        drafter = self._drafter()  # (a bad draft fails before any stage starts)
        self.executor = (executor or in_process)(self)
        target = self.local_shard()
        if isinstance(drafter, ModelDrafter) and self.config.speculative.draft in WEIGHT_DTYPES and target:
            drafter.follow(target)  # the model's own weights, beside the model itself
        caching = self.config.prefix_cache and getattr(self.executor, "prefix_caching", False)
        if self.config.speculative and not getattr(self.executor, "speculation", False):
            self.close()
            raise ShardwiseError("speculative decoding runs in one process or on a Ray pipeline, not in a "
                                 "collaborative session: leave out speculative")
        self.scheduler = Scheduler(self.executor, self.spec, self.tokenizer, max_num_seqs=self.config.max_num_seqs,
                                   max_batch_tokens=self.config.max_batch_tokens, kv_capacity=self.config.kv_tokens,
                                   prefix_cache=PrefixCache() if caching else None,
                                   policy=make_policy(self.config.policy), speculative=self.config.speculative,
                                   drafter=drafter, prefill_pool_min_tokens=self.config.prefill_pool_min_tokens)
        self._ids = itertools.count()
        self._token_text = functools.lru_cache(maxsize=65536)(lambda t: self.tokenizer.hf.decode([t]))

    def _open(self, model: str) -> Weights:
        """Find and open the model: its path, spec, tokenizer and the name a server calls it by."""
        self.path = resolve(model, self.config.weights_index)
        weights = open_weights(self.path)
        self.spec = weights.spec
        require_supported(self.spec)  # here, not first inside a Ray stage
        self.tokenizer = Tokenizer(self.path, weights.eos_token_ids())
        self.grammars = model_grammars(self.path, weights)
        self.name = self.path.stem if Path(model).exists() else str(model)
        return weights

    def _drafter(self) -> Drafter | None:
        """Speculative decoding's drafter, in this process: prompt lookup, this model's own
        weights in a cheaper format, or another model with the same vocabulary."""
        s, c = self.config.speculative, self.config
        if s is None:
            return None
        if s.draft == "ngram":
            return NgramDrafter(s)
        if s.draft in WEIGHT_DTYPES:
            if s.draft == (c.dtype or default_dtype(resolve_device(c.device))):
                raise ShardwiseError(f"the draft would be the model itself ({s.draft} weights): draft with a cheaper "
                                     "format (e.g. int4 for float32 weights), a smaller model, or ngram")
            weights, dtype = self.weights, s.draft
        else:
            try:
                weights, dtype = open_weights(resolve(s.draft)), None
            except ShardwiseError as e:
                raise ShardwiseError(f"unknown drafter '{s.draft}': use ngram, a weight format ("
                                     f"{', '.join(WEIGHT_DTYPES)}) or a model with the same vocabulary ({e})") from None
            if weights.spec.vocab_size != self.spec.vocab_size:
                raise ShardwiseError(f"the draft model '{s.draft}' has a vocabulary of {weights.spec.vocab_size} "
                                     f"tokens, the model {self.spec.vocab_size}: a draft model must share the "
                                     "model's tokenizer")
        return ModelDrafter(ShardModel(weights.spec, weights=weights, device=c.device, dtype=dtype))

    # --- public API ---------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 priority: int | list[int] = 0) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); outputs come back in prompt order.
        priority: each prompt's, or one for all (lower runs first, as vLLM's)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._complete([self.prompt_ids(p) for p in prompts], params, priority)

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | list[SamplingParams] | None = None,
             priority: int | list[int] = 0) -> list[RequestOutput]:
        """Answer one conversation, or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self._complete([self.chat_ids(c) for c in conversations], params, priority)

    def stream(self, prompt: Prompt | Messages, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces as tokens arrive (a list of messages goes through the chat template)."""
        for piece, _ in self.stream_outputs(prompt, params):
            if piece:
                yield piece

    def stream_outputs(self, prompt: Prompt | Messages,
                       params: SamplingParams | None = None) -> Iterator[tuple[str, RequestOutput]]:
        """Like stream, with the request's output (token ids, timings) beside each piece."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            ids = self.chat_ids(prompt)
        else:
            ids = self.prompt_ids(prompt)
        seq = self.new_sequence(ids, params or SamplingParams())
        for _, piece in self._run([seq]):
            yield piece, seq.output

    def move_to(self, plan: Plan | str | Path | dict) -> None:
        """Move a pipeline's stages to a new plan (a Plan, plan file or its JSON as a dict) while
        it serves: the new stages load beside the old, then the running sequences move with
        their KV (see Pipeline.migrate). A bad plan is a ShardwiseError, raised here."""
        move = getattr(self.executor, "move_to", None)
        if move is None:
            raise ShardwiseError("this engine runs in one process, not as a pipeline of stages: start it with "
                                 "stages, a plan or a cluster to move its layers")
        if not isinstance(plan, Plan):
            plan = Plan.load(plan) if isinstance(plan, str | Path) else Plan.from_dict(plan)
        move(plan, "an operator's new plan")

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
    def _complete(self, prompt_ids: list[list[int]], params, priority) -> list[RequestOutput]:
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompt_ids)
        if not isinstance(priority, list):
            priority = [priority] * len(prompt_ids)
        if not len(params) == len(priority) == len(prompt_ids):
            raise ShardwiseError(f"{len(prompt_ids)} prompts but {len(params)} SamplingParams and {len(priority)} "
                                 "priorities: give one or one each")
        seqs = [self.new_sequence(ids, p, q) for ids, p, q in zip(prompt_ids, params, priority, strict=True)]
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

    def chat_ids(self, messages: Messages, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation (and the tools it may call, for a template that renders
        them) through the model's chat template."""
        return self.tokenizer.apply_chat_template(messages, tools)

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (as logprobs report it)."""
        return self._token_text(token_id)

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, priority: int = 0) -> Sequence:
        """A sequence for the engine loop (the server adds it from its engine thread)."""
        if self.executor is None:
            raise ShardwiseError("this LLM is closed: create a new one")
        if params.constraint is not None:
            self.grammars.compile(params.constraint)  # an invalid one fails here, naming why
        return self.scheduler.make_sequence(next(self._ids), prompt_ids, params, priority)

    # --- the engine loop: one step at a time (generate / stream here, the server's engine thread) --
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it joins the running batch at a step when its KV fits."""
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (its client left); its KV is freed as soon as no step holds it."""
        self.scheduler.abort(seq)

    def step(self) -> list[tuple[Sequence, str]]:
        """One step: (sequence, new text) for each sequence that got a token, or failed (its
        output then has finish_reason "error"). An error nothing recovers from (no stage can
        replace a lost one) frees every running sequence's KV and is raised."""
        try:
            return self.scheduler.step()
        except Exception as e:
            self.scheduler.note("error", f"a step failed, the running requests with it: {e}")
            if self.executor is not None:
                self.scheduler.release_all()  # an error must not leak KV
            raise

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def expire_waiting(self, max_wait_s: float) -> list[Sequence]:
        """Take out (aborted) the sequences that waited longer than max_wait_s to start."""
        return self.scheduler.expire_waiting(max_wait_s)

    def release_all(self) -> None:
        """Drop every running and waiting sequence, freeing its KV."""
        self.scheduler.release_all()

    def load(self) -> EngineLoad:
        """What the engine holds now: sequences running and waiting, KV, losses, recoveries and
        re-plans, and each stage's predicted and measured step time (a pipeline with a cluster file)."""
        s, cache = self.scheduler, self.scheduler.prefix_cache
        cached = {} if cache is None else {"prefix_query_tokens": cache.query_tokens,
                                           "prefix_hit_tokens": cache.hit_tokens, "prefix_cached_blocks": cache.blocks}
        return EngineLoad(s.num_running, len(s.waiting), s.waiting[0].output.arrival_time if s.waiting else None,
                          s.kv_reserved, s.kv_capacity, s.stage_failures, s.recoveries, s.replayed_tokens,
                          s.last_recovery_s, s.replans, self.executor.timing(), s.preemptions,
                          spec_drafts=s.drafts, spec_draft_tokens=s.drafted_tokens,
                          spec_accepted_tokens=s.accepted_tokens, spec_draft_seconds=s.draft_s,
                          spec_verify_seconds=s.verify_s, prefill_handoffs=s.handoffs, **cached)

    def events(self) -> list[dict[str, Any]]:
        """The latest stage losses, recoveries and errors an operator should see."""
        return list(self.scheduler.events)

    def hold_kv(self, tokens: int) -> None:
        """Count `tokens` of KV held outside the engine's own sequences (a server's collaborative
        sessions) against the same budget: admission waits for them as for any sequence."""
        self.scheduler.external_kv = tokens

    def local_shard(self) -> ShardModel | None:
        """The in-process model (every layer), or None when the layers run elsewhere."""
        return getattr(self.executor, "shard", None)

    def _run(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, str]]:
        """Step until every sequence finishes, yielding (sequence, new text) as tokens arrive."""
        for seq in seqs:
            self.add(seq)
        try:
            while not all(s.output.finished for s in seqs):
                yield from self.step()
        finally:  # an abandoned stream frees its sequences
            for seq in seqs:
                self.abort(seq)


@dataclass(frozen=True)
class EngineLoad:
    running: int  # sequences in the running batch
    waiting: int  # sequences queued for admission
    oldest_arrival: float | None  # perf_counter() of the longest-waiting one
    kv_reserved: int  # KV tokens reserved (running sequences and held_kv)
    kv_capacity: int
    stage_failures: int
    recoveries: int
    replayed_tokens: int
    last_recovery_s: float
    replans: int  # moves to a new plan after a node's speed drifted
    stage_timing: list[tuple[float, float]]  # per stage: median predicted, measured step seconds (or [])
    preemptions: int = 0  # running sequences paused for higher-ranked ones (a preemptive policy)
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of them, found cached (not prefilled)
    prefix_cached_blocks: int = 0  # KV blocks the prefix cache holds
    spec_drafts: int = 0  # sequences' steps that verified drafts
    spec_draft_tokens: int = 0  # tokens drafted for speculative decoding
    spec_accepted_tokens: int = 0  # of them, accepted by the model
    spec_draft_seconds: float = 0.0  # spent drafting them
    spec_verify_seconds: float = 0.0  # of the steps that verified them
    prefill_handoffs: int = 0  # sequences prefilled on the prefill pool, moved with their KV to the decode pool
