"""Scheduler: iteration-level (continuous) batching over an executor.

Requests wait, and join the running set at the next step in the order the policy gives
(policy.py: first come first served, or FastServe's skip-join MLFQ), as long as
their KV fits: each admitted sequence reserves room for its prompt plus its
max_tokens, so a running sequence can never run out of cache and nothing it uses is
ever evicted; the rest queue. With prefix caching, a sequence starts with the cached
blocks its prompt begins with (prefilling only the rest), its full blocks are cached as
they fill, and cached blocks no one uses are evicted, least recently used first, when a
new sequence needs their room. A preemptive policy pauses running sequences that newer,
higher-ranked ones outrank (they keep their KV and resume where they stopped), and gives
a paused sequence's KV back when a higher-ranked one needs the room: it waits again and,
readmitted, prefills its prompt and tokens anew, through the prefix cache where its blocks
are still cached. Each step packs the running decodes (one token each) and
then chunks of prompts into one batch under a token budget, so a long prompt is
prefilled in pieces and never stalls the sequences already decoding (Sarathi-Serve).
On a pipeline the running sequences form one micro-batch per compute resource, each
with a step in flight. With a disaggregated executor (a prefill pool beside the decode pool),
a long new prompt runs in its own micro-batches on the prefill pool, without decodes beside
it, where that costs the requests less (see _prefills_apart), and once its first token is
sampled it moves with its KV to the decode pool's. A
finished or aborted sequence frees its KV at once (or, if a step holding it is in flight, as
soon as that step returns).

When a pipeline stage is lost, the executor replaces it and every running sequence is
replayed: its prompt and the tokens it generated are prefilled again (in chunks, beside
the others' decodes) without sampling, and decoding resumes where it stopped; the
samplers are rebuilt with their draw counts. (A prefill sums in another order than the
decodes did, so a greedy near-tie may flip.) When the stages move to a new plan with every
stage alive (a node's speed drifted, or an operator gave one), the sequences' KV moves
with the layers instead:
nothing is replayed and the output is the undisturbed one, bit for bit.

One request never fails another. A sequence whose sampling fails fails alone. A step that
fails with no stage lost (an error in the model that no single row owns) is rewound and
bisected: its sequences are held out in halves, each half retried alone (the older half
first), until the one that fails by itself is found and failed; the rest carry on.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from shardwise.config import SpeculativeConfig
from shardwise.engine.kv_cache import BLOCK_SIZE
from shardwise.engine.policy import FirstComeFirstServed, SkipJoinMLFQ
from shardwise.engine.prefix_cache import CachedPrefix, PrefixCache, block_keys
from shardwise.engine.sampling import SamplingParams, TokenLogprobs
from shardwise.engine.speculative import Drafter, next_gamma
from shardwise.errors import Drifted, ShardwiseError, StageFailure
from shardwise.model.spec import ModelSpec
from shardwise.model.tokenizer import Detokenizer, Tokenizer

log = logging.getLogger("shardwise.engine")
MAX_FAILURES_IN_A_ROW = 3  # recoveries with no step completing between them: something is broken for good
IDLE_MOVE_WAIT_S = 0.05  # with nothing to step, how long a step waits for a move's stages to be ready
MAX_STEP_ERRORS = 4  # failed steps a sequence may be part of before it is failed itself (one that fails
# only in company, e.g. out of memory in a large batch, must not be retried for ever)
EVENTS_KEPT = 100  # the latest failures and recoveries, for the dashboard
PROBE = -1  # the group of a step that retries a failed step's suspects alone
MIN_TIMED_PROMPT_TOKENS = 32  # a step that ran fewer prompt tokens says little of a pool's prefill speed
# the prefill pool must save this much to take a prompt: the hand-over moves its KV, and pools alike
# are timed apart by noise
APART_GAIN = 1.25


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" once finished
    error: str | None = None  # why, when finish_reason is "error"
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when asked for
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


class Sequence:
    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 kv_tokens: int, priority: int = 0):
        self.id, self.prompt, self.params, self.priority = seq_id, prompt_ids, params, priority
        self.kv_tokens = kv_tokens  # KV slots reserved while it runs
        self.fed = 0  # tokens already run through the model
        self.detok = Detokenizer(tokenizer, params.stop)
        self.output = RequestOutput(seq_id, prompt_ids)
        self.aborted = False
        self.step_errors = 0  # failed steps it was part of
        self.block_keys: list[bytes] = []  # prefix-cache keys of its leading full blocks, hashed once each
        self.cached_blocks = 0  # its leading blocks in the prefix cache (held, or another's copy)
        self.held: list[bytes] = []  # those it holds there (not private copies)
        self.paused = False  # outranked: it keeps its KV but is left out of the steps
        self.preemptions = 0  # times it was paused or had its KV given back
        self.level, self.level_tokens, self.last_served = 0, 0, 0.0  # the policy's account of it
        self.gamma = 0  # how many tokens to draft next (speculative decoding adapts it)
        self.on_prefill_pool = False  # its prompt runs on a disaggregated executor's prefill pool

    @property
    def resume_at(self) -> int:
        """Tokens the KV must hold before it decodes: its prompt and all it generated but the
        last (the next input). Only above the prompt after a replay."""
        return len(self.prompt) + max(len(self.output.token_ids) - 1, 0)

    def keys_of(self, tokens: list[int]) -> list[bytes]:
        """The keys of the full blocks of `tokens`, its first known tokens (they only grow, so
        keys once hashed stay valid)."""
        done = self.block_keys
        if len(tokens) // BLOCK_SIZE > len(done):
            done.extend(block_keys(tokens, len(done), done[-1] if done else b""))
        return done[:len(tokens) // BLOCK_SIZE]

    @property
    def kv_own(self) -> int:
        """KV tokens it reserves beyond the cached blocks it holds."""
        return self.kv_tokens - BLOCK_SIZE * len(self.held)

    @property
    def prefilled(self) -> bool:
        return self.fed >= self.resume_at

    def next_chunk(self, budget: int) -> list[int]:
        if self.prefilled:
            return [self.output.token_ids[-1]]
        end = min(self.fed + budget, self.resume_at)
        known = self.prompt if end <= len(self.prompt) else self.prompt + self.output.token_ids
        return known[self.fed : end]

    def samples(self, chunk: list[int]) -> bool | int:
        """What the step feeding this chunk samples for it: whether it yields its next token
        (once the KV holds every token known so far, not while a replay is still catching up),
        or for a decode chunk that ends in drafted tokens, their number + 1 (the worker
        verifies them)."""
        if self.prefilled and len(chunk) > 1:
            return len(chunk)
        return self.fed + len(chunk) >= len(self.prompt) + len(self.output.token_ids)


class Scheduler:
    """Not thread-safe: one thread adds, aborts and steps (the server runs it on its engine thread)."""

    def __init__(self, executor: Any, spec: ModelSpec, tokenizer: Tokenizer, *, max_num_seqs: int,
                 max_batch_tokens: int, kv_capacity: int, prefix_cache: PrefixCache | None = None,
                 policy: FirstComeFirstServed | SkipJoinMLFQ | None = None,
                 speculative: SpeculativeConfig | None = None, drafter: Drafter | None = None,
                 prefill_pool_min_tokens: int = 0):
        self.executor, self.spec, self.tokenizer = executor, spec, tokenizer
        # a disaggregated executor: its first groups step on the prefill pool, which takes the prompts
        # with at least prefill_pool_min_tokens tokens to run (shorter ones prefill beside the decodes)
        self.prefill_groups = getattr(executor, "prefill_parallelism", 0)
        self.prefill_pool_min_tokens = prefill_pool_min_tokens
        # each pool's measured seconds per token of its steps that ran prompts (decode pool, prefill pool)
        self.pool_seconds_per_token: list[float | None] = [None, None]
        self.handoffs = 0  # sequences moved with their KV from the prefill pool to the decode pool
        if (speculative is None) != (drafter is None):
            raise ShardwiseError("speculative decoding needs both its config and a drafter")
        self.speculative, self.drafter = speculative, drafter
        self.drafted_tokens = self.accepted_tokens = 0  # speculative decoding's drafts, and those accepted
        self.drafts = 0  # sequences' steps that verified drafts (a drafter may find none for a step)
        self.draft_s = 0.0  # seconds spent drafting
        self.verify_s = 0.0  # seconds of the steps that verified drafts, submitted to done
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max(max_batch_tokens, max_num_seqs)
        self.kv_capacity = kv_capacity  # tokens of KV each stage holds for the running sequences
        self.external_kv = 0  # KV tokens held outside the scheduler from the same budget (collaborative sessions)
        self.prefix_cache = prefix_cache
        self.policy = policy or FirstComeFirstServed()
        self.preemptions = 0  # running sequences paused for higher-ranked ones
        self.recomputations = 0  # paused sequences whose KV was given back (prefilled again later)
        self.waiting: deque[Sequence] = deque()
        self.groups: list[list[Sequence]] = [[] for _ in range(executor.parallelism)]  # micro-batches
        # (handle, group, batch, when it was submitted)
        self.in_flight: list[tuple[Any, int, list[tuple[Sequence, list[int]]], float]] = []
        self.held: deque[list[Sequence]] = deque()  # suspects of a failed step, retried alone group by group
        self.stage_failures = self.recoveries = self.replans = self.replayed_tokens = 0
        self.last_recovery_s = 0.0
        self._failures_in_a_row = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        if hasattr(executor, "on_event"):  # a pipeline tells of what it notices between steps
            executor.on_event = self.note

    def note(self, kind: str, message: str) -> None:
        """Record an event an operator should see (a stage lost, a recovery, an engine error)."""
        self.events.append({"time": time.time(), "kind": kind, "message": message})

    # --- requests -------------------------------------------------------------------------------
    def make_sequence(self, seq_id: int, prompt_ids: list[int], params: SamplingParams,
                      priority: int = 0) -> Sequence:
        """A sequence for this prompt, or a ShardwiseError saying why it can never run."""
        context = self.spec.context_length
        if not prompt_ids:
            raise ShardwiseError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= context:
            raise ShardwiseError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                                 f"{context}: shorten the prompt")
        kv_tokens = min(len(prompt_ids) + params.max_tokens, context)
        if kv_tokens > self.kv_capacity:
            raise ShardwiseError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                                 f"needs {kv_tokens} tokens of KV cache but this engine holds {self.kv_capacity}: "
                                 f"lower max_tokens or shorten the prompt")
        if params.seed is None and not params.greedy:  # fixed now, so a replay draws the same tokens
            params = replace(params, seed=random.getrandbits(63))
        seq = Sequence(seq_id, prompt_ids, params, self.tokenizer, kv_tokens, priority)
        seq.gamma = self.speculative.gamma if self.speculative else 0
        return seq

    def add(self, seq: Sequence) -> None:
        self.policy.enter(seq, time.perf_counter())
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (its client left); its KV is freed as soon as no step holds it."""
        if seq.output.finished:
            return
        seq.aborted = True
        seq.output.finish_reason = "abort"
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif not self._in_flight(seq):
            self._release(seq)

    def expire_waiting(self, max_wait_s: float) -> list[Sequence]:
        """Take out (aborted) the sequences that have waited longer than max_wait_s to start."""
        now = time.perf_counter()
        expired = [s for s in self.waiting if now - s.output.arrival_time > max_wait_s and not s.preemptions]
        for seq in expired:
            self.abort(seq)
        return expired

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or any(self.groups) or self.executor.moving)

    @property
    def num_running(self) -> int:
        """Sequences holding KV on the stages (paused ones too)."""
        return sum(map(len, self.groups))

    @property
    def num_paused(self) -> int:
        return sum(s.paused for g in self.groups for s in g)

    @property
    def kv_reserved(self) -> int:
        """KV tokens the running sequences have reserved (cached blocks they share counted once),
        and those held outside the scheduler; cached blocks no one uses are not counted (they
        give way to any sequence that needs their room)."""
        cached = self.prefix_cache.blocks - self.prefix_cache.unused if self.prefix_cache is not None else 0
        return sum(s.kv_own for g in self.groups for s in g) + BLOCK_SIZE * cached + self.external_kv

    # --- one step ---------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, str]]:
        """Admit what fits, keep every idle micro-batch busy, and collect one finished step:
        (sequence, new text) for each sequence that got a token or failed."""
        self._admit()
        if self.held:  # a failed step's suspects run alone, one group at a time, nothing beside them
            self.held[0] = [s for s in self.held[0] if not s.output.finished]
            if not self.held[0]:
                self.held.popleft()
            elif not self.in_flight:
                self._submit(PROBE, self._batch(self.held[0]))
        else:
            busy = {g for _, g, _, _ in self.in_flight}
            for g, group in enumerate(self.groups):
                if g not in busy:
                    self._submit(g, self._batch(group))
        if not self.in_flight:  # idle: a move under way happens once its stages are ready
            if self.executor.moving and self.executor.ready_to_move(timeout=IDLE_MOVE_WAIT_S):
                self._recover(self.executor.moving)
            return []
        try:
            handle, g, batch, submitted = self.in_flight.pop(self.executor.wait([h for h, _, _, _ in self.in_flight]))
        except StageFailure as failure:
            self._recover(failure)
            return []
        try:
            sampled = self.executor.result(handle)
        except StageFailure as failure:
            self._recover(failure)
            return []
        except Exception as error:  # the step failed, yet every stage lives: find whose it is
            return self._isolate(g, batch, error)
        self._failures_in_a_row = 0
        if g == PROBE:
            self.held.popleft()  # they step without trouble alone: back among the others
        events = []
        more = sampled.more or {}
        if more:
            self.verify_s += time.perf_counter() - submitted
        if self.prefill_groups and g != PROBE:
            self._time_pool(g < self.prefill_groups, batch, time.perf_counter() - submitted)
        for row, ((seq, chunk), token) in enumerate(zip(batch, sampled.tokens, strict=True)):
            seq.fed += len(chunk)
            if seq.aborted:
                if not self._in_flight(seq):
                    self._release(seq)
                continue
            if row in sampled.errors:
                events.append(self._fail(seq, sampled.errors[row]))
                continue
            produced = [] if token is None else [token, *more.get(row, ())]
            if row in sampled.logprobs:
                seq.output.logprobs.append(sampled.logprobs[row])
            if produced:
                self.policy.served(seq, time.perf_counter())
            taken = 0
            for token in produced:  # an event per token (a verified draft's too)
                events.append((seq, self._append(seq, token)))
                taken += 1
                if seq.output.finished:
                    break  # (drafts past its end count as rejected)
            if row in more:
                self._verified(seq, drafted=len(chunk) - 1, accepted=taken - 1)
            if self.prefix_cache is not None and not seq.on_prefill_pool:  # (cached on the decode pool only)
                self._keep_blocks(seq)
            if seq.output.finished:
                self._release(seq)
        if self.prefill_groups:
            self._hand_over(batch)
        return events

    def _verified(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """After a speculative step: the rejected drafts' KV is dropped on every stage, and the
        sequence's next draft length adapts to what it accepted."""
        if accepted < drafted:
            seq.fed -= drafted - accepted
            self.executor.rewind(seq.id, seq.fed)
        self.drafts += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        seq.gamma = next_gamma(seq.gamma, drafted, accepted, self.speculative.gamma)

    def release_all(self) -> None:
        """Free every running sequence's KV (after an error, or when the caller gives up)."""
        for group in self.groups:
            for seq in list(group):
                self._release(seq)
        self.waiting.clear()
        self.in_flight.clear()
        self.held.clear()

    # --- internals ------------------------------------------------------------------------------
    def _submit(self, g: int, batch: list[tuple[Sequence, list[int]]]) -> None:
        if batch:
            submitted = time.perf_counter()  # (an in-process executor runs the step right here)
            handle = self.executor.submit([s.id for s, _ in batch], [c for _, c in batch],
                                          [s.samples(c) for s, c in batch])
            self.in_flight.append((handle, g, batch, submitted))

    def _isolate(self, g: int, batch: list[tuple[Sequence, list[int]]], error: Exception) -> list[tuple[Sequence, str]]:
        """A step failed with every stage alive: rewind its sequences' KV to what the scheduler
        knows is stored, then fail the sequence if it ran alone (or failed too often), else hold
        the batch out in two halves, older first, each retried alone."""
        log.warning("a step of %d sequences failed (%s: %s); isolating the cause", len(batch),
                    type(error).__name__, error)
        if g == PROBE:
            self.held.popleft()
        suspects = []
        for seq, _ in batch:
            seq.step_errors += 1
            if seq.aborted:
                if not self._in_flight(seq):
                    self._release(seq)
                continue
            self.executor.rewind(seq.id, seq.fed)
            suspects.append(seq)
        message = f"the engine failed on this request ({type(error).__name__}: {error})"
        failed = [s for s in suspects if len(suspects) == 1 or s.step_errors >= MAX_STEP_ERRORS]
        suspects = [s for s in suspects if s not in failed]
        if suspects:
            self.note("error", f"a step failed ({error}); retrying its {len(suspects)} sequences in halves")
            half = (len(suspects) + 1) // 2
            self.held.extendleft([suspects[half:], suspects[:half]])  # the older half runs first
        return [self._fail(seq, message) for seq in failed]

    def _fail(self, seq: Sequence, message: str) -> tuple[Sequence, str]:
        """End one sequence with an error; every other sequence carries on."""
        self.note("error", f"request {seq.id} failed: {message}")
        seq.output.finish_reason, seq.output.error = "error", message
        seq.output.finish_time = time.perf_counter()
        if not self._in_flight(seq):
            self._release(seq)
        else:
            seq.aborted = True  # released when its step in flight comes back
        return seq, ""

    def _recover(self, failure: StageFailure) -> None:
        """Move every stage to a new plan (Drifted), its sequences' KV with it where the executor
        can; or replace the lost stage(s), or move without the KV, and replay every running
        sequence from its first token."""
        drifted = isinstance(failure, Drifted)
        started = time.perf_counter()
        if drifted:  # (the executor noted the re-plan when it began)
            if self.executor.migrate(failure.plan):  # the steps in flight come back as usual
                self._forget_cached_blocks()  # the new stages hold each sequence's KV as its own
                self.replans += 1
                self.note("re-planned", f"{self.num_running} sequences moved with their KV in "
                                        f"{time.perf_counter() - started:.1f} s; nothing to replay")
                return
        else:
            self.stage_failures += 1
            self._failures_in_a_row += 1
            if self._failures_in_a_row > MAX_FAILURES_IN_A_ROW:
                raise ShardwiseError(f"pipeline stages failed {self._failures_in_a_row} times in a row without "
                                     f"completing a step (last: {failure}): check the nodes and their logs")
            log.warning("lost a pipeline stage (%s): replacing it and replaying %d sequences", failure,
                        self.num_running)
            self.note("stage lost", f"{failure}; replacing it and replaying {self.num_running} sequences")
        replayed = self.replayed_tokens
        self.in_flight.clear()
        self.held.clear()  # every sequence replays from its start: suspects too
        self.executor.recover(failure)  # a ShardwiseError here: nothing can take the stage's place
        self._forget_cached_blocks()  # every stage starts empty
        for group in self.groups:
            for seq in list(group):
                if seq.aborted:
                    group.remove(seq)  # the stages forgot it already
                    continue
                self.replayed_tokens += seq.resume_at
                seq.fed = 0
                self.executor.add(seq.id, seq.params, seq.output.token_ids)
        for seq in [s for g in self.groups[:self.prefill_groups] for s in g]:  # replays run on the decode pool
            self._to_decode_pool(seq)
        seconds, tokens = time.perf_counter() - started, self.replayed_tokens - replayed
        if drifted:
            self.replans += 1
            self.note("re-planned", f"stages moved in {seconds:.1f} s; {tokens} tokens to replay")
        else:
            self.recoveries += 1
            self.last_recovery_s = seconds
            self.note("recovered", f"stages replaced in {seconds:.1f} s; {tokens} tokens to replay")

    def _admit(self) -> None:
        now = time.perf_counter()

        def rank(seq: Sequence) -> tuple:
            return self.policy.rank(seq, now)

        if self.policy.preemptive:
            self._pause_outranked(rank)
        while self.waiting and self.num_running - self.num_paused < self.max_num_seqs:
            seq = min(self.waiting, key=rank)
            prefix = self._hold_cached_prefix(seq)
            seq.on_prefill_pool = self._prefills_apart(seq, prefix)
            if seq.on_prefill_pool and prefix:  # (cached blocks live on the decode pool)
                self._let_go(seq)
                prefix = None
            if not self._room_for(seq, rank):
                self._let_go(seq)
                return  # in the policy's order: the others wait behind it
            self.waiting.remove(seq)
            seq.fed = len(prefix.tokens) if prefix else 0
            if self.prefix_cache is not None:
                self.prefix_cache.query_tokens += seq.resume_at
                self.prefix_cache.hit_tokens += seq.fed
            if seq.on_prefill_pool:
                self.executor.add_prefill(seq.id, seq.params)
            elif prefix:
                self.executor.add(seq.id, seq.params, seq.output.token_ids, prefix=prefix)
            else:
                self.executor.add(seq.id, seq.params, seq.output.token_ids)
            min(self._groups_for(seq), key=len).append(seq)  # joins its group's next step

    def _prefills_apart(self, seq: Sequence, prefix: CachedPrefix | None) -> bool:
        """Whether a sequence's prompt runs on the prefill pool. Only a new prompt whose uncached
        part is long enough to hold up the decodes, and no shorter than its cached part (the
        prefill pool holds no cache: it would compute that part again): a short one, a chat
        turn resent over a long cached history, or a replay runs beside the decodes. Then
        wherever it costs the requests fewer seconds, at each pool's measured seconds per
        token: on the decode pool its chunks hold up itself and every sequence running there;
        on the prefill pool it waits behind the prompts already there, and holds up no one (and
        must save APART_GAIN to pay for its hand-over). So with nothing running on the decode
        pool (and pools alike) it prefills where it will decode, with no hand-over."""
        cached = len(prefix.tokens) if prefix else 0
        uncached = len(seq.prompt) - cached
        if not self.prefill_groups or seq.output.token_ids or uncached < max(self.prefill_pool_min_tokens, cached):
            return False
        beside = sum(not s.paused for g in self.groups[self.prefill_groups:] for s in g)
        ahead = sum(max(len(s.prompt) - s.fed, 0) for g in self.groups[:self.prefill_groups] for s in g)
        here, apart = self.pool_seconds_per_token
        here = here or apart or 1.0  # (a pool not yet timed is taken to be as fast as the other)
        apart = apart or here
        return (ahead + uncached) * apart * APART_GAIN < (1 + beside) * uncached * here

    def _time_pool(self, prefill_pool: bool, batch: list[tuple[Sequence, list[int]]], seconds: float) -> None:
        """A pool's seconds per token, from its steps that ran prompts (in every token of them)."""
        if sum(len(chunk) for seq, chunk in batch if seq.fed < len(seq.prompt)) < MIN_TIMED_PROMPT_TOKENS:
            return
        measured = seconds / sum(len(chunk) for _, chunk in batch)
        last = self.pool_seconds_per_token[prefill_pool]
        self.pool_seconds_per_token[prefill_pool] = measured if last is None else 0.7 * last + 0.3 * measured

    def _groups_for(self, seq: Sequence) -> list[list[Sequence]]:
        """The step groups of the pool a sequence runs on (every group, on one pool)."""
        return self.groups[:self.prefill_groups] if seq.on_prefill_pool else self.groups[self.prefill_groups:]

    def _hand_over(self, batch: list[tuple[Sequence, list[int]]]) -> None:
        """The sequences whose prompt ran on the prefill pool in this step, their first token
        sampled, move on to the decode pool with their KV."""
        done = [s for s, _ in batch if s.on_prefill_pool and s.prefilled and not s.output.finished and not s.aborted]
        if not done:
            return
        self.executor.handoff([s.id for s in done])
        self.handoffs += len(done)
        for seq in done:
            self._to_decode_pool(seq)

    def _to_decode_pool(self, seq: Sequence) -> None:
        next(g for g in self.groups if seq in g).remove(seq)
        seq.on_prefill_pool = False
        min(self._groups_for(seq), key=len).append(seq)

    def _pause_outranked(self, rank: Any) -> None:
        """Give the batch's slots to the best-ranked sequences, running or waiting: the running
        ones outside them pause (keeping their KV), paused ones inside them resume."""
        running = [s for g in self.groups for s in g if not s.aborted and not s.output.finished]
        best = set(map(id, sorted(running + list(self.waiting), key=rank)[:self.max_num_seqs]))
        for seq in running:
            paused = id(seq) not in best
            if paused and not seq.paused:
                self.preemptions += 1
                seq.preemptions += 1
            seq.paused = paused

    def _hold_cached_prefix(self, seq: Sequence) -> CachedPrefix | None:
        """Hold the cached blocks that the tokens it must store before its next step start with
        (a new prompt's all but last: that one must run to give the first token's logits)."""
        if self.prefix_cache is None:
            return None
        cache = self.prefix_cache
        known = (seq.prompt + seq.output.token_ids)[:seq.resume_at - (not seq.output.token_ids)]
        keys = seq.keys_of(known)
        hit = cache.match(keys)
        seq.held, seq.cached_blocks = keys[:hit], hit
        cache.hold(seq.held)
        return CachedPrefix(seq.held, known[:BLOCK_SIZE * hit]) if hit else None

    def _let_go(self, seq: Sequence) -> None:
        """Release a sequence's cached blocks (they stay cached for others)."""
        if self.prefix_cache is not None:
            self.prefix_cache.release(seq.held)
        seq.held, seq.cached_blocks = [], 0

    def _room_for(self, seq: Sequence, rank: Any) -> bool:
        """Whether seq's KV fits: giving back the KV of paused sequences it outranks if it must
        (a preemptive policy), and evicting cached blocks no one uses."""
        tokens = seq.kv_own
        if self.kv_reserved + tokens > self.kv_capacity:
            if not self.policy.preemptive:
                return False
            outranked = sorted((s for g in self.groups for s in g if s.paused and not self._in_flight(s)
                                and rank(s) > rank(seq)), key=rank)
            if self.kv_reserved - sum(s.kv_tokens for s in outranked) + tokens > self.kv_capacity:
                return False  # not even all of them would make room: give back none
            while outranked and self.kv_reserved + tokens > self.kv_capacity:
                self._give_back(outranked.pop())  # the lowest ranked first
            if self.kv_reserved + tokens > self.kv_capacity:
                return False  # (blocks they share with others stay)
        if self.prefix_cache is not None:
            over = self.kv_reserved + tokens + BLOCK_SIZE * self.prefix_cache.unused - self.kv_capacity
            if over > 0:
                self.executor.evict(self.prefix_cache.evict(-(-over // BLOCK_SIZE)))
        return True

    def _give_back(self, seq: Sequence) -> None:
        """A paused sequence's KV goes back to the pool; it waits again, to be prefilled anew."""
        self._release(seq)
        seq.paused, seq.fed = False, 0
        self.recomputations += 1
        self.waiting.append(seq)

    def _keep_blocks(self, seq: Sequence) -> None:
        """Cache the blocks of a sequence that filled in the step just done (on every stage)."""
        full, first = seq.fed // BLOCK_SIZE, seq.cached_blocks
        if full <= first:
            return
        keys = seq.keys_of((seq.prompt + seq.output.token_ids)[:full * BLOCK_SIZE])[first:]
        seq.cached_blocks = full
        new = self.prefix_cache.insert(keys)
        if new:
            seq.held = seq.held + new
            self.executor.keep(seq.id, first, keys)

    def _forget_cached_blocks(self) -> None:
        """The stages hold no cached blocks any more (replaced, or moved): nor does the index."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        for group in self.groups:
            for seq in group:
                seq.held, seq.cached_blocks = [], 0  # (its full blocks are cached again from the first)

    def _release(self, seq: Sequence) -> None:
        for group in self.groups:
            if seq in group:
                group.remove(seq)
                self.executor.free(seq.id)
                self._let_go(seq)
        if self.drafter is not None:
            self.drafter.release(seq.id)

    def _in_flight(self, seq: Sequence) -> bool:
        return any(s is seq for _, _, batch, _ in self.in_flight for s, _ in batch)

    def _batch(self, running: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """Decodes first (one token each, and any drafts to verify), then prompt chunks while
        the token budget lasts."""
        running = [s for s in running if not s.aborted and not s.output.finished and not s.paused]
        decoding = [s for s in running if s.prefilled]
        drafting = self.drafter is not None and len(decoding) <= self.speculative.max_batch
        drafts = self._drafts(decoding) if drafting else {}
        batch = [(s, s.next_chunk(1) + drafts.get(s.id, [])) for s in decoding]
        budget = self.max_batch_tokens - sum(len(c) for _, c in batch)
        for seq in running:
            if not seq.prefilled and budget > 0:
                chunk = seq.next_chunk(budget)
                batch.append((seq, chunk))
                budget -= len(chunk)
        return batch

    def _drafts(self, decoding: list[Sequence]) -> dict[int, list[int]]:
        """By sequence id, the tokens the drafter proposes to follow each decoding sequence: none
        for one whose tokens a grammar constrains or that reports logprobs, and never past its
        max_tokens or the context."""
        wanted = []
        for seq in decoding:
            p = seq.params
            room = min(p.max_tokens - len(seq.output.token_ids), self.spec.context_length - seq.fed - 1) - 1
            if p.constraint is None and p.logprobs is None and room >= 1:
                wanted.append((seq.id, seq.prompt + seq.output.token_ids, min(seq.gamma, room)))
        started = time.perf_counter()
        try:
            drafts = self.drafter.propose(wanted) if wanted else []
        except Exception as e:  # drafts only ever save time: the step goes on without them
            log.warning("drafting failed (%s: %s); this step runs without drafts", type(e).__name__, e)
            return {}
        finally:
            self.draft_s += time.perf_counter() - started
        return {seq_id: tokens for (seq_id, _, _), tokens in zip(wanted, drafts, strict=True)}

    def _append(self, seq: Sequence, token: int) -> str:
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
