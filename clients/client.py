"""`Client` and `AsyncClient` for the snac-dit server (httpx + numpy only).

from clients import Client
with Client("http://127.0.0.1:8000") as c:
    r = c.continue_("song.wav", steps="16,12,8,8", seed=7)
    r.save("next.wav")
    for chunk in c.extend_stream("song.wav", chunks=5):
        play(chunk.audio, chunk.sample_rate)

Both classes only send: what each endpoint is sent and how its reply is read is in
`clients.endpoints`, shared by the two.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from clients import endpoints
from clients.endpoints import AudioInput, Chunk, PerLevel, Result, Sampling, join_chunks
from clients.errors import ConnectionFailed

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+; only type checkers read the annotations
    from typing_extensions import Unpack

# The public names, with those now defined in clients.endpoints: all were importable from here.
__all__ = ["AsyncClient", "AudioInput", "Chunk", "Client", "DEFAULT_TIMEOUT", "PerLevel",
           "Result", "Sampling", "join_chunks", "normalize_url"]

# A continuation takes seconds on a GPU and much longer on CPU or behind a queue.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


def normalize_url(base_url: str) -> str:
    """'localhost:8000' or '127.0.0.1:8000' -> 'http://...': a bare host:port means plain HTTP
    (httpx would otherwise read 'localhost' as a URL scheme)."""
    url = base_url.strip()
    if not url:
        raise ValueError("empty server URL")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"server URL {base_url!r}: only http:// and https:// are supported")
    return url.rstrip("/")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _unreachable(base_url, req: endpoints.Request, e: Exception) -> ConnectionFailed:
    return ConnectionFailed(
        f"could not reach the snac-dit server at {base_url} ({req.method} {req.path}: "
        f"{type(e).__name__}: {e or 'no detail'}). Is it running there? Start one with "
        "`make serve`, or point at yours with --url / SNAC_DIT_URL."
    )


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport=None,
    ):
        self._http = httpx.Client(
            base_url=normalize_url(base_url), headers=_headers(api_key), timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, req: endpoints.Request) -> Any:
        try:
            resp = self._http.request(req.method, req.path, params=req.params, files=req.files)
        except httpx.TransportError as e:
            raise _unreachable(self._http.base_url, req, e) from e
        return req.parse(resp)

    def _stream(self, req: endpoints.Request) -> Iterator[Chunk]:
        try:
            with self._http.stream(
                req.method, req.path, params=req.params, files=req.files
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()  # the error is in the body, which a stream reads only on demand
                    endpoints.check(resp)
                seed, params = int(resp.headers["x-seed"]), endpoints.ran(resp.headers)
                for line in resp.iter_lines():
                    if line.strip():
                        chunk = endpoints.parse_line(line, seed, params)
                        if chunk is None:
                            return
                        yield chunk
        except httpx.TransportError as e:
            raise _unreachable(self._http.base_url, req, e) from e
        raise endpoints.truncated_stream()

    def health(self) -> dict:
        return self._call(endpoints.HEALTH)

    def ready(self) -> bool:
        return self._call(endpoints.READY)

    def info(self) -> dict:
        return self._call(endpoints.INFO)

    def actions(self) -> list[dict]:
        """The model's style actions as /info lists them ([] for a model without them): each
        with its measured description (None until described) and whether it has an example."""
        return self.info()["engine"]["style"]["actions"]

    def action_example(self, action: int) -> bytes:
        """The OGG of the chunk that selects style action k most strongly."""
        return self._call(endpoints.action_example(action))

    def continue_(self, audio: AudioInput, *, sample_rate: int | None = None,
                  include_input: bool = False, **sampling: Unpack[Sampling]) -> Result:
        """6.144 s continuing `audio` (a path, file bytes, or a float array with sample_rate).
        Sampling keywords: steps, temperature, top_p, guidance, gumbel, confidence, seed (see
        `Sampling`)."""
        return self._call(endpoints.continue_(audio, sample_rate, include_input, sampling))

    def extend(self, audio: AudioInput, chunks: int, *, sample_rate: int | None = None,
               include_input: bool = False, **sampling: Unpack[Sampling]) -> Result:
        """`chunks` chained continuations as one WAV."""
        return self._call(endpoints.extend(audio, chunks, sample_rate, include_input, sampling))

    def extend_stream(self, audio: AudioInput, chunks: int, *, sample_rate: int | None = None,
                      include_input: bool = False,
                      **sampling: Unpack[Sampling]) -> Iterator[Chunk]:
        """Yield each chunk as soon as the server has generated it."""
        # A generator itself, so that nothing (not even reading the file) happens until iterated.
        req = endpoints.extend(audio, chunks, sample_rate, include_input, sampling, stream=True)
        yield from self._stream(req)

    def analyze(self, audio: AudioInput, *, sample_rate: int | None = None) -> dict:
        """Tempo (BPM), beats and downbeats (seconds), beats_per_bar, time_signature and key of
        `audio`; `UnprocessableInput` (no_steady_beat) when it has no steady beat."""
        return self._call(endpoints.analyze(audio, sample_rate))

    def inpaint(self, audio: AudioInput, start: float | None = None, end: float | None = None, *,
                start_bar: int | None = None, bars: int | None = None,
                start_beat: int | None = None, beats: int | None = None,
                sample_rate: int | None = None, **sampling: Unpack[Sampling]) -> Result:
        """The whole input with [start, end) seconds regenerated from what surrounds it; or
        `bars` bars from bar `start_bar`, or `beats` beats from beat `start_beat` (numbered from
        1, on the grid `analyze` finds). Sampling keywords as for `continue_` (steps, ..., seed)."""
        return self._call(endpoints.inpaint(audio, start, end, sample_rate, sampling, start_bar,
                                            bars, start_beat, beats))

    def loop(self, audio: AudioInput, *, bars: int | None = None, sample_rate: int | None = None,
             **sampling: Unpack[Sampling]) -> Result:
        """The input plus a 6.144 s bridge back into its start: play the result on repeat. With
        `bars`, the loop is that many whole bars from the input's first downbeat."""
        return self._call(endpoints.loop(audio, sample_rate, sampling, bars))

    def vary(self, audio: AudioInput, *, keep: str = "A", start: float | None = None,
             sample_rate: int | None = None, **sampling: Unpack[Sampling]) -> Result:
        """The whole input with the chunk at `start` (default: the last whole one) regenerated
        above its kept coarse levels (keep "A" or "AB"), or everything but a window around each
        beat (keep "beats")."""
        return self._call(endpoints.vary(audio, keep, start, sample_rate, sampling))


class AsyncClient:
    """The same API as `Client`, awaitable (`extend_stream` is an async iterator)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport=None,
    ):
        self._http = httpx.AsyncClient(
            base_url=normalize_url(base_url), headers=_headers(api_key), timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, req: endpoints.Request) -> Any:
        try:
            resp = await self._http.request(
                req.method, req.path, params=req.params, files=req.files
            )
        except httpx.TransportError as e:
            raise _unreachable(self._http.base_url, req, e) from e
        return req.parse(resp)

    async def _stream(self, req: endpoints.Request) -> AsyncIterator[Chunk]:
        try:
            async with self._http.stream(
                req.method, req.path, params=req.params, files=req.files
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    endpoints.check(resp)
                seed, params = int(resp.headers["x-seed"]), endpoints.ran(resp.headers)
                async for line in resp.aiter_lines():
                    if line.strip():
                        chunk = endpoints.parse_line(line, seed, params)
                        if chunk is None:
                            return
                        yield chunk
        except httpx.TransportError as e:
            raise _unreachable(self._http.base_url, req, e) from e
        raise endpoints.truncated_stream()

    async def health(self) -> dict:
        return await self._call(endpoints.HEALTH)

    async def ready(self) -> bool:
        return await self._call(endpoints.READY)

    async def info(self) -> dict:
        return await self._call(endpoints.INFO)

    async def actions(self) -> list[dict]:
        return (await self.info())["engine"]["style"]["actions"]

    async def action_example(self, action: int) -> bytes:
        return await self._call(endpoints.action_example(action))

    async def continue_(self, audio: AudioInput, *, sample_rate: int | None = None,
                        include_input: bool = False, **sampling: Unpack[Sampling]) -> Result:
        return await self._call(endpoints.continue_(audio, sample_rate, include_input, sampling))

    async def extend(self, audio: AudioInput, chunks: int, *, sample_rate: int | None = None,
                     include_input: bool = False, **sampling: Unpack[Sampling]) -> Result:
        req = endpoints.extend(audio, chunks, sample_rate, include_input, sampling)
        return await self._call(req)

    async def extend_stream(self, audio: AudioInput, chunks: int, *,
                            sample_rate: int | None = None, include_input: bool = False,
                            **sampling: Unpack[Sampling]) -> AsyncIterator[Chunk]:
        req = endpoints.extend(audio, chunks, sample_rate, include_input, sampling, stream=True)
        async for chunk in self._stream(req):
            yield chunk

    async def analyze(self, audio: AudioInput, *, sample_rate: int | None = None) -> dict:
        return await self._call(endpoints.analyze(audio, sample_rate))

    async def inpaint(self, audio: AudioInput, start: float | None = None, end: float | None = None, *,
                      start_bar: int | None = None, bars: int | None = None,
                      start_beat: int | None = None, beats: int | None = None,
                      sample_rate: int | None = None, **sampling: Unpack[Sampling]) -> Result:
        return await self._call(endpoints.inpaint(audio, start, end, sample_rate, sampling,
                                                  start_bar, bars, start_beat, beats))

    async def loop(self, audio: AudioInput, *, bars: int | None = None,
                   sample_rate: int | None = None, **sampling: Unpack[Sampling]) -> Result:
        return await self._call(endpoints.loop(audio, sample_rate, sampling, bars))

    async def vary(self, audio: AudioInput, *, keep: str = "A", start: float | None = None,
                   sample_rate: int | None = None, **sampling: Unpack[Sampling]) -> Result:
        return await self._call(endpoints.vary(audio, keep, start, sample_rate, sampling))
