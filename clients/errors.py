"""Typed errors: one class per failure a caller may want to handle differently."""

from __future__ import annotations


class SnacDitError(Exception):
    """Base of everything this client raises."""


class ConnectionFailed(SnacDitError):
    """The server could not be reached, or the connection broke mid-request."""


class ApiError(SnacDitError):
    """The server answered with an error: `status`, machine-readable `code`, human `detail`."""

    def __init__(
        self, status: int | None, code: str, detail: str, retry_after: float | None = None
    ):
        super().__init__(f"{status or 'stream'} {code}: {detail}")
        self.status, self.code, self.detail, self.retry_after = status, code, detail, retry_after


class BadRequest(ApiError):  # 400: undecodable, empty or non-finite audio
    pass


class Unauthorized(ApiError):  # 401: API key missing or wrong
    pass


class PayloadTooLarge(ApiError):  # 413: the upload is over the server's limit
    pass


class UnsupportedMediaType(ApiError):  # 415
    pass


class InvalidParameter(ApiError):  # 422: a parameter (named in detail), or audio too short
    pass


class Overloaded(ApiError):  # 429: queue full; retry after `retry_after` seconds
    pass


class Unavailable(ApiError):  # 503: engine fault, not ready, or shutting down; retry later
    pass


class ServerError(ApiError):  # any other status
    pass


class StreamError(ApiError):
    """An error reported inside an /extend stream, after some chunks had arrived."""


_BY_STATUS = {
    400: BadRequest,
    401: Unauthorized,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidParameter,
    429: Overloaded,
    503: Unavailable,
}


def error_for(status: int, body: bytes, retry_after: str | None) -> ApiError:
    import json

    try:
        payload = json.loads(body)
        code, detail = str(payload["error"]), str(payload["detail"])
    except (ValueError, KeyError, TypeError):
        code, detail = f"http_{status}", body[:200].decode("utf-8", "replace")
    try:
        wait = float(retry_after) if retry_after is not None else None
    except ValueError:
        wait = None
    return _BY_STATUS.get(status, ServerError)(status, code, detail, wait)
