"""What each server endpoint is sent and how its reply is read, written once for `Client` and
`AsyncClient`, which only do the sending (blocking or awaited). No HTTP happens here."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import httpx
import numpy as np

from clients.errors import StreamError, error_for
from clients.wav import decode_wav, encode_wav

AudioInput = str | os.PathLike | bytes | np.ndarray
PerLevel = int | float | str | Sequence[int | float] | None


class Sampling(TypedDict, total=False):
    """The sampling keywords of every generating call; one left out (or None) is the server's
    default. A per-level one is one value for all levels A,B,C,D or one per level:
    2, "16,12,8,8" or [16, 12, 8, 8]."""

    steps: PerLevel  # denoising steps
    temperature: PerLevel  # 0 = greedy
    top_p: PerLevel  # nucleus mass in (0, 1]
    guidance: PerLevel  # classifier-free guidance on the context; 1 = off
    gumbel: PerLevel  # Gumbel noise on the unmasking order; 0 = by confidence alone
    confidence: str | None  # what ranks positions for unmasking: "top" or "sampled"
    seed: int | None
    # Style actions (models trained with them; /info "style"): a reference clip (a path, file
    # bytes, or an array at the call's sample_rate) or an action k, and guidance on it.
    style: Any
    action: int | None
    style_scale: float | None  # 1 = conditioned (default), 0 = ignore, > 1 stronger
    style_guidance: str | None  # "cfg" or "icg"


_SAMPLING = tuple(Sampling.__annotations__)
_PER_LEVEL = ("steps", "temperature", "top_p", "guidance", "gumbel")


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
    edit: dict[str, int | str] = field(default_factory=dict)  # /inpaint edit_start, edit_end,
    #   span_seconds; /loop loop_samples (and with bars: loop_start, bars, tempo,
    #   time_signature); /vary chunk_start, keep (held_beats with keep=beats); /extend
    #   chunk_bars ("bar:beat" where each chunk starts) and tempo when the input has a beat

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
    params: dict[str, str] = field(default_factory=dict)  # what ran, as in `Result.params`
    bar: int | None = None      # where the chunk starts on the input's bar grid (1-based), when
    beat: float | None = None   # the input has a steady beat


def join_chunks(chunks: Sequence[Chunk]) -> tuple[np.ndarray, int]:
    """Concatenate streamed chunks (in order) into one array."""
    if not chunks:
        raise ValueError("no chunks")
    return np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate


# --- requests ---------------------------------------------------------------------------------


def _per_level(v: PerLevel) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int | float):
        return str(v)
    return ",".join(str(x) for x in v)


def _query(sampling: Sampling, **more) -> dict[str, str]:
    """Query of a generating call: the sampling keywords, then the endpoint's own. A None (or a
    False flag) is left out, so that the server applies its default."""
    unknown = sorted(set(sampling) - set(_SAMPLING))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; use {list(_SAMPLING)}")
    q = {k: _per_level(sampling.get(k)) for k in _PER_LEVEL}
    q["confidence"] = sampling.get("confidence")
    for k in ("action", "style_scale", "style_guidance"):
        q[k] = None if sampling.get(k) is None else str(sampling[k])
    seed = sampling.get("seed")
    q["seed"] = None if seed is None else str(int(seed))
    for k, v in more.items():
        q[k] = None if v is None or v is False else "true" if v is True else str(v)
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


# --- replies ----------------------------------------------------------------------------------


def check(resp: httpx.Response) -> None:
    """Raise the typed error of a 4xx/5xx reply (its body must have been read)."""
    if resp.status_code >= 400:
        raise error_for(resp.status_code, resp.content, resp.headers.get("retry-after"))


def _json(resp: httpx.Response) -> dict:
    check(resp)
    return resp.json()


def _is_ready(resp: httpx.Response) -> bool:
    return resp.status_code == 200  # 503 while loading is an answer, not an error


_PARAM_HEADERS = {
    "steps": "x-steps",
    "temperature": "x-temperature",
    "top_p": "x-top-p",
    "guidance": "x-guidance",
    "gumbel": "x-gumbel",
    "confidence": "x-confidence",
}


_EDIT_HEADERS = {"edit_start": "x-edit-start", "edit_end": "x-edit-end",
                 "loop_samples": "x-loop-samples", "chunk_start": "x-chunk-start", "keep": "x-keep",
                 "span_seconds": "x-span-seconds", "loop_start": "x-loop-start", "bars": "x-bars",
                 "tempo": "x-tempo", "time_signature": "x-time-signature",
                 "held_beats": "x-held-beats", "chunk_bars": "x-chunk-bars"}


def _header_value(v: str) -> int | str:
    return int(v) if v.lstrip("-").isdigit() else v


def ran(headers) -> dict[str, str]:
    """The sampling parameters a reply says it ran with (its X-Steps ... headers)."""
    return {k: headers[name] for k, name in _PARAM_HEADERS.items() if name in headers}


def _result(resp: httpx.Response) -> Result:
    check(resp)
    audio, rate = decode_wav(resp.content)
    h = resp.headers
    return Result(
        edit={k: _header_value(h[name]) for k, name in _EDIT_HEADERS.items() if name in h},
        wav=resp.content,
        audio=audio,
        sample_rate=rate,
        seed=int(h["x-seed"]),
        params=ran(h),
        input_samples=int(h["x-input-samples"]) if "x-input-samples" in h else None,
    )


def parse_line(line: str, seed: int, params: dict[str, str] | None = None) -> Chunk | None:
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
        params=dict(params or {}),
        bar=msg.get("bar"),
        beat=msg.get("beat"),
    )


def truncated_stream() -> StreamError:
    return StreamError(None, "truncated_stream", "the stream ended without a 'done' line")


# --- endpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One call: what to send, and `parse`, which turns the reply into what the client method
    returns (a streamed /extend is read line by line with `parse_line` instead)."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: dict[str, str] | None = None
    files: dict | None = None


HEALTH = Request("GET", "/health", _json)
READY = Request("GET", "/ready", _is_ready)
INFO = Request("GET", "/info", _json)


def _bytes(resp: httpx.Response) -> bytes:
    check(resp)
    return resp.content


def action_example(action: int) -> Request:
    """The example chunk of a style action (OGG bytes), as /info lists the actions."""
    return Request("GET", f"/actions/{int(action)}/example", _bytes)


def _upload(path: str, audio: AudioInput, sample_rate: int | None, sampling: Sampling,
            **more) -> Request:
    """A generating call: `audio` uploaded, the query built from `sampling` and `more`."""
    files = _files(audio, sample_rate)
    if sampling.get("style") is not None:  # the reference clip: a second file field
        files["style"] = _files(sampling["style"], sample_rate)["audio"]
    return Request("POST", path, _result, _query(sampling, **more), files)


def continue_(audio, sample_rate, include_input, sampling) -> Request:
    return _upload("/continue", audio, sample_rate, sampling, include_input=include_input)


def extend(audio, chunks, sample_rate, include_input, sampling, stream=False) -> Request:
    return _upload("/extend", audio, sample_rate, sampling, include_input=include_input,
                   chunks=chunks, stream=stream)


def analyze(audio, sample_rate) -> Request:
    return Request("POST", "/analyze", _json, {}, _files(audio, sample_rate))


def inpaint(audio, start, end, sample_rate, sampling, start_bar=None, bars=None,
            start_beat=None, beats=None) -> Request:
    return _upload("/inpaint", audio, sample_rate, sampling, start=start, end=end,
                   start_bar=start_bar, bars=bars, start_beat=start_beat, beats=beats)


def loop(audio, sample_rate, sampling, bars=None) -> Request:
    return _upload("/loop", audio, sample_rate, sampling, bars=bars)


def vary(audio, keep, start, sample_rate, sampling) -> Request:
    return _upload("/vary", audio, sample_rate, sampling, keep=keep, start=start)
