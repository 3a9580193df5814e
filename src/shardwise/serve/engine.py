"""AsyncEngine: the scheduler on one engine thread, fed by asyncio request handlers.

HTTP handlers run on an event loop; the model steps on another thread that owns the
Scheduler, so a step never blocks the loop. New sequences and aborts cross over
through a queue that the engine drains before every step (a request joins the running
batch at the next step); each token's new text comes back to the waiting handler on
its asyncio queue.

The engine should run on the thread that loaded the model (`run()`; shardwise serve
puts it on the main thread and the event loop on another): once one thread has used
torch's OpenMP pool, steps on a second thread ran 40 % slower here.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shardwise.engine.llm import LLM
from shardwise.engine.sampling import TokenLogprobs
from shardwise.engine.scheduler import Sequence
from shardwise.serve.metrics import Metrics

log = logging.getLogger("shardwise.serve")


class EngineError(RuntimeError):
    """The engine failed while running a request (not the request's fault)."""


@dataclass(frozen=True)
class Event:
    index: int  # which of the request's sequences
    seq: Sequence
    text: str  # new text since the last event
    finished: bool  # seq.output is final once this is True
    token: int  # the token that produced it
    logprobs: TokenLogprobs | None  # that token's, when the request asked for them


class AsyncEngine:
    def __init__(self, llm: LLM, metrics: Metrics):
        self.llm, self.scheduler, self.metrics = llm, llm.scheduler, metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._last_token: dict[int, float] = {}
        self.failure: str | None = None  # set if the engine loop itself died
        self._counted = {"stage_failures": 0, "recoveries": 0, "replayed_tokens": 0}  # reported to metrics
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

    async def stream(self, seqs: list[Sequence]) -> AsyncIterator[Event]:
        """Run the sequences; yield an Event per new token of any of them until all finish.
        Leaving early (the client went away) aborts the unfinished ones and frees their KV."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for i, seq in enumerate(seqs):
            self._listeners[seq.id] = (loop, events, i)
        self._inbox.put(("add", seqs))
        pending = len(seqs)
        try:
            while pending:
                event = await events.get()
                if isinstance(event, Exception):
                    raise event
                pending -= event.finished
                yield event
        finally:
            if pending:
                self._inbox.put(("abort", seqs))

    # --- the engine loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Step until stop(): the engine loop, on the calling thread."""
        self.running = True
        try:
            while True:
                if not self._drain(block=not self.scheduler.has_work):
                    return
                try:
                    started = time.perf_counter()
                    events = self.scheduler.step()
                    self.step_s = time.perf_counter() - started
                except Exception as e:  # a stage failed: fail its requests, keep serving the rest
                    log.exception("engine step failed")
                    self.scheduler.note("error", f"a step failed, its requests with it: {e}")
                    self._fail_all(EngineError(f"the engine failed while running this request: {e}"))
                    self._update_gauges()
                    continue
                deliveries: dict[asyncio.AbstractEventLoop, list] = {}
                for seq, piece in events:
                    self._on_token(seq, piece, deliveries)
                for loop, batch in deliveries.items():  # one wake-up of each event loop per step
                    loop.call_soon_threadsafe(_deliver, batch)
                self._update_gauges()
        except BaseException as e:
            self.failure = f"{type(e).__name__}: {e}"
            self._fail_all(EngineError(f"the engine stopped: {self.failure}"))
            raise
        finally:
            self.running = False

    def _drain(self, block: bool) -> bool:
        """Apply queued adds, aborts and calls; False once asked to stop."""
        while True:
            try:
                command, payload = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command == "stop":
                self.scheduler.release_all()
                return False
            if command == "call":
                _call(*payload)
                continue
            for seq in payload:
                if command == "add":
                    self.scheduler.add(seq)
                elif not seq.output.finished:
                    self.scheduler.abort(seq)
                    self._done(seq)
            self._update_gauges()

    def _on_token(self, seq: Sequence, piece: str, deliveries: dict) -> None:
        out, now, m = seq.output, time.perf_counter(), self.metrics
        m.generation_tokens.inc()
        if len(out.token_ids) == 1:
            m.ttft.observe(out.first_token_time - out.arrival_time)
            m.prompt_tokens.inc(len(seq.prompt))
        else:
            m.tpot.observe(now - self._last_token.get(seq.id, now))
        self._last_token[seq.id] = now
        listener = self._listeners.get(seq.id)
        if listener:
            loop, events, index = listener
            logprobs = out.logprobs[-1] if seq.params.logprobs is not None else None
            event = Event(index, seq, piece, out.finished, out.token_ids[-1], logprobs)
            deliveries.setdefault(loop, []).append((events, event))
        if out.finished:
            m.e2e.observe(now - out.arrival_time)
            self._done(seq)

    def _done(self, seq: Sequence) -> None:
        self.metrics.finished(seq.output.finish_reason or "abort")
        self._listeners.pop(seq.id, None)
        self._last_token.pop(seq.id, None)

    def _fail_all(self, error: Exception) -> None:
        for seq_id, (loop, events, _) in list(self._listeners.items()):
            loop.call_soon_threadsafe(events.put_nowait, error)
            self._listeners.pop(seq_id)
        try:
            self.scheduler.release_all()
        except Exception:
            log.exception("freeing the failed requests' KV")

    def _update_gauges(self) -> None:
        s, m = self.scheduler, self.metrics
        m.running.set(s.num_running)
        m.waiting.set(len(s.waiting))
        m.kv_usage.set(s.kv_reserved / s.kv_capacity)
        # the scheduler counts lost stages and replays; the counters follow it
        for name, counter in (("stage_failures", m.stage_failures), ("recoveries", m.recoveries),
                              ("replayed_tokens", m.replayed_tokens)):
            new = getattr(s, name) - self._counted[name]
            if new:
                counter.inc(new)
                self._counted[name] += new
                if name == "recoveries":
                    m.recovery_time.observe(s.last_recovery_s)


def _call(fn, future: asyncio.Future) -> None:
    try:
        result, error = fn(), None
    except Exception as e:  # the caller's to handle
        result, error = None, e
    loop = future.get_loop()
    loop.call_soon_threadsafe(lambda: future.cancelled() or (future.set_exception(error) if error
                                                              else future.set_result(result)))


def _deliver(batch: list[tuple[asyncio.Queue, Event]]) -> None:
    for events, event in batch:
        events.put_nowait(event)
