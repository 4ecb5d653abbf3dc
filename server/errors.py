"""Every error the API returns, and the one place exceptions become HTTP responses.

The wire shape is always `{"error": code, "detail": message}`; `code` is stable and
machine-readable, `detail` is for humans.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from audio import AudioError

log = logging.getLogger("server")


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None, headers: dict | None = None):
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def payload(self) -> dict:
        return {"error": self.code, "detail": self.detail}


class BadAudio(ApiError):
    status, code = 400, "bad_audio"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class RequestTimeout(ApiError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class InvalidParameter(ApiError):
    status, code = 422, "invalid_parameter"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class QueueFull(ApiError):
    status, code = 429, "queue_full"

    def __init__(self, detail: str, retry_after: int = 1):
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class Unavailable(ApiError):
    """The engine failed or is not there; the request may succeed if retried."""

    status, code = 503, "unavailable"

    def __init__(self, detail: str, *, code: str | None = None, retry_after: int = 1):
        super().__init__(detail, code=code, headers={"Retry-After": str(retry_after)})


class ClientGone(Exception):
    """The client disconnected while its work waited; nobody is left to answer."""


def error_payload(exc: BaseException) -> tuple[int, dict, dict]:
    """(status, body, headers) for any exception: used by the handlers and inside streams."""
    if isinstance(exc, ApiError):
        return exc.status, exc.payload(), exc.headers
    if isinstance(exc, AudioError):
        return 400, {"error": getattr(exc, "code", "bad_audio"), "detail": str(exc)}, {}
    log.error("unhandled error", exc_info=exc)
    return 500, {"error": "internal_error", "detail": "internal server error"}, {}


def install_error_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        status, body, headers = error_payload(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            field = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{field}: {e.get('msg')}")
        return JSONResponse(
            {"error": "invalid_parameter", "detail": "; ".join(parts)}, status_code=422
        )

    app.add_exception_handler(ApiError, on_error)
    app.add_exception_handler(AudioError, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_error)
