"""The OpenAI-compatible HTTP API: chat and text completions (plain or streamed as
server-sent events), models, health and Prometheus metrics.

Every mistake a client can make gets a 4xx with OpenAI's error body
({"error": {"message", "type", "param", "code"}}) and the server keeps serving. The work
one request may ask for is bounded (ServerLimits), and tokenising and chat templates run
off the event loop, so no request holds up another's stream.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from shardwise.engine.sampling import SamplingParams, TokenLogprobs
from shardwise.engine.scheduler import Sequence
from shardwise.engine.structured import Constraint
from shardwise.errors import ShardwiseError
from shardwise.llm import LLM
from shardwise.perf.query import EstimateQuery
from shardwise.serve.async_engine import AsyncEngine, EngineError, Event, Overloaded, RequestFailed
from shardwise.serve.collab_api import add_collab_routes, expire_sessions
from shardwise.serve.collab_host import DEFAULT_TTL_S, CollabHost
from shardwise.serve.dashboard_api import PlanQuery, add_dashboard_routes
from shardwise.serve.http import ApiError, invalid, read_bytes
from shardwise.serve.limits import ServerLimits
from shardwise.serve.metrics import Metrics
from shardwise.serve.protocol import (
    ChatCompletionRequest,
    CollabSessionRequest,
    CompletionRequest,
    GenerationRequest,
)
from shardwise.serve.tools import ToolCallParser, chat_messages, split_reply, tool_constraint


def create_app(llm: LLM, *, api_key: str | None = None, limits: ServerLimits | None = None,
               collab_ttl_s: float = DEFAULT_TTL_S) -> FastAPI:
    """An app serving `llm`; its engine (app.state.engine) must be run by the caller and is
    stopped when the app shuts down. With api_key, /v1 needs `Authorization: Bearer <api_key>`."""
    limits = limits or ServerLimits()
    metrics = Metrics(llm.name)
    engine = AsyncEngine(llm, metrics, limits.max_waiting, limits.max_queue_time_s)
    collab = CollabHost(llm, metrics, collab_ttl_s)
    spec = llm.spec

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        expiry = asyncio.create_task(expire_sessions(engine, collab))
        yield
        expiry.cancel()
        engine.stop()

    app = FastAPI(title="shardwise", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    # --- errors ---------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError) -> JSONResponse:
        return engine_api_error(e).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), code=str(e.status_code)).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return api_key is None or hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    def authorize(request: Request) -> None:
        if not authorized(request):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request, model: type[GenerationRequest | CollabSessionRequest]) -> Any:
        try:
            parsed = model.model_validate_json(await read_bytes(request, limits.max_body_bytes))
        except ValidationError as e:
            raise invalid(e) from None
        if parsed.model != llm.name:
            raise ApiError(404, f"the model '{parsed.model}' does not exist on this server: use '{llm.name}' "
                                f"(GET /v1/models lists it)", param="model", code="model_not_found")
        return parsed

    # --- endpoints --------------------------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Whether the server is healthy, and whether /v1 needs a key (a 401 says so anyway; the
        dashboard asks for the key on it); with the key, also where its stages run."""
        healthy = engine.running and not engine.draining
        body: dict[str, Any] = {"status": "ok" if healthy else "error", "api_key_required": api_key is not None}
        if authorized(request):
            body |= {"stages": llm.stages(), "recoveries": llm.load().recoveries, "collab": collab.stats()}
            if not healthy:
                body["error"] = engine.failure or "the server is shutting down"
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.post("/v1/plan", dependencies=[Depends(authorize)])
    async def move(request: Request) -> dict[str, Any]:
        """Move the stages to a new plan (a plan file's JSON) while serving: the new stages load
        beside the old, then the running requests move over with their KV; /health shows the
        stages once they did."""
        try:
            plan = json.loads(await read_bytes(request, limits.max_body_bytes))
        except ValueError as e:  # (not JSON, or not text)
            raise ApiError(400, f"the body is not JSON: {e}") from None
        try:
            await engine.call(lambda: llm.move_to(plan))
        except ShardwiseError as e:
            raise ApiError(400, str(e)) from None
        return {"status": "moving", "plan": plan}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.export(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        card = {"id": llm.name, "object": "model", "created": int(time.time()), "owned_by": "shardwise",
                "max_model_len": spec.context_length}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
        if len(body.messages) > limits.max_messages:  # refused before the template runs over them
            raise ApiError(400, f"this chat has {len(body.messages)} messages, more than this server's limit of "
                                f"{limits.max_messages}: shorten the conversation", param="messages",
                           code="too_many_messages")
        try:
            tools = tool_constraint(body)
        except ValueError as e:
            raise ApiError(400, str(e), param="tool_choice") from None
        messages, native_tools = chat_messages(body, llm.tokenizer.renders_tools)
        try:
            prompt = await run_in_threadpool(llm.chat_ids, messages, native_tools)
        except ShardwiseError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await generate(request, body, [prompt], chat=True, constraint=tools)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await read_body(request, CompletionRequest)
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ApiError(400, "the prompt is empty: give at least one token of text", param="prompt")
        check_sequences(len(prompts) * body.n, "prompt")
        try:
            ids = await run_in_threadpool(lambda: [llm.prompt_ids(p) for p in prompts])
        except ShardwiseError as e:
            raise ApiError(400, str(e), param="prompt") from None
        return await generate(request, body, ids, chat=False)

    # --- limits ---------------------------------------------------------------------------------
    def check_sequences(count: int, where: str) -> None:
        if count > limits.max_request_sequences:
            raise ApiError(400, f"this request asks for {count} sequences (prompts x n), more than this server's "
                                f"limit of {limits.max_request_sequences}: split it into several requests",
                           param=where, code="too_many_sequences")

    def too_many_tokens(tokens: int, where: str) -> ApiError:
        return ApiError(400, f"this request needs {tokens} tokens (prompts and max_tokens over all its choices), "
                             f"more than this server's limit of {limits.max_request_tokens}: lower n or max_tokens, "
                             "shorten the prompt, or split the request", param=where, code="request_too_large")

    # --- generation -------------------------------------------------------------------------------
    async def output_rules(body: GenerationRequest, tools: Constraint | None) -> tuple[Constraint | None, Any]:
        """The grammar (compiled here first: an invalid one is a 400 naming why) and the logit
        biases a request's output follows; tools: the grammar of its tool calls, if any."""
        try:
            asked, bias = body.constraint(), body.bias()
        except ValueError as e:
            raise ApiError(400, str(e), param="response_format") from None
        if tools and asked:
            raise ApiError(400, "a reply cannot follow both tools and a response format: drop one, or set "
                                "tool_choice to 'none'", param="response_format")
        constraint = tools or asked
        beyond = [t for t in bias or () if t >= spec.vocab_size]
        if beyond:
            raise ApiError(400, f"logit_bias names token {beyond[0]}, beyond this model's vocabulary of "
                                f"{spec.vocab_size}", param="logit_bias")
        if constraint is not None:
            try:
                await run_in_threadpool(llm.grammars.compile, constraint)
            except ShardwiseError as e:
                raise ApiError(400, str(e), param="response_format", code="invalid_response_format") from None
        return constraint, bias

    async def generate(request: Request, body: GenerationRequest, prompts: list[list[int]], chat: bool,
                       constraint: Constraint | None = None) -> Response:
        where = "messages" if chat else "prompt"
        check_sequences(len(prompts) * body.n, where)
        rules = await output_rules(body, constraint)
        choices = _choices(body, prompts, spec.context_length, limits.default_max_tokens, chat, rules)
        tokens = sum(len(ids) + params.max_tokens for ids, params in choices)
        if tokens > limits.max_request_tokens:
            raise too_many_tokens(tokens, where)
        try:
            seqs = [llm.new_sequence(ids, params, body.priority) for ids, params in choices]
        except ShardwiseError as e:
            raise ApiError(400, str(e), param="max_tokens") from None
        reply = _Reply(body, prompts, seqs, chat, llm.token_text)
        events = engine.stream(seqs)
        if body.stream:  # the first event is awaited here, so a request refused before it runs gets a status
            first = await _until_disconnect(request, anext(events))
            return StreamingResponse(_sse(reply, _prepend(first, events)), media_type="text/event-stream")
        await _until_disconnect(request, _consume(events))
        return JSONResponse(reply.whole())

    add_collab_routes(app, engine, collab, authorize, lambda request: read_body(request, CollabSessionRequest))
    add_dashboard_routes(app, llm, engine, metrics, authorize)
    declare_bodies(app, {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                         "/v1/collab/sessions": CollabSessionRequest, "/v1/dashboard/estimate": EstimateQuery,
                         "/v1/dashboard/plan": PlanQuery})
    return app


def engine_api_error(e: EngineError) -> ApiError:
    """The status a client sees for an engine error: 503 with Retry-After when not taken now,
    500 when this request alone failed, 503 when the engine failed under it."""
    if isinstance(e, Overloaded):
        return ApiError(503, str(e), kind="server_error", code="server_overloaded", retry_after_s=e.retry_after_s)
    if isinstance(e, RequestFailed):
        return ApiError(500, str(e), kind="server_error", code="request_failed")
    return ApiError(503, str(e), kind="server_error")


def declare_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Declare the JSON bodies that the endpoints read themselves (to bound their size and answer in
    OpenAI's error format) in /openapi.json, so clients and API fuzzers see the schemas."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in bodies.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _choices(body: GenerationRequest, prompts: list[list[int]], context: int, default_max_tokens: int,
             chat: bool, rules: tuple[Constraint | None, dict[int, float] | None]
             ) -> list[tuple[list[int], SamplingParams]]:
    """n (prompt, SamplingParams) per prompt; a request that cannot fit the context is refused
    here, like OpenAI does."""
    where = "messages" if chat else "prompt"
    asked, logprobs = body.requested_max_tokens(), body.requested_logprobs()
    choices = []
    for ids in prompts:
        if len(ids) >= context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens, but the {where} has "
                                f"{len(ids)}: shorten it", param=where, code="context_length_exceeded")
        if asked is not None and len(ids) + asked > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens, but you requested "
                                f"{len(ids) + asked} ({len(ids)} in the {where}, {asked} to generate): lower "
                                f"max_tokens or shorten the {where}", param="max_tokens",
                           code="context_length_exceeded")
        max_tokens = asked or min(context - len(ids), default_max_tokens)
        for choice in range(body.n):
            try:
                choices.append((ids, body.sampling(max_tokens, choice, logprobs, *rules)))
            except ShardwiseError as e:
                raise ApiError(400, str(e)) from None
    return choices


class _Reply:
    """Builds OpenAI's response bodies for one request's sequences (choice i = sequence i)."""

    def __init__(self, body: GenerationRequest, prompts: list[list[int]], seqs: list[Sequence], chat: bool,
                 token_text):
        self.body, self.prompts, self.seqs, self.chat, self.token_text = body, prompts, seqs, chat, token_text
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def envelope(self, choices: list[dict], object_suffix: str = "") -> dict:
        return {"id": self.id, "object": self.object + object_suffix, "created": self.created,
                "model": self.body.model, "choices": choices}

    def usage(self) -> dict:
        prompt = sum(map(len, self.prompts))
        completion = sum(len(s.output.token_ids) for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @property
    def tools(self) -> bool:
        """Whether replies may hold tool calls, parsed out of their text."""
        return self.chat and self.body.calling_tools

    def whole(self) -> dict:
        choices = []
        for i, seq in enumerate(self.seqs):
            out = seq.output
            logprobs = self.logprobs(out.token_ids, out.logprobs) if seq.params.logprobs is not None else None
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": out.text}
                finish = out.finish_reason
                if self.tools:
                    message["content"], calls = split_reply(out.text)
                    if calls:
                        message["tool_calls"] = calls
                        finish = "tool_calls" if finish == "stop" else finish
                choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": out.text, "logprobs": logprobs,
                                "finish_reason": out.finish_reason})
        return self.envelope(choices) | {"usage": self.usage()}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False,
              logprobs: dict | None = None, tool_call: tuple[int, dict] | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            if tool_call is not None:
                delta = {"tool_calls": [{"index": tool_call[0], **tool_call[1]}]}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return self.envelope([choice], ".chunk" if self.chat else "")

    def logprobs(self, tokens: list[int], values: list[TokenLogprobs]) -> dict:
        text = self.token_text
        if self.chat:
            content = [{"token": text(t), "logprob": v.logprob, "bytes": list(text(t).encode()),
                        "top_logprobs": [{"token": text(a), "logprob": lp, "bytes": list(text(a).encode())}
                                         for a, lp in v.top]}
                       for t, v in zip(tokens, values, strict=True)]
            return {"content": content}
        return {"tokens": [text(t) for t in tokens], "token_logprobs": [v.logprob for v in values],
                "top_logprobs": [{text(a): lp for a, lp in v.top} for v in values]}


async def _sse(reply: _Reply, events: AsyncIterator[Event]) -> AsyncIterator[str]:
    """OpenAI's stream: a chunk per new text, a last chunk per choice with its finish reason,
    the usage when asked for, then [DONE]."""
    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    parsers = [ToolCallParser() for _ in reply.seqs] if reply.tools else None
    try:
        if reply.chat:
            for i in range(len(reply.seqs)):
                yield data(reply.chunk(i, "", role=True))
        async for e in events:
            logprobs = None
            if e.logprobs is not None:
                logprobs = reply.logprobs([e.token], [e.logprobs])
            text, calls = parsers[e.index].feed(e.text) if parsers and e.text else (e.text, [])
            if text or logprobs:
                yield data(reply.chunk(e.index, text, logprobs=logprobs))
            for k, call in enumerate(calls, parsers[e.index].calls - len(calls) if calls else 0):
                yield data(reply.chunk(e.index, None, tool_call=(k, call)))  # the whole call in one delta
            if e.finished:
                finish = e.seq.output.finish_reason
                if parsers:
                    if rest := parsers[e.index].finish():
                        yield data(reply.chunk(e.index, rest))
                    finish = "tool_calls" if parsers[e.index].calls and finish == "stop" else finish
                yield data(reply.chunk(e.index, None, finish_reason=finish))
        if reply.body.include_usage:
            yield data(reply.envelope([], ".chunk" if reply.chat else "") | {"usage": reply.usage()})
        yield "data: [DONE]\n\n"
    except EngineError as e:
        yield data(engine_api_error(e).body())
    finally:
        await events.aclose()  # a client that left aborts its sequences here


async def _prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    try:
        async for event in rest:
            yield event
    finally:
        await rest.aclose()


async def _consume(events: AsyncIterator[Event]) -> None:
    async for _ in events:
        pass


async def _until_disconnect(request: Request, work) -> None:
    """Await work, cancelling it (which aborts its sequences) if the client goes away."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ApiError(499, "the client closed the connection", kind="client_closed")

