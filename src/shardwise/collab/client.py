"""A collaborative client: an LLM whose executor runs some layers here and the rest on a
shardwise server, `LLM(model, executor=collaborative(url, ...))`.

On start it measures its own per-layer speed (or takes a `shardwise profile` file), times
its round trip to the server and asks for a session; the server picks the split for its
SLA and load. The client then loads only the layers it runs and drives each step through
the segments in turn: its own on a local Worker, the server's as safetensors messages on
the session's WebSocket.
Everything else (batching, sampling, stop rules, streaming) is the LLM's own.
"""

from __future__ import annotations

import json
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import httpx
import psutil
import torch
import websocket

from shardwise.collab.split import measure
from shardwise.collab.wire import decode, encode
from shardwise.engine.executor import SynchronousExecutor
from shardwise.engine.sampling import SamplingParams, TokenLogprobs
from shardwise.engine.shard import ShardModel
from shardwise.engine.structured import Grammars
from shardwise.engine.worker import Sampled, Worker
from shardwise.errors import ShardwiseError, StageFailure
from shardwise.llm import LLM, ExecutorFactory
from shardwise.model.weights import Weights


def collaborative(url: str, *, sla: float = 0.25, profile: str | list[float] | None = None,
                  memory_gb: float | None = None, api_key: str | None = None, policy: str = "dp",
                  insist: bool = False, slowdown: float = 1.0, timeout: float = 120.0,
                  verify: bool | str | ssl.SSLContext = True) -> ExecutorFactory:
    """An executor factory for LLM(executor=...): the model runs partly here, partly on the
    shardwise server at url. sla: seconds per generated token this client needs; profile: a
    `shardwise profile` file of this device, or its seconds per layer for one decode token
    (default: measured now); memory_gb: memory the client offers for layers (default: 80 % of
    what is free); policy: "dp" (least server work within the SLA), "greedy" (most leading
    layers here) or "server" (none here); insist: fail rather than fall back to all-server when
    the SLA cannot be met; slowdown: emulate a device this many times slower (for benchmarks);
    verify: with an https url, the certificate authority file that signed the server's
    certificate (True: the system's; False: none, and so no protection from an impostor).
    The session the server chose (segments, prediction, note) is the executor's `session`."""

    def build(llm: LLM) -> CollabExecutor:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        tls = tls_context(verify)
        http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, verify=tls)
        try:
            memory = memory_gb * 1e9 if memory_gb is not None else 0.8 * psutil.virtual_memory().available
            costs = [c * slowdown for c in _costs(llm, profile, memory)]
            request = {"model": llm.name, "sla_s": sla, "policy": policy, "insist": insist, "client": {
                "layer_seconds": costs, "memory_bytes": memory, "rtt_s": _round_trip(http, llm.spec)}}
            return CollabExecutor(http, lambda: _json(http.post("/v1/collab/sessions", json=request)), llm.weights,
                                  slowdown, headers, timeout, llm.grammars, tls)
        except httpx.HTTPError as e:
            http.close()
            raise ShardwiseError(f"cannot reach the shardwise server at {url} ({e}): is it running?") from None
        except BaseException:
            http.close()
            raise

    return build


def _costs(llm: LLM, profile: str | list[float] | None, memory: float) -> list[float]:
    """Seconds per layer for one decode token here: as given, from a profile file through the
    estimator, or timed on the first layer (the others are alike)."""
    if isinstance(profile, list):
        return profile
    if profile is None:
        return measure(ShardModel(llm.spec, (0, 1), weights=llm.weights))
    from shardwise.perf.hardware import load_device
    from shardwise.planner.topology import Cluster, ClusterDevice, cost_table

    table = cost_table(llm.spec, Cluster([ClusterDevice("client", load_device(profile), memory)]))
    return [float(t) for t in table.compute[0]]


class CollabExecutor(SynchronousExecutor):
    """The executor of a collaborative session: each step goes through the segments in order.
    A session the server no longer has (expired, or the server restarted) or a broken stream
    is a StageFailure: recover() opens a new session and the scheduler replays every sequence
    into it, so generation carries on unchanged."""

    def __init__(self, http: httpx.Client, open_session: Callable[[], dict[str, Any]], weights: Weights,
                 slowdown: float, headers: dict[str, str], timeout: float, grammars: Grammars | None = None,
                 tls: ssl.SSLContext | None = None):
        self.http, self.open_session, self.weights, self.slowdown = http, open_session, weights, slowdown
        self.tls = tls
        self.grammars = grammars
        self.num_layers, self.headers, self.timeout = weights.spec.num_layers, headers, timeout
        self.workers: dict[int, Worker] = {}
        self.stream: websocket.WebSocket | None = None
        self._start()

    def _start(self) -> None:
        """Open a session (its split may differ from the last one's), hold this side's layers of
        it (reusing those already loaded, emptied) and connect the session's stream."""
        self._close_stream()
        info = self.session = self.open_session()
        self.session_id, self.segments = info["session"], [(s["side"], *s["layers"]) for s in info["segments"]]
        loaded = {(w.shard.start, w.shard.end): w for w in self.workers.values()}
        for worker in loaded.values():
            worker.reset()
        self.workers = {k: loaded.get((a, b)) or self._worker(a, b)
                        for k, (side, a, b) in enumerate(self.segments) if side == "client"}
        self._pending = {k: {"add": [], "free": [], "rewind": []}
                         for k, s in enumerate(self.segments) if s[0] == "server"}
        if self._pending:
            base = str(self.http.base_url).replace("http", "ws", 1).rstrip("/")
            url = f"{base}/v1/collab/sessions/{self.session_id}/stream"
            try:  # (websocket-client: this thread alone reads and writes it. websockets' sync client reads in a
                # thread of its own, and two threads on one TLS connection, which OpenSSL does not allow, hung
                # about one handshake in a thousand under TLS 1.3)
                self.stream = websocket.create_connection(url, header=self.headers, timeout=self.timeout,
                                                          sslopt={"context": self.tls} if self.tls else None)
            except (OSError, websocket.WebSocketException) as e:
                raise ShardwiseError(f"cannot open the session's stream at {url} ({e})") from None

    def _close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close(timeout=1)
            self.stream = None

    def _worker(self, a: int, b: int) -> Worker:
        return Worker(ShardModel(self.weights.spec, (a, b), weights=self.weights), self.grammars)

    def recover(self, failure: StageFailure) -> list[int]:
        try:
            self._start()
        except httpx.HTTPError as e:
            raise ShardwiseError(f"the collaborative session was lost ({failure}) and no new one opens ({e}): "
                                 "is the server running?") from None
        return []

    def add(self, seq_id: int, params: SamplingParams, generated: list[int] = ()) -> None:
        for worker in self.workers.values():
            worker.add(seq_id, params, generated)
        for ops in self._pending.values():  # sent with the next step to that segment
            ops["add"].append({"seq_id": seq_id, "params": asdict(params), "generated": list(generated)})

    def free(self, seq_id: int) -> None:
        for worker in self.workers.values():
            worker.free(seq_id)
        for ops in self._pending.values():
            ops["free"].append(seq_id)

    def rewind(self, seq_id: int, length: int) -> None:
        for worker in self.workers.values():
            worker.rewind(seq_id, length)
        for ops in self._pending.values():
            ops["rewind"].append([seq_id, length])

    def run_step(self, seq_ids: list[int], chunks: list[list[int]], sample: list[bool]) -> Sampled:
        out = None
        for k, (side, a, _) in enumerate(self.segments):
            if side == "client":
                started = time.perf_counter()
                out = self.workers[k].step(seq_ids, chunks, sample, out)
                if self.slowdown > 1:  # an emulated slower device takes proportionally longer
                    time.sleep((self.slowdown - 1) * (time.perf_counter() - started))
            else:
                out = self._remote(k, seq_ids, chunks, sample, out if a > 0 else None)
        return out

    def _remote(self, k: int, seq_ids, chunks, sample, hidden: torch.Tensor | None) -> torch.Tensor | Sampled:
        ops = self._pending[k]
        try:
            self.stream.send_binary(encode(hidden, segment=k, seq_ids=seq_ids, chunks=chunks, sample=sample, **ops))
            reply = self.stream.recv()  # (the server's pings are answered inside)
        except (OSError, websocket.WebSocketException) as e:
            raise StageFailure(f"the session's stream broke ({type(e).__name__}: {e})") from None
        if isinstance(reply, str):  # an error, in the API's error body
            error = json.loads(reply)["error"]
            if error["code"] == "session_not_found":
                raise StageFailure(error["message"])
            raise ShardwiseError(f"the server refused segment {k}: {error['message']}")
        ops["add"], ops["free"], ops["rewind"] = [], [], []
        hidden, meta = decode(reply)
        if self.segments[k][2] < self.num_layers:
            return hidden
        logprobs = {int(row): TokenLogprobs(lp, [tuple(t) for t in top]) for row, (lp, top) in meta["logprobs"].items()}
        return Sampled(meta["tokens"], logprobs, {int(row): e for row, e in meta.get("errors", {}).items()})

    def describe(self) -> list[dict[str, Any]]:
        return [{"side": side, "layers": [a, b]} for side, a, b in self.segments]

    def close(self) -> None:
        self._close_stream()
        try:
            self.http.delete(f"/v1/collab/sessions/{self.session_id}")
        except httpx.HTTPError:
            pass  # the server frees it when it expires
        self.http.close()
        self.workers = {}


def tls_context(verify: bool | str | ssl.SSLContext) -> ssl.SSLContext:
    """What an https / wss connection trusts: the system's authorities, one authority's
    certificate file, a context made elsewhere, or (verify=False) anything."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=None if verify is True else verify)
    except (OSError, ssl.SSLError) as e:
        raise ShardwiseError(f"cannot read the certificate authority file {verify} ({e}): give the PEM file "
                             "that signed the server's certificate") from None


def _round_trip(http: httpx.Client, spec, repeats: int = 5) -> float:
    """Median seconds for one decode token's hidden states to the server and back."""
    payload = bytes(4 * spec.hidden_size)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        _raise_for_error(http.post("/v1/collab/echo", content=payload))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def _raise_for_error(reply: httpx.Response) -> None:
    if reply.status_code != 200:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:300]
        raise ShardwiseError(f"the server answered {reply.status_code}: {message}")


def _json(reply: httpx.Response) -> dict[str, Any]:
    _raise_for_error(reply)
    return reply.json()
