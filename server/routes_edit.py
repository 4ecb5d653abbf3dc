"""POST /inpaint, /loop and /vary: editing the uploaded audio with the same model (DESIGN §5.5).

Same upload rules, parameters, limits, batching and errors as /continue (routes_generate.py).
Inpaint and loop need a model trained with the chunk after the target as context; another model
answers 422 `model_cannot_edit`. Every result is 32 kHz mono 16-bit WAV.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from audio import write_wav
from audio.analysis import bar_span, beat_holds, beat_span, loop_span
from model.engine import JOIN_SAMPLES, EditRequest
from server.deps import AuthDep, ReadyDep, Service
from server.errors import ClientGone, InvalidParameter
from server.params import (
    INPAINT_PARAMS,
    LOOP_PARAMS,
    VARY_PARAMS,
    check_budget,
    parse_int,
    parse_seconds,
)
from server.routes_analyze import analysis_of
from server.routes_generate import (
    _openapi,
    _read_input,
    _sampling,
    _until_done_or_gone,
    _wav_headers,
    style_request,
)

router = APIRouter(tags=["edit"])

KEEP = {"A": 1, "AB": 2, "BEATS": 0}


def _need_editing_model(svc: Service, what: str) -> None:
    if not svc.engine.can_edit:
        raise InvalidParameter(
            f"this model was trained without after-context (max_after_chunks = 0), so it cannot "
            f"{what}; /vary works with any model. Train with curriculum stages that have "
            "n_after > 0 (docs/training.md).",
            code="model_cannot_edit",
        )


def _plan(svc: Service, n: int, start: int, end: int, keep: int, names: str) -> None:
    try:
        svc.engine.edit_plan(n, start, end, keep)
    except ValueError as e:
        raise InvalidParameter(f"{names}: {e}") from None


def _too_short(svc: Service, n: int, what: str) -> None:
    """audio_too_short, as on every endpoint, when the input is shorter than one chunk."""
    rate, chunk = svc.engine.sample_rate, svc.engine.chunk_samples
    if n < chunk:
        raise InvalidParameter(
            f"audio: {what} needs at least {chunk / rate:g} s of input (one chunk), got "
            f"{n / rate:.2f} s", code="audio_too_short")


async def _musical_span(svc: Service, audio, given: dict) -> tuple[float, float, str]:
    """(start, end) in seconds from start/end, start_bar/bars or start_beat/beats; and, for bars
    or beats, how the span reads in them (prefixed to any error about it)."""
    ways = [w for w, names in (("seconds", ("start", "end")), ("bars", ("start_bar", "bars")),
                               ("beats", ("start_beat", "beats")))
            if any(given.get(k) is not None for k in names)]
    if len(ways) > 1:
        raise InvalidParameter(
            f"give the span one way: start/end (seconds), start_bar/bars or start_beat/beats; "
            f"got {' and '.join(ways)}")
    if not ways or ways[0] == "seconds":
        return (parse_seconds("start", given.get("start")),
                parse_seconds("end", given.get("end")), "")
    first, count = ("start_bar", "bars") if ways[0] == "bars" else ("start_beat", "beats")
    if given.get(first) is None:
        raise InvalidParameter(f"{first}: required with {count} (numbered from 1)")
    i = parse_int(first, given[first], 1, 1, 100_000)
    k = parse_int(count, given.get(count), 1, 1, 1000)
    a = await analysis_of(audio, svc.engine.sample_rate, f"{first}/{count}")
    try:
        start, end = (bar_span if count == "bars" else beat_span)(a, i, k)
    except ValueError as e:
        raise InvalidParameter(f"{first}/{count}: {e}") from None
    unit = count[:-1] + "s" * (k != 1)
    return start, end, (f"{first}/{count}: {k} {unit} from {first[6:]} {i} = {start:.3f} to "
                        f"{end:.3f} s at {a.tempo:.1f} BPM ({a.time_signature}); ")


def _span(svc: Service, n: int, start: float, end: float) -> tuple[int, int]:
    """The span to inpaint in samples, checked in the seconds the user gave."""
    _too_short(svc, n, "inpainting")
    rate, chunk = svc.engine.sample_rate, svc.engine.chunk_samples
    if end <= start:
        raise InvalidParameter(
            f"start/end: the span is empty or reversed (start {start:g} s, end {end:g} s); "
            "end must come after start")
    if end > n / rate:
        raise InvalidParameter(
            f"end: {end:g} s is past the end of the input ({n / rate:.3f} s)")
    if end - start > chunk / rate:
        raise InvalidParameter(
            f"start/end: a span of {end - start:g} s ({start:g} to {end:g} s) is longer than one "
            f"chunk ({chunk / rate:g} s); inpaint a longer stretch in pieces")
    # The regenerated chunk lies on the codec's grid inside the input: its last possible end.
    pad = svc.engine.codec.pad_samples
    last = ((n - chunk) // pad * pad + chunk) / rate
    if end > last:
        raise InvalidParameter(
            f"end: {end:g} s is too close to the end of the input ({n / rate:.3f} s): a span is "
            f"regenerated inside a {chunk / rate:g} s chunk on the {pad / rate:g} s grid, so it "
            f"can end at most at {last:.3f} s here")
    return round(start * rate), round(end * rate)


async def _run(request: Request, svc: Service, kind: str, payload, params, headers) -> Response:
    job = svc.batcher.submit_edit(kind, payload, params)
    try:
        out = await _until_done_or_gone(request, job.future)
    except ClientGone:
        svc.batcher.cancel(job)
        return Response(status_code=499)
    wav = await run_in_threadpool(write_wav, out, svc.engine.sample_rate)
    return Response(wav, media_type="audio/wav", headers=headers)


_WAV = {200: {"content": {"audio/wav": {}}, "description": "32 kHz mono 16-bit WAV"}}


@router.post("/inpaint", summary="Regenerate a span of the input from what surrounds it",
             response_class=Response, responses=_WAV, openapi_extra=_openapi(INPAINT_PARAMS))
async def inpaint(request: Request, _: AuthDep, svc: ReadyDep) -> Response:
    """The whole input back, with [start, end) regenerated at every level from the audio before
    and after it and crossfaded in over 64 ms at both ends. X-Edit-Start / X-Edit-End say which
    samples changed (the crossfades included)."""
    _need_editing_model(svc, "fill in a span between given audio")
    given, audio = await _read_input(request, svc, INPAINT_PARAMS)
    params = _sampling(given, svc)
    style = style_request(request, given, svc)
    check_budget(params, 1, svc.settings.max_request_passes, style is not None)
    start_s, end_s, said = await _musical_span(svc, audio, given)
    try:
        start, end = _span(svc, len(audio), start_s, end_s)
        _plan(svc, len(audio), start, end, 0, "start/end")
    except InvalidParameter as e:
        raise InvalidParameter(said + e.detail, code=e.code) from None
    headers = _wav_headers(svc, params, None, **{
        "X-Edit-Start": max(0, start - JOIN_SAMPLES),
        "X-Edit-End": min(len(audio), end + JOIN_SAMPLES),
        "X-Span-Seconds": f"{start / svc.engine.sample_rate:.4f},"
                          f"{end / svc.engine.sample_rate:.4f}"})
    return await _run(request, svc, "edit", EditRequest(audio, start, end, 0, params, style=style),
                      params,
                      headers)


@router.post("/loop", summary="Make the input loop: a chunk that leads from its end to its start",
             response_class=Response, responses=_WAV, openapi_extra=_openapi(LOOP_PARAMS))
async def loop(request: Request, _: AuthDep, svc: ReadyDep) -> Response:
    """The input followed by a generated 6.144 s bridge that continues its end and leads back
    into its start. Play the whole file on repeat (X-Loop-Samples = its length); X-Input-Samples
    says where the bridge begins. Needs at least one chunk (6.144 s) of input."""
    _need_editing_model(svc, "generate a chunk that leads back into the clip's start")
    given, audio = await _read_input(request, svc, LOOP_PARAMS)
    params = _sampling(given, svc)
    check_budget(params, 1, svc.settings.max_request_passes)
    chunk, rate = svc.engine.chunk_samples, svc.engine.sample_rate
    extra = {}
    if given.get("bars") is not None:
        bars = parse_int("bars", given["bars"], 0, 1, 1000)
        a = await analysis_of(audio, rate, "bars")
        try:
            s, e = loop_span(a, bars, chunk / rate, chunk / rate)
        except ValueError as err:
            raise InvalidParameter(f"bars: {err}") from None
        first = round(s * rate)
        audio = audio[first: first + round((e - s) * rate)]
        extra = {"X-Loop-Start": first, "X-Bars": bars, "X-Tempo": f"{a.tempo:.2f}",
                 "X-Time-Signature": a.time_signature}
    _too_short(svc, len(audio), "a loop (its first chunk is what the bridge leads into)")
    headers = _wav_headers(svc, params, len(audio), **{"X-Loop-Samples": len(audio) + chunk},
                           **extra)
    return await _run(request, svc, "loop", audio, params, headers)


@router.post("/vary", summary="Regenerate a chunk's finer levels under its own coarse ones",
             response_class=Response, responses=_WAV, openapi_extra=_openapi(VARY_PARAMS))
async def vary(request: Request, _: AuthDep, svc: ReadyDep) -> Response:
    """The whole input back, with the 6.144 s chunk at `start` (default: the input's last whole
    chunk) regenerated above the kept levels: keep=A keeps melody and rhythm, keep=AB also the
    next level; the rest (timbre, texture) is new. Crossfaded in over 64 ms at both ends."""
    given, audio = await _read_input(request, svc, VARY_PARAMS)
    params = _sampling(given, svc)
    style = style_request(request, given, svc)
    check_budget(params, 1, svc.settings.max_request_passes, style is not None)
    raw_keep = (given.get("keep") or "A").strip().upper()
    if raw_keep not in KEEP:
        raise InvalidParameter(f"keep: A, AB or beats, got {given.get('keep')!r}")
    rate, chunk, pad = svc.engine.sample_rate, svc.engine.chunk_samples, svc.engine.codec.pad_samples
    _too_short(svc, len(audio), "a variation")
    last = (len(audio) - chunk) // pad * pad
    start = parse_seconds("start", given.get("start"), last / rate)
    start = int(round(start * rate)) // pad * pad
    if start > last:
        raise InvalidParameter(
            f"start: the chunk must end inside the input; start at most {last / rate:.3f} s, got "
            f"{start / rate:.3f} s")
    _plan(svc, len(audio), start, start + chunk, KEEP[raw_keep], "start")
    hold: tuple[tuple[int, int], ...] = ()
    extra = {}
    if raw_keep == "BEATS":
        a = await analysis_of(audio, rate, "keep=beats")
        hold = tuple((round(x * rate), round(y * rate))
                     for x, y in beat_holds(a, start / rate, (start + chunk) / rate))
        if not hold:
            raise InvalidParameter(
                f"keep=beats: no beat found in the chunk from {start / rate:.3f} to "
                f"{(start + chunk) / rate:.3f} s (the input's beats run from {a.beats[0]:.2f} to "
                f"{a.beats[-1]:.2f} s); choose another start, or keep A or AB")
        extra = {"X-Held-Beats": len(hold), "X-Tempo": f"{a.tempo:.2f}"}
        raw_keep = "beats"
    headers = _wav_headers(svc, params, None, **{"X-Chunk-Start": start, "X-Keep": raw_keep},
                           **extra)
    return await _run(request, svc, "edit",
                      EditRequest(audio, start, start + chunk, KEEP[raw_keep.upper()], params,
                                  hold=hold, style=style), params, headers)
