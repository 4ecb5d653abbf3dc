"""Give memory back to the system once big uploads have been served.

A 10-minute upload passes through several large buffers (the body, the decoded and resampled
audio); Python and numpy free them, but glibc's malloc keeps freed heap pages for reuse, and it
serves allocations of up to 32 MB from the heap once a freed mmapped block has raised its mmap
threshold. Measured (bench/server_load.py): after a burst of large uploads RSS stayed hundreds
of MB above its idle level for good. `malloc_trim(0)` hands the free pages back.

`TrimWhenIdle` counts the HTTP requests in flight; when the last one ends and the uploads since
the previous trim add up to `threshold` bytes, it trims on a worker thread. Never in the middle
of work (a request's audio is alive until its response is sent), and not after small requests.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send


def _malloc_trim() -> Callable[[], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class MemoryKeeper:
    """Upload bytes since the last trim, requests in flight, and the trim itself."""

    def __init__(self, threshold: int = 16 * 1024 * 1024, enabled: bool = True):
        self.threshold = threshold
        self.pending = 0  # upload bytes received since the last trim
        self.in_flight = 0
        self.trims = 0
        self._trim = _malloc_trim() if enabled else None
        self._task: asyncio.Future | None = None

    def note(self, nbytes: int) -> None:
        self.pending += nbytes

    def _trim_now(self) -> None:
        self._trim()
        self.trims += 1

    def request_ended(self) -> None:
        if self.in_flight or self.pending < self.threshold or self._trim is None:
            return
        if self._task is not None and not self._task.done():
            return  # one trim at a time; the bytes stay pending for the next idle moment
        self.pending = 0
        self._task = asyncio.ensure_future(asyncio.to_thread(self._trim_now))


class TrimWhenIdle:
    """ASGI middleware: tells the keeper when HTTP requests start and end."""

    def __init__(self, app: ASGIApp, keeper: MemoryKeeper):
        self.app, self.keeper = app, keeper

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.keeper.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.keeper.in_flight -= 1
            self.keeper.request_ended()
