"""POST /analyze: tempo, beats, bars and key of an upload; and the musical units of the edits.

The analysis is `audio.analysis` (librosa's beat tracker, offline, CPU), run off the event
loop. The editing endpoints call `analysis_of` when they are given bars or beats; an input
without a steady beat answers 422 `no_steady_beat` there, while seconds keep working.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from audio.analysis import Analysis, NoSteadyBeat, analyze
from server.deps import AuthDep, ReadyDep
from server.errors import InvalidParameter
from server.routes_generate import _openapi, _read_input

router = APIRouter(tags=["analyze"])

ANALYZE_PARAMS: tuple[str, ...] = ()


async def analysis_of(audio, rate: int, why: str) -> Analysis:
    """The input's musical time, or 422 no_steady_beat naming what needed it."""
    try:
        return await run_in_threadpool(analyze, audio, rate)
    except NoSteadyBeat as e:
        raise InvalidParameter(f"{why}: {e}", code="no_steady_beat") from None


@router.post("/analyze", summary="Tempo, beats, downbeats, time signature and key of the input",
             openapi_extra=_openapi(ANALYZE_PARAMS),
             responses={200: {"description": "JSON: tempo (BPM), beats and downbeats (s), "
                                             "beats_per_bar, time_signature, key"},
                        422: {"description": "no_steady_beat: no beat to count bars on"}})
async def analyze_(request: Request, _: AuthDep, svc: ReadyDep) -> dict:
    """Same upload rules as every endpoint. Times are seconds into the input; bar 1 starts at
    the first downbeat. 422 `no_steady_beat` for silence, noise or music in free time."""
    _, audio = await _read_input(request, svc, ANALYZE_PARAMS)
    a = await analysis_of(audio, svc.engine.sample_rate, "audio")
    return a.to_json()
