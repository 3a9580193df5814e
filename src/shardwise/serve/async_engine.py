"""AsyncEngine: the LLM's engine loop on one engine thread, fed by asyncio request handlers.

HTTP handlers run on an event loop; the model steps on another thread that owns the
Scheduler, so a step never blocks the loop. New sequences and aborts cross over
through a queue that the engine drains before every step (a request joins the running
batch at the next step); each token's new text comes back to the waiting handler on
its asyncio queue.

The engine should run on the thread that loaded the model (`run()`; shardwise serve
puts it on the main thread and the event loop on another): once one thread has used
torch's OpenMP pool, steps on a second thread ran 40 % slower here.

It protects the requests it accepted: a sequence that fails fails its own request only; the
queue is bounded in length (refused at once) and in time (refused once waited too long), both
with a Retry-After; and drain() stops taking requests and lets the running ones finish.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shardwise.engine.sampling import TokenLogprobs
from shardwise.engine.scheduler import Sequence
from shardwise.llm import LLM
from shardwise.serve.metrics import Metrics

log = logging.getLogger("shardwise.serve")


class EngineError(RuntimeError):
    """The engine failed while running a request (not the request's fault)."""


class RequestFailed(EngineError):
    """This request alone failed in the engine; every other request carries on."""


class Overloaded(EngineError):
    """Not taken now (the queue is full, waited too long, or the server is shutting down):
    nothing of it ran, and trying again after retry_after_s may succeed."""

    def __init__(self, message: str, retry_after_s: float, reason: str):
        super().__init__(message)
        self.retry_after_s, self.reason = retry_after_s, reason


@dataclass(frozen=True)
class Event:
    index: int  # which of the request's sequences
    seq: Sequence
    text: str  # new text since the last event
    finished: bool  # seq.output is final once this is True
    token: int  # the token that produced it
    logprobs: TokenLogprobs | None  # that token's, when the request asked for them


class AsyncEngine:
    def __init__(self, llm: LLM, metrics: Metrics, max_waiting: int, max_queue_time_s: float):
        self.llm, self.metrics = llm, metrics
        self.max_waiting, self.max_queue_time_s = max_waiting, max_queue_time_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._last_token: dict[int, float] = {}
        self._queued: dict[int, float] = {}  # (event loop side) sequences accepted and not started: arrival
        self.draining = False  # shutting down: no new requests
        self._drain_deadline: float | None = None
        self.failure: str | None = None  # set if the engine loop itself died, or stopped
        self._counted = dict.fromkeys(("stage_failures", "recoveries", "replans", "replayed_tokens",  # in the
                                       "prefix_query_tokens", "prefix_hit_tokens", "preemptions",  # metrics
                                       "spec_drafts", "spec_draft_tokens", "spec_accepted_tokens",
                                       "spec_draft_seconds", "spec_verify_seconds",
                                       "prefill_handoffs"), 0)
        self.running = False
        self.step_s = 0.0  # the last step's duration: what new work waits for while the engine is busy

    async def call(self, fn):
        """fn() run on the engine thread between two steps (work that uses the model: it
        waits for the step in progress and never runs beside one); returns its result."""
        if self.failure:  # nothing would ever run it
            raise EngineError(f"the engine stopped: {self.failure}")
        future = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", (fn, future)))
        return await future

    def stop(self) -> None:
        """Ask run() to return after the current step."""
        self._inbox.put(("stop", None))

    def drain(self, timeout_s: float) -> None:
        """Take no new requests, and have run() return once the running ones finish, or after
        timeout_s (the unfinished then end with an error). Safe in a signal handler."""
        self.draining = True
        self._inbox.put(("drain", time.monotonic() + timeout_s))

    def admit(self, sequences: int) -> None:
        """Overloaded, unless `sequences` more may queue now (on the event loop, before any work)."""
        if self.draining:
            self.metrics.rejected("shutting_down")
            raise Overloaded("the server is shutting down: send the request to another replica or retry later",
                             5.0, "shutting_down")
        if self._queued and len(self._queued) + sequences > self.max_waiting:  # alone, any request may wait
            self.metrics.rejected("queue_full")
            raise Overloaded(f"the server is overloaded: {len(self._queued)} sequences are waiting (at most "
                             f"{self.max_waiting}): retry later", max(1.0, self.oldest_wait_s()), "queue_full")

    def oldest_wait_s(self) -> float:
        """How long the longest-waiting accepted sequence has waited for a slot."""
        return time.perf_counter() - min(self._queued.values()) if self._queued else 0.0

    async def stream(self, seqs: list[Sequence]) -> AsyncIterator[Event]:
        """Run the sequences; yield an Event per new token of any of them until all finish.
        Leaving early (the client went away) aborts the unfinished ones and frees their KV."""
        self.admit(len(seqs))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for i, seq in enumerate(seqs):
            self._listeners[seq.id] = (loop, events, i)
            self._queued[seq.id] = seq.output.arrival_time
        self._inbox.put(("add", seqs))
        pending = len(seqs)
        try:
            while pending:
                event = await events.get()
                if isinstance(event, Exception):
                    raise event
                self._queued.pop(event.seq.id, None)
                pending -= event.finished
                yield event
        finally:
            for seq in seqs:
                self._queued.pop(seq.id, None)
            if pending:
                self._inbox.put(("abort", seqs))

    # --- the engine loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Step until stop(): the engine loop, on the calling thread."""
        self.running = True
        try:
            while True:
                if self._drained():
                    return
                if not self._take_inbox(block=not self.llm.has_work):
                    return
                deliveries: dict[asyncio.AbstractEventLoop, list] = {}
                self._expire_waiting(deliveries)
                try:
                    started = time.perf_counter()
                    events = self.llm.step()
                    self.step_s = time.perf_counter() - started
                except Exception as e:  # nothing could replace a lost stage: fail what runs, keep serving
                    log.exception("engine step failed")
                    self._fail_all(EngineError(f"the engine failed while running this request: {e}"))
                    self._update_gauges()
                    continue
                later = Counter(seq.id for seq, _ in events)  # a verified draft's tokens come in one step
                for seq, piece in events:
                    later[seq.id] -= 1
                    self._on_token(seq, piece, deliveries, later[seq.id])
                for loop, batch in deliveries.items():  # one wake-up of each event loop per step
                    loop.call_soon_threadsafe(_deliver, batch)
                self._update_gauges()
        except BaseException as e:
            self.failure = f"{type(e).__name__}: {e}"
            self._fail_all(EngineError(f"the engine stopped: {self.failure}"))
            raise
        finally:
            self.running = False
            self.failure = self.failure or "the server is shutting down"
            self._refuse_pending()

    def _drained(self) -> bool:
        """While draining: True once nothing runs, or the drain timeout passed (what still runs
        then ends with an error event; nothing is cut without one)."""
        if self._drain_deadline is None:
            return False
        if self.llm.has_work and time.monotonic() < self._drain_deadline:
            return False
        if self.llm.has_work:
            self._fail_all(EngineError("the server shut down before this request finished (drain timeout)"))
        return True

    def _take_inbox(self, block: bool) -> bool:
        """Apply queued adds, aborts and calls; False once asked to stop. At most one call (a
        collaborative segment, a dashboard read) runs while requests wait for a step, so calls
        interleave with the server's own steps."""
        while True:
            try:
                command, payload = self._inbox.get(block=block, timeout=1.0 if block and self.draining else None)
            except queue.Empty:
                return True
            block = False
            if command == "stop":
                self.llm.release_all()
                return False
            if command == "drain":
                self._drain_deadline = payload
                return True
            if command == "call":
                fn, future = payload
                try:
                    result, error = fn(), None
                except Exception as e:  # the caller's to handle
                    result, error = None, e
                self._update_gauges()  # (a segment may change the KV in use) before the caller hears back
                _settle(future, result, error)
                if self.llm.has_work:
                    return True
                continue
            for seq in payload:
                if command == "add":
                    self.llm.add(seq)
                elif not seq.output.finished:
                    self.llm.abort(seq)
                    self._done(seq)
            self._update_gauges()

    def _on_token(self, seq: Sequence, piece: str, deliveries: dict, later: int = 0) -> None:
        """later: how many more of this sequence's tokens the same step gave (their events follow)."""
        out, now, m = seq.output, time.perf_counter(), self.metrics
        if out.error is not None:  # this sequence failed: its request alone hears of it
            self._send(seq, RequestFailed(out.error), deliveries)
            return
        m.generation_tokens.inc()
        finished, produced = out.finished and not later, len(out.token_ids) - later
        if produced == 1:
            m.ttft.observe(out.first_token_time - out.arrival_time)
            m.prompt_tokens.inc(len(seq.prompt))
        else:
            m.tpot.observe(now - self._last_token.get(seq.id, now))
        self._last_token[seq.id] = now
        listener = self._listeners.get(seq.id)
        if listener:
            loop, events, index = listener
            logprobs = out.logprobs[-1] if seq.params.logprobs is not None else None
            event = Event(index, seq, piece, finished, out.token_ids[produced - 1], logprobs)
            deliveries.setdefault(loop, []).append((events, event))
        if finished:
            m.e2e.observe(now - out.arrival_time)
            self._done(seq)

    def _done(self, seq: Sequence) -> None:
        self.metrics.finished(seq.output.finish_reason or "abort")
        self._listeners.pop(seq.id, None)
        self._last_token.pop(seq.id, None)

    def _expire_waiting(self, deliveries: dict) -> None:
        """Refuse the sequences that waited longer than max_queue_time_s for a slot."""
        for seq in self.llm.expire_waiting(self.max_queue_time_s):
            self.metrics.rejected("queue_timeout")
            error = Overloaded(f"the server is overloaded: this request waited {self.max_queue_time_s:.0f} s "
                               "without starting: retry later", self.max_queue_time_s / 4, "queue_timeout")
            self._send(seq, error, deliveries)

    def _send(self, seq: Sequence, error: Exception, deliveries: dict) -> None:
        listener = self._listeners.get(seq.id)
        if listener:
            loop, events, _ = listener
            deliveries.setdefault(loop, []).append((events, error))
        self._done(seq)

    def _refuse_pending(self) -> None:
        """Requests and calls still queued when the loop ends would wait for ever: fail them."""
        error = EngineError(f"the engine stopped: {self.failure}")
        while True:
            try:
                command, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command == "call":
                _settle(payload[1], error=error)
        self._fail_all(error)

    def _fail_all(self, error: Exception) -> None:
        for seq_id, (loop, events, _) in list(self._listeners.items()):
            loop.call_soon_threadsafe(events.put_nowait, error)
            self._listeners.pop(seq_id)
        try:
            self.llm.release_all()
        except Exception:
            log.exception("freeing the failed requests' KV")

    def _update_gauges(self) -> None:
        s, m = self.llm.load(), self.metrics
        m.running.set(s.running)
        m.waiting.set(s.waiting)
        m.queue_age.set(0.0 if s.oldest_arrival is None else time.perf_counter() - s.oldest_arrival)
        m.kv_usage.set(s.kv_reserved / s.kv_capacity)
        m.stage_timing(s.stage_timing)
        m.prefix_blocks.set(s.prefix_cached_blocks)
        m.prefix_hit_rate.set(s.prefix_hit_tokens / s.prefix_query_tokens if s.prefix_query_tokens else 0.0)
        # the engine counts lost stages, re-plans and replays; the counters follow it
        for name, counter in (("stage_failures", m.stage_failures), ("recoveries", m.recoveries),
                              ("replans", m.replans), ("replayed_tokens", m.replayed_tokens),
                              ("prefix_query_tokens", m.prefix_queries), ("prefix_hit_tokens", m.prefix_hits),
                              ("preemptions", m.preemptions), ("spec_drafts", m.spec_drafts),
                              ("spec_draft_tokens", m.spec_draft_tokens), ("spec_accepted_tokens", m.spec_accepted),
                              ("spec_draft_seconds", m.spec_draft_s), ("spec_verify_seconds", m.spec_verify_s),
                              ("prefill_handoffs", m.prefill_handoffs)):
            new = getattr(s, name) - self._counted[name]
            if new:
                counter.inc(new)
                self._counted[name] += new
                if name == "recoveries":
                    m.recovery_time.observe(s.last_recovery_s)


def _settle(future: asyncio.Future, result=None, error: Exception | None = None) -> None:
    """Complete an event loop's future from the engine thread."""
    future.get_loop().call_soon_threadsafe(
        lambda: future.cancelled() or (future.set_exception(error) if error else future.set_result(result)))


def _deliver(batch: list[tuple[asyncio.Queue, Event]]) -> None:
    for events, event in batch:
        events.put_nowait(event)
