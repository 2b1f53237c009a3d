"""Errors in OpenAI's JSON shape, and the guard in front of every `vlmstack serve` route.

Every error, ours, FastAPI's (validation, bad JSON) and Starlette's (404, 405), comes back as

    {"error": {"message": "...", "type": "invalid_request_error", "param": "...", "code": "..."}}

with its status code; anything unexpected is a 500 with a short message (details go to
the log, never to the client).

`Guard`, an ASGI middleware (not BaseHTTPMiddleware, which would break streaming and
disconnect detection), for each HTTP request:
- refuses a Host header other than a loopback name when the server binds loopback (a web
  page cannot reach it by DNS rebinding) and any request a browser sent from another
  origin (CORS is off: no page of another site may use the API);
- checks `Authorization: Bearer KEY` on /v1 routes when a key is set (constant-time);
- refuses bodies over the limit, by Content-Length and by counting the streamed body,
  before the route sees any of it;
- writes one access-log line: method, path, status, latency, prompt/completion tokens.
"""

import hmac
import json
import logging
import time
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from apps.web_safety import is_loopback, public_message
from vlm.errors import VlmError

log = logging.getLogger("vlmstack.server")
access_log = logging.getLogger("vlmstack.server.access")
MAX_BODY_BYTES = 16 * 1024 * 1024  # a request body; base64 images are 4/3 of their file size

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error"}


class ApiError(Exception):
    """A request we refuse, with its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def install_error_handlers(api: FastAPI) -> None:
    """Make every error the API returns OpenAI-shaped."""

    @api.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @api.exception_handler(VlmError)
    async def vlm_error(request: Request, e: VlmError):
        return ApiError(400, public_message(str(e))).response()

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return ApiError(e.status_code, message).response()

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(error.get("type") == "json_invalid" for error in errors):
            return ApiError(400, "the request body is not valid JSON", code="invalid_json").response()
        first = max(errors, key=lambda error: len(error.get("loc", ())))  # the deepest: the union member meant
        param = _param(first.get("loc", ()))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return ApiError(400, message[:500], param=param).response()

    @api.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"internal error ({type(e).__name__}); the server log has the details").response()


def _param(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI's param: ("body", "messages", 0, "content",
    "list[tagged-union[TextPart,ImagePart]]", 0, "image_url", "image_url", "url") ->
    "messages.0.content.0.image_url.url" (no union member names, no discriminator tags)."""
    parts, skip_tag = [], False
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none")):
            skip_tag = "tagged-union" in part
            continue
        if skip_tag and isinstance(part, str):
            skip_tag = False
            continue
        parts.append(str(part))
    return ".".join(parts) or None


class Guard:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app, *, api_key: str | None, loopback_only: bool, max_body: int = MAX_BODY_BYTES):
        self.app, self.api_key, self.loopback_only, self.max_body = app, api_key, loopback_only, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                receive, refusal = await self._buffer_body(scope, receive)
            if refusal is not None:
                await refusal.response()(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            usage = scope.get("state", {}).get("usage") or (0, 0)
            access_log.info(
                "%s %s %d %.1fms prompt_tokens=%d completion_tokens=%d",
                scope["method"],
                scope["path"],
                status[0] or 499,  # nothing sent: the client left first
                (time.perf_counter() - start) * 1000,
                *usage,
            )

    def _refusal(self, scope) -> ApiError | None:
        headers = Headers(scope=scope)
        host = urlsplit(f"//{headers.get('host', '')}").hostname or ""
        if self.loopback_only and not is_loopback(host):
            return ApiError(403, "unexpected Host header: this server answers on a loopback address only")
        origin = headers.get("origin")
        if origin and urlsplit(origin).netloc != headers.get("host"):
            return ApiError(403, "cross-origin requests are refused (CORS is off)")
        if self.api_key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return ApiError(413, f"the request body is over {self.max_body:,} bytes", code="body_too_large")
        return None

    async def _buffer_body(self, scope, receive):
        """Read the whole body (refusing it once it passes the limit) and replay it to the
        app; later receives (the disconnect) go to the client's stream."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return receive, None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive, ApiError(400, "the client went away")
            size += len(message.get("body", b""))
            if size > self.max_body:
                return receive, ApiError(
                    413, f"the request body is over {self.max_body:,} bytes", code="body_too_large"
                )
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), [False]

        async def replay():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None
