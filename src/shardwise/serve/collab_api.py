"""The collaborative endpoints: open a session (the server picks the split), run its server
segments on hidden states (safetensors in, safetensors out: one POST per segment, or one
binary WebSocket message each on the session's stream, as the client does), close it; and
an echo the client times its round trip with. Same API key, limits and error body as /v1;
on the stream an error is a text message with that body, and the stream stays open."""

from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from shardwise.collab.wire import MAX_HIDDEN_BYTES, MEDIA_TYPE, WireError, metadata
from shardwise.errors import ShardwiseError
from shardwise.serve.async_engine import AsyncEngine, EngineError
from shardwise.serve.collab_host import CollabHost, ServerBusy, SessionGone
from shardwise.serve.http import ApiError, read_bytes


def add_collab_routes(app: FastAPI, engine: AsyncEngine, host: CollabHost, authorize, read_session_request) -> None:
    auth = [Depends(authorize)]

    @app.post("/v1/collab/sessions", dependencies=auth)
    async def open_session(request: Request) -> JSONResponse:
        body = await read_session_request(request)
        c = body.client
        wait = engine.step_s if engine.llm.has_work else 0.0
        try:
            return JSONResponse(await engine.call(lambda: host.open(
                c.layer_seconds, c.memory_bytes, c.rtt_s, body.sla_s, body.policy, body.insist, wait)))
        except ShardwiseError as e:
            raise ApiError(422, str(e), param="sla_s", code="split_impossible") from None

    async def run(session_id: str, segment: int, body: bytes) -> bytes:
        try:
            return await engine.call(lambda: host.run(session_id, segment, body))
        except SessionGone as e:
            raise ApiError(404, str(e), code="session_not_found") from None
        except ServerBusy as e:
            raise ApiError(503, str(e), kind="server_error", code="server_busy", retry_after_s=1) from None
        except EngineError as e:  # on the stream too, not only as the app's 503
            raise ApiError(503, str(e), kind="server_error") from None
        except ShardwiseError as e:  # a malformed message, or a step the model refuses
            raise ApiError(400, str(e), code="invalid_tensor" if isinstance(e, WireError) else None) from None
        except Exception as e:  # the step itself failed: said in band, the stream stays open
            raise ApiError(500, f"the segment failed on the server ({type(e).__name__}: {e})",
                           kind="server_error", code="segment_failed") from None

    @app.post("/v1/collab/sessions/{session_id}/segments/{segment}", dependencies=auth)
    async def run_segment(session_id: str, segment: int, request: Request) -> Response:
        return Response(await run(session_id, segment, await read_bytes(request, MAX_HIDDEN_BYTES)),
                        media_type=MEDIA_TYPE)

    @app.websocket("/v1/collab/sessions/{session_id}/stream")
    async def stream(websocket: WebSocket, session_id: str) -> None:
        """Each binary message: a segment request whose metadata also names its "segment"."""
        try:
            authorize(websocket)
        except ApiError:
            await websocket.close(code=1008, reason="missing or wrong API key")
            return
        await websocket.accept()
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    body = message.get("bytes")
                    if body is None:
                        raise ApiError(400, "each stream message is a binary safetensors message, not text",
                                       code="invalid_tensor")
                    await websocket.send_bytes(await run(session_id, segment_of(body), body))
                except ApiError as e:  # answered in band: the stream stays open
                    await websocket.send_json(e.body())
        except WebSocketDisconnect:
            pass

    @app.delete("/v1/collab/sessions/{session_id}", dependencies=auth)
    async def close_session(session_id: str) -> JSONResponse:
        try:
            await engine.call(lambda: host.close(session_id))
        except SessionGone as e:
            raise ApiError(404, str(e), code="session_not_found") from None
        return JSONResponse({"closed": session_id})

    @app.post("/v1/collab/echo", dependencies=auth)
    async def echo(request: Request) -> Response:
        return Response(await read_bytes(request, MAX_HIDDEN_BYTES), media_type="application/octet-stream")


def segment_of(body: bytes) -> int:
    try:
        segment = metadata(body).get("segment")
    except WireError as e:
        raise ApiError(400, str(e), code="invalid_tensor") from None
    if type(segment) is not int:
        raise ApiError(400, "a stream message needs the segment's index as the integer 'segment' in its metadata",
                       code="invalid_tensor")
    return segment


async def expire_sessions(engine: AsyncEngine, host: CollabHost) -> None:
    """Close idle sessions (freeing their KV) a few times per TTL."""
    while True:
        await asyncio.sleep(min(host.ttl_s / 4, 5.0))
        await engine.call(host.expire)
