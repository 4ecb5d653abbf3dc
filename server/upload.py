"""Read an upload with its size bounded while it streams in, then pick out the audio.

Starlette's `request.form()` would spool an unbounded body before we could look at it, so the
body is read here with a running byte count (and refused early when Content-Length already says
too much); only then is multipart parsed, from the bounded bytes.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field

import soundfile as sf
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from server.errors import (
    BadAudio,
    InvalidParameter,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)

HOW_TO_SEND = (
    "send multipart/form-data with a file field 'audio', or the raw file as the body with "
    "Content-Type: audio/* (e.g. audio/wav)"
)


@dataclass
class Upload:
    audio: bytes
    fields: dict[str, str] = field(default_factory=dict)  # multipart text fields (parameters)
    style: bytes | None = None  # a second file, 'style': the reference clip of a style request


async def read_bounded(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The body, refused (413) past max_bytes and (408) if it has not all arrived in timeout_s."""
    if timeout_s is None:
        return await _read_bounded(request, max_bytes)
    try:
        return await asyncio.wait_for(_read_bounded(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s "
            "(SNAC_DIT_UPLOAD_TIMEOUT_S); send it faster or smaller"
        ) from None


async def _read_bounded(request: Request, max_bytes: int) -> bytes:
    limit_msg = f"the request body exceeds the {max_bytes / 2**20:g} MB upload limit"
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise PayloadTooLarge(limit_msg)
        except ValueError:
            raise BadAudio("invalid Content-Length header", code="bad_request") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:  # chunked uploads, or a Content-Length that lied
            raise PayloadTooLarge(limit_msg)
    return bytes(body)


def _parse_multipart(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    """-> [(part headers lower-cased, part bytes)] for a complete, already bounded body."""
    parts: list[tuple[dict[str, str], bytes]] = []
    headers: dict[str, str] = {}
    data = bytearray()
    hname = bytearray()
    hvalue = bytearray()

    def on_part_begin():
        nonlocal headers, data
        headers, data = {}, bytearray()

    def on_header_field(b, start, end):
        hname.extend(b[start:end])

    def on_header_value(b, start, end):
        hvalue.extend(b[start:end])

    def on_header_end():
        headers[hname.decode("latin-1").lower()] = hvalue.decode("latin-1")
        hname.clear()
        hvalue.clear()

    def on_part_data(b, start, end):
        data.extend(b[start:end])

    def on_part_end():
        parts.append((headers, bytes(data)))

    ended = []

    def on_end():
        ended.append(True)

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    parser.write(body)
    parser.finalize()
    if not ended:  # no closing boundary: the body was cut off (or never finished)
        raise FormParserError("the body ends before the closing boundary (truncated upload?)")
    return parts


def declared_seconds(data: bytes) -> float | None:
    """The duration a file's header states, without decoding it (None when unknown).

    A compressed upload under the byte limit can still decode to hours of float32 audio;
    this lets the caller refuse it before `read_audio` allocates that.
    """
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - undecodable input is read_audio's to report
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        return None
    return info.frames / info.samplerate


async def read_upload(request: Request, max_bytes: int, timeout_s: float | None = None) -> Upload:
    ctype = request.headers.get("content-type", "")
    media, options = parse_options_header(ctype)
    media = media.decode("latin-1").lower() if isinstance(media, bytes) else media.lower()

    if media.startswith("audio/"):
        return Upload(await read_bounded(request, max_bytes, timeout_s))
    if media != "multipart/form-data":
        got = f"'{media}'" if media else "no Content-Type"
        raise UnsupportedMediaType(f"unsupported media type ({got}); {HOW_TO_SEND}")

    boundary = options.get(b"boundary")
    if not boundary:
        raise BadAudio("multipart body without a boundary", code="malformed_multipart")
    body = await read_bounded(request, max_bytes, timeout_s)
    try:
        parts = _parse_multipart(body, boundary)
    except FormParserError as e:
        raise BadAudio(f"malformed multipart body ({e})", code="malformed_multipart") from None

    audio: bytes | None = None
    style: bytes | None = None
    fields: dict[str, str] = {}
    for headers, data in parts:
        _, disp = parse_options_header(headers.get("content-disposition", ""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if name == "audio":
            if audio is not None:
                raise InvalidParameter("audio: send exactly one 'audio' part")
            audio = data
        elif name == "style" and b"filename" in disp:
            if style is not None:
                raise InvalidParameter("style: send at most one 'style' file")
            style = data
        elif b"filename" in disp:
            raise InvalidParameter(
                f"unexpected file field {name!r}; the audio goes in 'audio'",
                code="unknown_parameter",
            )
        else:
            if name in fields:
                raise InvalidParameter(f"{name}: given more than once")
            fields[name] = data.decode("utf-8", "replace")
    if audio is None:
        raise InvalidParameter(f"audio: missing; {HOW_TO_SEND}", code="missing_audio")
    return Upload(audio, fields, style)
