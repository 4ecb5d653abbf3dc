"""POST /continue and POST /extend: upload in, WAV (or a stream of WAV chunks) out.

Order of checks, cheapest first: API key, parameter names, queue capacity, media type, size
(while streaming), parameter values, stated duration, decoding, duration; only then does work get queued.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from audio import read_audio, write_wav
from audio.analysis import NoSteadyBeat, analyze, grid_position
from model.engine import JOIN_SAMPLES, StyleRequest, join_input
from server.deps import AuthDep, ReadyDep, Service
from server.errors import ClientGone, InvalidParameter, Unavailable, error_payload
from server.params import (
    CONTINUE_PARAMS,
    EXTEND_PARAMS,
    check_budget,
    param_headers,
    parse_bool,
    parse_int,
    reject_unknown,
    sampling_params,
)
from server.upload import declared_seconds, read_upload

router = APIRouter(tags=["generate"])
log = logging.getLogger("server")

_PER_LEVEL = "one value for all levels, or one per level coarse to fine (e.g. 16,12,8,8)"
_PARAM_DOCS = {
    "steps": ("string", f"denoising steps; {_PER_LEVEL}"),
    "temperature": ("string", f"sampling temperature; {_PER_LEVEL}"),
    "top_p": ("string", f"nucleus sampling mass; {_PER_LEVEL}"),
    "guidance": ("string", f"classifier-free guidance scale, 1 = off; {_PER_LEVEL}"),
    "gumbel": ("string", f"scale of the Gumbel noise on the commit order (0 = none); {_PER_LEVEL}"),
    "confidence": ("string", "what orders the commits: 'top' (the top log-prob at a position, "
                             "default) or 'sampled' (the sampled token's log-prob, MaskGIT)"),
    "seed": ("integer", "random seed; chosen and reported in X-Seed when absent"),
    "include_input": ("boolean", "return the input followed by the continuation"),
    "chunks": ("integer", "number of chained 6.144 s chunks (1..max_chunks)"),
    "stream": ("boolean", "send each chunk as an NDJSON line as soon as it is generated"),
    # the editing endpoints (routes_edit.py)
    "start": ("number", "seconds into the input where the span (/inpaint) or the chunk (/vary) "
                        "begins; /vary rounds it down to the 0.384 s grid"),
    "end": ("number", "seconds into the input where the span to regenerate ends; at most one "
                      "6.144 s chunk after start"),
    "keep": ("string", "what a variation keeps: the coarse levels A (default) or AB, or "
                       "'beats': every level in a window around each beat, all new between"),
    "start_bar": ("integer", "/inpaint: the first bar to regenerate (bar 1 starts at the first "
                             "downbeat, as /analyze finds it); instead of start/end"),
    "bars": ("integer", "/inpaint: how many bars from start_bar (default 1); /loop: the loop's "
                        "length in whole bars, joined on a downbeat"),
    "start_beat": ("integer", "/inpaint: the first beat to regenerate (beat 1 is the first "
                              "beat found); instead of start/end"),
    "beats": ("integer", "/inpaint: how many beats from start_beat (default 1)"),
    # style actions (models trained with them; /info's "style" says whether this one was)
    "style": ("string", "a second file field: continue with the style of this reference clip"),
    "action": ("integer", "a style action 0..K-1 (/info lists them); instead of 'style'"),
    "style_scale": ("number", "guidance on the style: 1 = conditioned (default), 0 = ignore, "
                              "> 1 stronger"),
    "style_guidance": ("string", "'cfg' (against no style) or 'icg' (against a random action)"),
}


def _openapi(names: tuple[str, ...]) -> dict:
    params = [
        {
            "name": n,
            "in": "query",
            "required": False,
            "schema": {"type": _PARAM_DOCS[n][0]},
            "description": _PARAM_DOCS[n][1],
        }
        for n in names
    ]
    body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["audio"],
                    "properties": {"audio": {"type": "string", "format": "binary"}},
                }
            },
            "audio/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    return {"parameters": params, "requestBody": body}


def _given(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    items = request.query_params.multi_items()
    given: dict[str, str] = {}
    for k, v in items:
        if k in given:
            raise InvalidParameter(f"{k}: given more than once")
        given[k] = v
    reject_unknown(given, allowed)
    return given


async def _acquire_within(sem: asyncio.Semaphore, seconds: float) -> bool:
    """sem.acquire() with a deadline that can never leak a permit (a bare wait_for can, when
    the acquire succeeds just as the timeout cancels it)."""
    attempt = asyncio.ensure_future(sem.acquire())
    done, _ = await asyncio.wait({attempt}, timeout=seconds)
    if done:
        return True
    attempt.cancel()
    try:
        await attempt
    except asyncio.CancelledError:
        return False
    sem.release()  # it was acquired after all, between the timeout and the cancel
    return False


async def _read_input(request: Request, svc: Service, allowed: tuple[str, ...]):
    """-> (parameters by name, mono float32 audio at the engine rate)."""
    given = _given(request, allowed)
    svc.batcher.check_capacity()
    # Claim an upload slot before reading a byte of the body; wait a little for one, then 503.
    limit = svc.settings.max_concurrent_uploads
    if not await _acquire_within(svc.upload_slots, svc.settings.upload_slot_wait_s):
        raise Unavailable(
            f"{limit} uploads are being received and decoded already "
            "(SNAC_DIT_MAX_CONCURRENT_UPLOADS); retry shortly",
            code="uploads_busy",
            retry_after=1,
        )
    try:
        return await _receive_and_decode(request, svc, given, allowed)
    finally:
        svc.upload_slots.release()


async def _receive_and_decode(request: Request, svc: Service, given: dict, allowed):
    upload = await read_upload(request, svc.settings.max_upload_bytes,
                               svc.settings.upload_timeout_s)
    reject_unknown(upload.fields, allowed)
    if "style" in upload.fields:
        raise InvalidParameter("style: send the reference clip as a file field 'style'")
    if upload.style is not None:
        if "style" not in allowed:
            raise InvalidParameter("unexpected file field 'style'; the audio goes in 'audio'",
                                   code="unknown_parameter")
        request.state.style_audio = await run_in_threadpool(read_audio, upload.style,
                                                            svc.engine.sample_rate)
    for k, v in upload.fields.items():
        if k in given:
            raise InvalidParameter(f"{k}: given both in the query and in the form")
        given[k] = v
    svc.memory.note(len(upload.audio))  # the body and its decoded copies: trimmed when idle
    rate = svc.engine.sample_rate
    longest = svc.settings.max_input_seconds
    stated = await run_in_threadpool(declared_seconds, upload.audio)
    if stated is not None and stated > longest:
        raise InvalidParameter(
            f"audio: {stated:.1f} s is too long; send at most {longest:g} s (only the last "
            f"{svc.engine.context_samples / rate:g} s are used anyway)",
            code="audio_too_long",
        )
    audio = await run_in_threadpool(read_audio, upload.audio, rate)  # CPU work, off the loop
    seconds = len(audio) / rate
    if seconds < svc.settings.min_input_seconds:
        raise InvalidParameter(
            f"audio: {seconds:.2f} s is too short; send at least "
            f"{svc.settings.min_input_seconds:g} s",
            code="audio_too_short",
        )
    return given, audio


async def _until_done_or_gone(request: Request, awaitable):
    """Await `awaitable`, raising ClientGone if the client disconnects first."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    raise ClientGone


def style_request(request: Request, given: dict, svc: Service) -> StyleRequest | None:
    """The request's style (a reference clip or an action), checked before any work is queued:
    a model without style actions gets a clear 422, never an engine error."""
    if given.get("style") is not None:
        raise InvalidParameter("style: send the reference clip as a file field 'style'")
    reference = getattr(request.state, "style_audio", None)
    action = given.get("action")
    if reference is None and action is None:
        return None
    k = svc.engine.style_actions
    if not k:
        raise InvalidParameter("this model has no style actions (it was trained without them); "
                               "send the request without 'style' and 'action'",
                               code="no_style_actions")
    if reference is not None and action is not None:
        raise InvalidParameter("give either a 'style' clip or an 'action', not both")
    if action is not None:
        return StyleRequest(action=parse_int("action", action, 0, 0, k - 1))
    if len(reference) == 0:
        raise InvalidParameter("style: the reference clip is empty", code="audio_too_short")
    return StyleRequest(reference=reference)  # the engine reads numpy audio as it is


def _sampling(given: dict, svc: Service):
    return sampling_params(given, svc.defaults, svc.engine.codec.n_levels, svc.settings.max_steps)


def _wav_headers(svc: Service, params, n_input: int | None, **extra) -> dict[str, str]:
    headers = param_headers(params)
    headers["X-Sample-Rate"] = str(svc.engine.sample_rate)
    if n_input is not None:  # where the continuation starts inside an include_input result
        headers["X-Input-Samples"] = str(n_input)
    headers.update({k: str(v) for k, v in extra.items()})
    return headers


@router.post(
    "/continue",
    summary="Continue a clip by 6.144 s",
    response_class=Response,
    responses={
        200: {
            "content": {"audio/wav": {}},
            "description": "32 kHz mono 16-bit WAV; X-Seed etc. state what ran",
        }
    },
    openapi_extra=_openapi(CONTINUE_PARAMS),
)
async def continue_(request: Request, _: AuthDep, svc: ReadyDep) -> Response:
    given, audio = await _read_input(request, svc, CONTINUE_PARAMS)
    params = _sampling(given, svc)
    style = style_request(request, given, svc)
    check_budget(params, 1, svc.settings.max_request_passes, style is not None)
    include_input = parse_bool("include_input", given.get("include_input"))

    job = svc.batcher.submit_continue(audio, params, style=style)
    try:
        out = await _until_done_or_gone(request, job.future)
    except ClientGone:
        svc.batcher.cancel(job)
        return Response(status_code=499)  # nobody reads this; it labels the metric
    # `out` starts with the decoded end of the input (JOIN_SAMPLES): crossfaded into, or dropped.
    result = join_input(audio, out) if include_input else out[JOIN_SAMPLES:]
    headers = _wav_headers(svc, params, len(audio) if include_input else None)
    wav = await run_in_threadpool(write_wav, result, svc.engine.sample_rate)  # long inputs
    return Response(wav, media_type="audio/wav", headers=headers)


@router.post(
    "/extend",
    summary="Continue a clip by N chained chunks (optionally streamed)",
    response_class=Response,
    responses={
        200: {
            "content": {"audio/wav": {}, "application/x-ndjson": {}},
            "description": "a WAV of N chunks, or with stream=true one NDJSON line per "
            "chunk (base64 WAV), then a 'done' or 'error' line",
        }
    },
    openapi_extra=_openapi(EXTEND_PARAMS),
)
async def extend(request: Request, _: AuthDep, svc: ReadyDep) -> Response:
    given, audio = await _read_input(request, svc, EXTEND_PARAMS)
    params = _sampling(given, svc)
    n = parse_int("chunks", given.get("chunks"), 1, 1, svc.settings.max_chunks)
    style = style_request(request, given, svc)
    check_budget(params, n, svc.settings.max_request_passes, style is not None)
    include_input = parse_bool("include_input", given.get("include_input"))
    stream = parse_bool("stream", given.get("stream"))
    rate = svc.engine.sample_rate
    headers = _wav_headers(svc, params, len(audio) if include_input else None, **{"X-Chunks": n})

    job = svc.batcher.submit_extend(audio, params, n, style=style)
    # The chunks' starts on the input's bar grid (its tempo carried on): found while they run.
    grid = asyncio.ensure_future(run_in_threadpool(_chunk_bars, audio, rate, n,
                                                   svc.engine.chunk_samples))

    async def next_chunk():
        item = await job.chunks.get()
        if isinstance(item, BaseException):
            raise item
        return item

    # What must arrive before answering: every chunk for a WAV; for a stream only the first, so
    # a failure up to there is a plain HTTP error and later ones go out inside the stream.
    ready = []
    try:
        for _ in range(1 if stream else n):
            ready.append(await _until_done_or_gone(request, next_chunk()))
    except ClientGone:
        svc.batcher.cancel(job)
        grid.cancel()
        return Response(status_code=499)
    except BaseException:
        svc.batcher.cancel(job)
        grid.cancel()
        raise
    tempo, bars = await grid
    if bars is not None:
        headers["X-Tempo"] = f"{tempo:.2f}"
        headers["X-Chunk-Bars"] = ",".join(f"{p['bar']}:{p['beat']:g}" for p in bars)

    # The first piece starts with the decoded end of the input (JOIN_SAMPLES, see /continue).
    joined = join_input(audio, ready[0]) if include_input else None
    ready[0] = ready[0][JOIN_SAMPLES:]
    if not stream:
        result = np.concatenate(([joined[: len(audio)]] if include_input else []) + ready)
        wav = await run_in_threadpool(write_wav, result, rate)
        return Response(wav, media_type="audio/wav", headers=headers)
    first = ready[0]

    def line(obj: dict) -> bytes:
        return (json.dumps(obj) + "\n").encode()

    def audio_line(event: str, x: np.ndarray, **fields) -> bytes:
        wav = base64.b64encode(write_wav(x, rate)).decode("ascii")
        return line(
            {"event": event, **fields, "samples": len(x), "sample_rate": rate, "audio": wav}
        )

    async def body():
        try:
            if include_input:  # the input with its crossfaded end; the continuation follows
                yield audio_line("input", joined[: len(audio)])
            yield audio_line("chunk", first, index=0, **(bars[0] if bars else {}))
            for i in range(1, n):
                try:
                    chunk = await next_chunk()
                except Exception as e:  # noqa: BLE001 - reported in-band, the stream is open
                    _, payload, _ = error_payload(e)
                    yield line({"event": "error", **payload})
                    return
                yield audio_line("chunk", chunk, index=i, **(bars[i] if bars else {}))
            yield line({"event": "done", "chunks": n, "seed": params.seed})
        finally:
            svc.batcher.cancel(job)  # no-op once finished; drops the rest if the client left

    return StreamingResponse(body(), media_type="application/x-ndjson", headers=headers)


def _chunk_bars(audio: np.ndarray, rate: int, n: int, chunk: int):
    """(tempo, [{"bar", "beat"} where each chunk starts]) on the input's grid, or (None, None)
    when the input has no steady beat (/extend works in seconds then)."""
    try:
        a = analyze(audio, rate)
    except NoSteadyBeat:
        return None, None
    except Exception:  # noqa: BLE001 - a report beside the audio must never fail the request
        log.exception("analysis for /extend's bar grid failed")
        return None, None
    return a.tempo, [grid_position(a, (len(audio) + i * chunk) / rate) for i in range(n)]
