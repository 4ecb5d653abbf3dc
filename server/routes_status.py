"""Liveness, readiness, model info, Prometheus metrics and the static page."""

from __future__ import annotations

import dataclasses
from importlib import metadata
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import AuthDep, ReadyDep, ServiceDep
from server.errors import InvalidParameter, NotFound

router = APIRouter(tags=["status"])
PAGE = Path(__file__).parent / "static" / "index.html"
FAVICON = Path(__file__).parent / "static" / "favicon.svg"


def version() -> str:
    try:
        return metadata.version("snac-dit")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@router.get("/health", summary="Liveness: the process and its engine worker are running")
async def health(svc: ServiceDep):
    # Before the engine is loaded there is no worker yet; that is not a failure of liveness.
    if svc.batcher is not None and not svc.batcher.alive:
        return JSONResponse({"status": "worker_down"}, status_code=503)
    # A CUDA error other than out-of-memory left the device unusable (model.engine.DeviceFault):
    # only a new process recovers, so the health check fails and the container is restarted.
    if not getattr(svc.engine, "healthy", True):
        return JSONResponse({"status": "device_fault"}, status_code=503)
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: weights loaded, warmed up, accepting work")
async def ready(svc: ServiceDep):
    ok = (svc.ready and svc.batcher is not None and svc.batcher.alive
          and getattr(svc.engine, "healthy", True))
    body = {"ready": ok, "queue_depth": svc.batcher.depth() if svc.batcher else 0}
    return JSONResponse(
        body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "5"}
    )


@router.get("/info", summary="Model config, codec, chunk geometry, defaults and limits")
async def info(_: AuthDep, svc: ReadyDep):
    s = svc.settings
    return {
        "version": version(),
        "engine": svc.engine.info(),
        "codec": svc.codec,
        "defaults": dataclasses.asdict(svc.defaults) | {"seed": None},
        "limits": {
            "max_batch": s.max_batch,
            "max_wait_ms": s.max_wait_ms,
            "max_queue": s.max_queue,
            "max_upload_mb": s.max_upload_mb,
            "max_chunks": s.max_chunks,
            "max_steps": s.max_steps,
            "max_request_passes": s.max_request_passes,
            "min_input_seconds": s.min_input_seconds,
            "max_input_seconds": s.max_input_seconds,
        },
        "sample_rate": svc.engine.sample_rate,
        "chunk_samples": svc.engine.chunk_samples,
        "context_samples": svc.engine.context_samples,
        "n_levels": svc.engine.codec.n_levels,
    }


@router.get("/actions/{action}/example",
            summary="Hear a style action: the chunk that selects it most strongly (OGG)",
            response_class=FileResponse,
            responses={200: {"content": {"audio/ogg": {}}},
                       404: {"description": "no_example: the actions have not been described"},
                       422: {"description": "no_style_actions, or action out of range"}})
async def action_example(action: str, _: AuthDep, svc: ReadyDep):
    k = svc.engine.style_actions
    if not k:
        raise InvalidParameter("this model has no style actions (it was trained without them)",
                               code="no_style_actions")
    try:
        a = int(action)
    except ValueError:
        a = -1
    if not 0 <= a < k:
        raise InvalidParameter(f"action must be an integer in [0, {k - 1}], got {action!r}")
    path = svc.engine.action_example(a)
    if path is None:
        raise NotFound(f"action {a} has no example: its model's actions have not been described "
                       "(python -m training.dit.actions writes them beside the weights)",
                       code="no_example")
    return FileResponse(path, media_type="audio/ogg", filename=f"action-{a}.ogg")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(_: AuthDep, svc: ServiceDep):
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(PAGE, media_type="text/html")


@router.get("/favicon.svg", include_in_schema=False)
@router.get("/favicon.ico", include_in_schema=False)  # where browsers look without a <link>
async def favicon():
    return FileResponse(FAVICON, media_type="image/svg+xml")
