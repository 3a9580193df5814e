"""The server's side of collaborative sessions: it decides each session's split and runs
the session's server segments on hidden states the client sends, keeping their KV.

All of it runs on the engine thread (between steps, like any other work), so a segment
waits for the step in progress and reads the same weights as the server's own requests:
the server segments are views of one full ShardModel, each with a KV cache of its own.
Sessions idle for `ttl_s` expire and free their KV.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from shardwise.collab.split import Split, choose, measure
from shardwise.collab.wire import AddedSequence, StepMessage, WireError, check_hidden, decode, encode
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.shard import ShardModel
from shardwise.engine.worker import Worker
from shardwise.errors import ShardwiseError
from shardwise.model.weights import open_weights
from shardwise.serve.metrics import Metrics

DEFAULT_TTL_S = 300.0
MAX_MESSAGE_SEQUENCES = 64  # sequences one segment message may step, or add
MAX_MESSAGE_TOKENS = 2048  # tokens one segment message may carry


class SessionGone(ShardwiseError):
    """The session id is unknown or expired."""


class ServerBusy(ShardwiseError):
    """The server has no room for this now (its KV budget is spent): retry later."""


@dataclass
class Session:
    id: str
    split: Split
    counters: dict[int, list[Any]]  # server segment -> the per-layer token counters a step through it adds to
    seq_ids: dict[int, int] = field(default_factory=dict)  # the client's sequence id -> the views' id
    tokens: dict[int, int] = field(default_factory=dict)  # the client's sequence id -> KV tokens it holds
    last_used: float = field(default_factory=time.monotonic)


class CollabHost:
    def __init__(self, llm, metrics: Metrics, ttl_s: float = DEFAULT_TTL_S):
        self.llm, self.spec, self.metrics, self.ttl_s = llm, llm.spec, metrics, ttl_s
        self.sessions: dict[str, Session] = {}
        self._views: dict[tuple[int, int], Worker] = {}
        self._full: ShardModel | None = None
        self._costs: list[float] | None = None
        self._ids = itertools.count()

    # --- sessions (engine thread) ----------------------------------------------------------------
    def open(self, client: list[float], client_memory: float, rtt_s: float, sla_s: float, policy: str,
             insist: bool, server_wait_s: float) -> dict[str, Any]:
        """A new session and its split. server_wait_s: how long a segment now waits for the step
        in progress (the server's load), paid once per visit to the server like the round trip."""
        self.expire()
        split = choose(self.spec, client, self.costs(), (rtt_s + server_wait_s) / 2, client_memory, sla_s,
                       policy, insist)
        session = Session(uuid.uuid4().hex, split, self._counters(split.segments))
        self.sessions[session.id] = session
        self.metrics.collab_sessions.inc()
        for side, a, b in split.segments:
            if side == "server":
                self._view(a, b)
        return {"session": session.id, "segments": [{"side": s, "layers": [a, b]} for s, a, b in split.segments],
                "predicted": {"latency_s": split.latency_s, "server_work_s": split.server_work_s},
                "note": split.note, "ttl_s": self.ttl_s}

    def run(self, session_id: str, segment: int, body: bytes) -> bytes:
        """Run one server segment of a step on a message; the reply's message holds hidden
        states, or (from the last layer) the sampled token ids and any logprobs."""
        session = self._session(session_id)
        if not 0 <= segment < len(session.split.segments) or session.split.segments[segment][0] != "server":
            raise WireError(f"segment {segment} is not one of this session's server segments "
                            f"({[i for i, s in enumerate(session.split.segments) if s[0] == 'server']})")
        _, a, b = session.split.segments[segment]
        worker = self._view(a, b)
        hidden, meta = decode(body)
        step = StepMessage.read(meta)
        self._check_bounds(step)
        tokens = sum(map(len, step.chunks))
        inputs = None if a == 0 else check_hidden(hidden, tokens, self.spec.hidden_size)
        self._reserve(tokens)
        for seq_id in step.free:  # the message is sound: now it may change the session
            self._free(session, worker, seq_id)
        for seq_id, length in step.rewind:
            if seq_id in session.seq_ids:
                worker.rewind(session.seq_ids[seq_id], length)
                session.tokens[seq_id] = min(session.tokens.get(seq_id, 0), length)
        for new in step.add:
            self._add(session, worker, new)
        unknown = [s for s in step.seq_ids if s not in session.seq_ids or session.seq_ids[s] not in worker.shard.kv]
        if unknown:
            raise WireError(f"sequences {unknown} were never added to segment {segment}: send them in 'add' first")
        for seq_id, chunk in zip(step.seq_ids, step.chunks, strict=True):
            if worker.shard.cached_tokens(session.seq_ids[seq_id]) + len(chunk) > self.spec.context_length:
                raise WireError(f"sequence {seq_id} would pass the model's context of {self.spec.context_length} "
                                "tokens: end it sooner")
        started = time.perf_counter()
        out = worker.step([session.seq_ids[s] for s in step.seq_ids], step.chunks, step.sample, inputs)
        self.metrics.collab_seconds.inc(time.perf_counter() - started)
        for seq_id in step.seq_ids:
            held = worker.shard.cached_tokens(session.seq_ids[seq_id])
            session.tokens[seq_id] = max(session.tokens.get(seq_id, 0), held)
        self._publish_kv()
        for counter in session.counters[segment]:
            counter.inc(tokens)
        session.last_used = time.monotonic()
        if isinstance(out, torch.Tensor):
            return encode(out)
        return encode(tokens=out.tokens, errors={str(row): e for row, e in out.errors.items()},
                      logprobs={str(row): [lp.logprob, lp.top] for row, lp in out.logprobs.items()})

    @property
    def kv_tokens(self) -> int:
        """KV tokens the sessions hold (a sequence counted once, at its longest segment)."""
        return sum(sum(s.tokens.values()) for s in self.sessions.values())

    def _check_bounds(self, step: StepMessage) -> None:
        """One message is bounded work: the engine thread runs it between two of the server's steps."""
        if len(step.seq_ids) > MAX_MESSAGE_SEQUENCES or len(step.add) > MAX_MESSAGE_SEQUENCES:
            raise WireError(f"a message may step or add at most {MAX_MESSAGE_SEQUENCES} sequences, this one "
                            f"{max(len(step.seq_ids), len(step.add))}: split it into several steps")
        tokens = sum(map(len, step.chunks))
        if tokens > MAX_MESSAGE_TOKENS:
            raise WireError(f"a message may carry at most {MAX_MESSAGE_TOKENS} tokens, this one {tokens}: "
                            "prefill in smaller chunks")
        if any(not 0 <= t < self.spec.vocab_size for c in step.chunks for t in c):
            raise WireError(f"token ids must lie in [0, {self.spec.vocab_size})")

    def _reserve(self, tokens: int) -> None:
        """A step's new KV (at most its tokens) comes out of the server's one KV budget, which its
        own requests share: refused, before it changes anything, when that is spent."""
        self._publish_kv()
        load = self.llm.load()
        if load.kv_reserved + tokens > load.kv_capacity:
            raise ServerBusy(f"the server's KV cache is full ({load.kv_reserved} of {load.kv_capacity} "
                             f"tokens in use, this step adds up to {tokens}): retry shortly, or free finished "
                             "sequences")

    def _publish_kv(self) -> None:
        self.llm.hold_kv(self.kv_tokens)

    def close(self, session_id: str) -> None:
        session = self._session(session_id)
        for side, a, b in session.split.segments:
            if side == "server":
                for seq_id in session.seq_ids:
                    self._free(session, self._view(a, b), seq_id)
        del self.sessions[session_id]
        self._publish_kv()

    def expire(self) -> int:
        """Close the sessions idle for longer than the TTL; returns how many."""
        now = time.monotonic()
        stale = [s.id for s in self.sessions.values() if now - s.last_used > self.ttl_s]
        for session_id in stale:
            self.close(session_id)
        return len(stale)

    def stats(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions),
                "kv_blocks": sum(w.shard.kv.blocks_in_use for w in list(self._views.values()))}

    # --- internals ------------------------------------------------------------------------------
    def _counters(self, segments: list[tuple[str, int, int]]) -> dict[int, list[Any]]:
        """Per server segment, the layer-token counters a step through it adds to: its own layers
        (server), and at the session's first server segment the client's layers (offloaded), so
        each step counts every layer once. Looked up once per session, not per step."""
        server = [k for k, s in enumerate(segments) if s[0] == "server"]
        client = [s for s in segments if s[0] == "client"]
        return {k: [self.metrics.collab_layer_tokens.labels(self.llm.name, side, str(layer))
                    for side, a, b in [segments[k], *(client if k == server[0] else [])] for layer in range(a, b)]
                for k in server}

    def costs(self) -> list[float]:
        """This server's per-layer decode costs, measured once on its own weights."""
        if self._costs is None:
            self._costs = measure(self._model())
        return self._costs

    def _model(self) -> ShardModel:
        """Every layer: the server's own in-process model, or (behind a pipeline) one loaded here."""
        if self._full is None:
            self._full = self.llm.local_shard() or ShardModel(self.spec, weights=open_weights(self.llm.path))
        return self._full

    def _view(self, a: int, b: int) -> Worker:
        """Layers [a, b) of the full model, sharing its weights, with a KV cache of their own."""
        if (a, b) not in self._views:
            self._views[(a, b)] = Worker(self._model().view(a, b), self.llm.grammars)
        return self._views[(a, b)]

    def _session(self, session_id: str) -> Session:
        if session_id not in self.sessions:
            raise SessionGone(f"collaborative session '{session_id}' is unknown or expired (sessions idle for "
                              f"{self.ttl_s:.0f} s are closed): open a new one")
        return self.sessions[session_id]

    def _add(self, session: Session, worker: Worker, new: AddedSequence) -> None:
        try:
            params = SamplingParams(**new.params)
        except (TypeError, ValueError, ShardwiseError) as e:
            raise WireError(f"sequence {new.seq_id}'s 'params' are not valid SamplingParams ({e})") from None
        session.seq_ids.setdefault(new.seq_id, next(self._ids))
        worker.add(session.seq_ids[new.seq_id], params, new.generated)

    @staticmethod
    def _free(session: Session, worker: Worker, seq_id: int) -> None:
        if seq_id in session.seq_ids:  # the id stays mapped: the session's other segments free it too
            worker.free(session.seq_ids[seq_id])
            session.tokens.pop(seq_id, None)

