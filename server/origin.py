"""Refuse cross-origin requests that spend the server's compute, unless their origin is allowed.

CORS alone does not protect a POST endpoint: a browser sends a cross-origin *simple* request
(a multipart form POST) without a preflight, the server runs the model, and only reading the
answer is blocked. So any web page could make its visitors' browsers spend this server's GPU.
This guard answers such requests with 403 before they reach a route: a request whose `Origin`
header is neither this server's own (the page it serves is same-origin, so it keeps working)
nor one of `SNAC_DIT_CORS_ORIGINS` ("*" allows every origin). Requests without an `Origin`
(curl, the Python client, server-to-server) are not browser cross-origin requests and pass.
GET/HEAD/OPTIONS pass too: they change nothing and OPTIONS is CORS's own preflight.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class CrossOriginGuard:
    def __init__(self, app: ASGIApp, allowed_origins: list[str]):
        self.app = app
        self.allow_all = "*" in allowed_origins
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}

    def allows(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if self.allow_all or origin in self.allowed:
            return True
        # Same origin: the Origin's host:port is the Host the request was sent to. (The scheme
        # is not compared: behind a TLS-terminating proxy the page is https, the app sees http.)
        netloc = urlsplit(origin).netloc
        return bool(host) and bool(netloc) and netloc == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = dict(scope["headers"])
            origin = headers.get(b"origin")
            host = headers.get(b"host")
            if origin is not None and not self.allows(
                origin.decode("latin-1"), host.decode("latin-1") if host else None
            ):
                response = JSONResponse(
                    {
                        "error": "cross_origin_forbidden",
                        "detail": f"requests from origin {origin.decode('latin-1')!r} are not "
                        "allowed here; the server's operator can allow it with "
                        "SNAC_DIT_CORS_ORIGINS",
                    },
                    status_code=403,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
