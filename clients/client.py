"""`Client` and `AsyncClient` for the snac-dit server (httpx + numpy only).

from clients import Client
with Client("http://127.0.0.1:8000") as c:
    r = c.continue_("song.wav", steps="16,12,8,8", seed=7)
    r.save("next.wav")
    for chunk in c.extend_stream("song.wav", chunks=5):
        play(chunk.audio, chunk.sample_rate)
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from clients.errors import ConnectionFailed, StreamError, error_for
from clients.wav import decode_wav, encode_wav

# A continuation takes seconds on a GPU and much longer on CPU or behind a queue.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
AudioInput = str | os.PathLike | bytes | np.ndarray
PerLevel = int | float | str | Sequence[int | float] | None


@dataclass
class Result:
    """A WAV from /continue or /extend, decoded, with the parameters the server reports."""

    wav: bytes
    audio: np.ndarray  # float32 (T,) mono
    sample_rate: int
    seed: int
    params: dict[str, str] = field(default_factory=dict)  # steps, temperature, top_p,
    #                                                        guidance, gumbel, confidence
    input_samples: int | None = None  # with include_input: where the continuation starts
    #                                   (/loop: where the bridge starts)
    edit: dict[str, int | str] = field(default_factory=dict)  # /inpaint edit_start, edit_end;
    #                                   /loop loop_samples; /vary chunk_start, keep

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.wav)


@dataclass
class Chunk:
    """One streamed piece of /extend: the input (index -1, with include_input) or chunk i."""

    index: int
    wav: bytes
    audio: np.ndarray
    sample_rate: int
    seed: int


def _per_level(v: PerLevel) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int | float):
        return str(v)
    return ",".join(str(x) for x in v)


def _query(steps, temperature, top_p, guidance, gumbel, confidence, seed, include_input,
           **more) -> dict[str, str]:
    q = {
        "steps": _per_level(steps),
        "temperature": _per_level(temperature),
        "top_p": _per_level(top_p),
        "guidance": _per_level(guidance),
        "gumbel": _per_level(gumbel),
        "confidence": confidence,
        "seed": None if seed is None else str(int(seed)),
        "include_input": "true" if include_input else None,
    }
    q.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in more.items()})
    return {k: v for k, v in q.items() if v is not None}


def _files(audio: AudioInput, sample_rate: int | None) -> dict:
    """The multipart 'audio' field: files go as they are (the server decodes any format)."""
    if isinstance(audio, np.ndarray):
        if sample_rate is None:
            raise ValueError("sample_rate is required when audio is a numpy array")
        return {"audio": ("audio.wav", encode_wav(audio, sample_rate), "audio/wav")}
    if isinstance(audio, bytes | bytearray):
        return {"audio": ("audio", bytes(audio), "application/octet-stream")}
    path = Path(audio)
    return {"audio": (path.name, path.read_bytes(), "application/octet-stream")}


def _check(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        raise error_for(resp.status_code, resp.content, resp.headers.get("retry-after"))


_PARAM_HEADERS = {
    "steps": "x-steps",
    "temperature": "x-temperature",
    "top_p": "x-top-p",
    "guidance": "x-guidance",
    "gumbel": "x-gumbel",
    "confidence": "x-confidence",
}


_EDIT_HEADERS = {"edit_start": "x-edit-start", "edit_end": "x-edit-end",
                 "loop_samples": "x-loop-samples", "chunk_start": "x-chunk-start", "keep": "x-keep"}
_SAMPLING = ("steps", "temperature", "top_p", "guidance", "gumbel", "confidence", "seed")


def _edit_query(sampling: dict, **more) -> dict[str, str]:
    """Query of an edit: the sampling keywords (as for continue_), plus the edit's own."""
    unknown = sorted(set(sampling) - set(_SAMPLING))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; use {list(_SAMPLING)}")
    q = _query(*(sampling.get(k) for k in _SAMPLING), False)
    q.update({k: str(v) for k, v in more.items() if v is not None})
    return q


def _result(resp: httpx.Response) -> Result:
    _check(resp)
    audio, rate = decode_wav(resp.content)
    h = resp.headers
    return Result(
        edit={k: (h[name] if k == "keep" else int(h[name]))
              for k, name in _EDIT_HEADERS.items() if name in h},
        wav=resp.content,
        audio=audio,
        sample_rate=rate,
        seed=int(h["x-seed"]),
        params={k: h[name] for k, name in _PARAM_HEADERS.items() if name in h},
        input_samples=int(h["x-input-samples"]) if "x-input-samples" in h else None,
    )


def _chunk(line: str, seed: int) -> Chunk | None:
    """One NDJSON line of an /extend stream -> a Chunk, None for 'done', StreamError for 'error'."""
    msg = json.loads(line)
    event = msg.get("event")
    if event == "error":
        raise StreamError(None, msg.get("error", "stream_error"), msg.get("detail", ""))
    if event == "done":
        return None
    wav = base64.b64decode(msg["audio"])
    audio, rate = decode_wav(wav)
    return Chunk(
        index=-1 if event == "input" else int(msg["index"]),
        wav=wav,
        audio=audio,
        sample_rate=rate,
        seed=seed,
    )


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def join_chunks(chunks: Sequence[Chunk]) -> tuple[np.ndarray, int]:
    """Concatenate streamed chunks (in order) into one array."""
    if not chunks:
        raise ValueError("no chunks")
    return np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate


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


def _unreachable(base_url, method: str, url: str, e: Exception) -> ConnectionFailed:
    return ConnectionFailed(
        f"could not reach the snac-dit server at {base_url} ({method} {url}: "
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

    def _send(self, method: str, url: str, **kw) -> httpx.Response:
        try:
            return self._http.request(method, url, **kw)
        except httpx.TransportError as e:
            raise _unreachable(self._http.base_url, method, url, e) from e

    def health(self) -> dict:
        r = self._send("GET", "/health")
        _check(r)
        return r.json()

    def ready(self) -> bool:
        return self._send("GET", "/ready").status_code == 200

    def info(self) -> dict:
        r = self._send("GET", "/info")
        _check(r)
        return r.json()

    def continue_(
        self,
        audio: AudioInput,
        *,
        sample_rate: int | None = None,
        steps: PerLevel = None,
        temperature: PerLevel = None,
        top_p: PerLevel = None,
        guidance: PerLevel = None,
        gumbel: PerLevel = None,
        confidence: str | None = None,
        seed: int | None = None,
        include_input: bool = False,
    ) -> Result:
        """6.144 s continuing `audio` (a path, file bytes, or a float array with sample_rate)."""
        q = _query(steps, temperature, top_p, guidance, gumbel, confidence, seed, include_input)
        return _result(self._send("POST", "/continue", params=q, files=_files(audio, sample_rate)))

    def extend(
        self,
        audio: AudioInput,
        chunks: int,
        *,
        sample_rate: int | None = None,
        steps: PerLevel = None,
        temperature: PerLevel = None,
        top_p: PerLevel = None,
        guidance: PerLevel = None,
        gumbel: PerLevel = None,
        confidence: str | None = None,
        seed: int | None = None,
        include_input: bool = False,
    ) -> Result:
        """`chunks` chained continuations as one WAV."""
        q = _query(steps, temperature, top_p, guidance, gumbel, confidence, seed, include_input, chunks=chunks)
        return _result(self._send("POST", "/extend", params=q, files=_files(audio, sample_rate)))

    def extend_stream(
        self,
        audio: AudioInput,
        chunks: int,
        *,
        sample_rate: int | None = None,
        steps: PerLevel = None,
        temperature: PerLevel = None,
        top_p: PerLevel = None,
        guidance: PerLevel = None,
        gumbel: PerLevel = None,
        confidence: str | None = None,
        seed: int | None = None,
        include_input: bool = False,
    ) -> Iterator[Chunk]:
        """Yield each chunk as soon as the server has generated it."""
        q = _query(
            steps, temperature, top_p, guidance, gumbel, confidence, seed, include_input,
            chunks=chunks, stream=True
        )
        try:
            with self._http.stream(
                "POST", "/extend", params=q, files=_files(audio, sample_rate)
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _check(resp)
                seed_used = int(resp.headers["x-seed"])
                for line in resp.iter_lines():
                    if line.strip():
                        chunk = _chunk(line, seed_used)
                        if chunk is None:
                            return
                        yield chunk
        except httpx.TransportError as e:
            raise _unreachable(self._http.base_url, "POST", "/extend", e) from e
        raise StreamError(None, "truncated_stream", "the stream ended without a 'done' line")

    def inpaint(self, audio: AudioInput, start: float, end: float, *,
                sample_rate: int | None = None, **sampling) -> Result:
        """The whole input with [start, end) seconds regenerated from what surrounds it.
        Sampling keywords as for `continue_` (steps, temperature, ..., seed)."""
        q = _edit_query(sampling, start=start, end=end)
        return _result(self._send("POST", "/inpaint", params=q, files=_files(audio, sample_rate)))

    def loop(self, audio: AudioInput, *, sample_rate: int | None = None, **sampling) -> Result:
        """The input plus a 6.144 s bridge back into its start: play the result on repeat."""
        q = _edit_query(sampling)
        return _result(self._send("POST", "/loop", params=q, files=_files(audio, sample_rate)))

    def vary(self, audio: AudioInput, *, keep: str = "A", start: float | None = None,
             sample_rate: int | None = None, **sampling) -> Result:
        """The whole input with the chunk at `start` (default: the last whole one) regenerated
        above its kept coarse levels (keep "A" or "AB")."""
        q = _edit_query(sampling, keep=keep, start=start)
        return _result(self._send("POST", "/vary", params=q, files=_files(audio, sample_rate)))


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

    async def _send(self, method: str, url: str, **kw) -> httpx.Response:
        try:
            return await self._http.request(method, url, **kw)
        except httpx.TransportError as e:
            raise _unreachable(self._http.base_url, method, url, e) from e

    async def health(self) -> dict:
        r = await self._send("GET", "/health")
        _check(r)
        return r.json()

    async def ready(self) -> bool:
        return (await self._send("GET", "/ready")).status_code == 200

    async def info(self) -> dict:
        r = await self._send("GET", "/info")
        _check(r)
        return r.json()

    async def continue_(
        self,
        audio: AudioInput,
        *,
        sample_rate: int | None = None,
        steps: PerLevel = None,
        temperature: PerLevel = None,
        top_p: PerLevel = None,
        guidance: PerLevel = None,
        gumbel: PerLevel = None,
        confidence: str | None = None,
        seed: int | None = None,
        include_input: bool = False,
    ) -> Result:
        q = _query(steps, temperature, top_p, guidance, gumbel, confidence, seed, include_input)
        r = await self._send("POST", "/continue", params=q, files=_files(audio, sample_rate))
        return _result(r)

    async def extend(
        self,
        audio: AudioInput,
        chunks: int,
        *,
        sample_rate: int | None = None,
        steps: PerLevel = None,
        temperature: PerLevel = None,
        top_p: PerLevel = None,
        guidance: PerLevel = None,
        gumbel: PerLevel = None,
        confidence: str | None = None,
        seed: int | None = None,
        include_input: bool = False,
    ) -> Result:
        q = _query(steps, temperature, top_p, guidance, gumbel, confidence, seed, include_input, chunks=chunks)
        r = await self._send("POST", "/extend", params=q, files=_files(audio, sample_rate))
        return _result(r)

    async def extend_stream(
        self,
        audio: AudioInput,
        chunks: int,
        *,
        sample_rate: int | None = None,
        steps: PerLevel = None,
        temperature: PerLevel = None,
        top_p: PerLevel = None,
        guidance: PerLevel = None,
        gumbel: PerLevel = None,
        confidence: str | None = None,
        seed: int | None = None,
        include_input: bool = False,
    ) -> AsyncIterator[Chunk]:
        q = _query(
            steps, temperature, top_p, guidance, gumbel, confidence, seed, include_input,
            chunks=chunks, stream=True
        )
        try:
            async with self._http.stream(
                "POST", "/extend", params=q, files=_files(audio, sample_rate)
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    _check(resp)
                seed_used = int(resp.headers["x-seed"])
                async for line in resp.aiter_lines():
                    if line.strip():
                        chunk = _chunk(line, seed_used)
                        if chunk is None:
                            return
                        yield chunk
        except httpx.TransportError as e:
            raise _unreachable(self._http.base_url, "POST", "/extend", e) from e
        raise StreamError(None, "truncated_stream", "the stream ended without a 'done' line")

    async def inpaint(self, audio: AudioInput, start: float, end: float, *,
                      sample_rate: int | None = None, **sampling) -> Result:
        q = _edit_query(sampling, start=start, end=end)
        return _result(await self._send("POST", "/inpaint", params=q,
                                        files=_files(audio, sample_rate)))

    async def loop(self, audio: AudioInput, *, sample_rate: int | None = None,
                   **sampling) -> Result:
        q = _edit_query(sampling)
        return _result(await self._send("POST", "/loop", params=q,
                                        files=_files(audio, sample_rate)))

    async def vary(self, audio: AudioInput, *, keep: str = "A", start: float | None = None,
                   sample_rate: int | None = None, **sampling) -> Result:
        q = _edit_query(sampling, keep=keep, start=start)
        return _result(await self._send("POST", "/vary", params=q,
                                        files=_files(audio, sample_rate)))
