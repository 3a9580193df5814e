"""What every endpoint shares: OpenAI's error body, and reading a body within a size limit."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after_s = retry_after_s  # sent as Retry-After: when trying again may succeed

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = None if self.retry_after_s is None else {"Retry-After": str(max(1, round(self.retry_after_s)))}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


async def read_bytes(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes: send a shorter request",
                    code="request_too_large")


def invalid(e: ValidationError) -> ApiError:
    """The first problem, in words a client can act on."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    param = ".".join(loc) or None
    if err["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({err['msg']}): send a JSON object",
                        code="invalid_json")
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"'{param}' is not supported by this server: remove it from the request",
                        param=param, code="unsupported_parameter")
    if err["type"] == "missing":
        return ApiError(400, f"'{param}' is required", param=param, code="missing_parameter")
    return ApiError(400, f"'{param}': {err['msg']}" if param else err["msg"], param=param,
                    code="invalid_parameter")
