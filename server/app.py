"""`create_app(settings)`: the FastAPI app. Its lifespan loads the engine, warms it, starts the
batching worker, then reports ready; on shutdown it fails what is still queued with 503.

Run with `python -m server`, or `uvicorn --factory server.app:create_app`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from audio.analysis import warmup as warm_analysis
from model.fast import apply_fast_path
from server.batcher import Batcher
from server.codec_check import check_codec, codec_report
from server.deps import Service
from server.errors import install_error_handlers
from server.memory import MemoryKeeper, TrimWhenIdle
from server.metrics import Metrics, MetricsMiddleware
from server.origin import CrossOriginGuard
from server.params import PARAM_HEADERS, per_level
from server.routes_analyze import router as analyze_router
from server.routes_edit import router as edit_router
from server.routes_generate import router as generate_router
from server.routes_status import router as status_router
from server.routes_status import version
from server.settings import Settings, missing_weights_message

log = logging.getLogger("server")


class WeightsMissing(RuntimeError):
    """Raised instead of serving an untrained model; the message says how to get weights."""


def load_engine(settings: Settings):
    """Load the engine the settings name (blocking; run it off the event loop)."""
    message = missing_weights_message(settings)
    if message:
        raise WeightsMissing(message)
    import torch

    from model.codec import Codec
    from model.engine import ContinuationEngine
    from model.weights import read_dit_config

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            log.warning("no GPU: serving on CPU, continuations will be slow")
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    # The codec first: a pair that cannot work is refused before the DiT is read.
    codec = Codec.load(settings.codec, device=device)
    report = codec_report(codec, read_dit_config(settings.weights).get("codec"), settings.codec)
    warning = check_codec(report, str(settings.weights), settings.allow_codec_mismatch)
    if warning:
        log.warning(warning)
    engine = ContinuationEngine.load(settings.weights, codec, device=device, dtype=dtype)
    engine.codec_report = report  # what /info says about the codec (server.codec_check)
    return engine


def _defaults(engine, settings: Settings):
    defaults = engine.default_params
    if settings.default_steps:
        steps = per_level(
            "SNAC_DIT_DEFAULT_STEPS", settings.default_steps, engine.codec.n_levels, int
        )
        defaults = dataclasses.replace(defaults, steps=steps)
    return defaults.validated(engine.codec.n_levels)


# Swagger UI's JS and CSS, served from the fastapi-offline package (Swagger UI 5, which reads
# the OpenAPI 3.1 document FastAPI emits), so /docs works on a machine without internet.
DOCS_ASSETS = "/docs-assets"


def create_app(settings: Settings | None = None, engine=None) -> FastAPI:
    """Build the app. `engine`: an already loaded engine (tests; several apps can share one)."""
    settings = settings or Settings()
    metrics = Metrics(settings.max_batch)
    service = Service(settings=settings, metrics=metrics,
                      memory=MemoryKeeper(enabled=settings.trim_memory))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        eng = engine if engine is not None else await asyncio.to_thread(load_engine, settings)
        service.engine = eng
        # The CPU levers (model/fast.py) before the warm-up, which pays any compile.
        levers = await asyncio.to_thread(apply_fast_path, eng, settings.fast_path())
        log.info("fast path: %s", "; ".join(f"{k} {'on' if v['on'] else 'off'} ({v['detail']})"
                                            for k, v in levers.items()))
        # An engine built in code has no DiT directory to compare with: "codes_match" is null.
        service.codec = getattr(eng, "codec_report", None) or codec_report(eng.codec, None, None)
        service.defaults = _defaults(eng, settings)
        service.batcher = Batcher(
            eng, metrics, settings.max_batch, settings.max_wait_ms, settings.max_queue
        )
        service.batcher.start()
        service.upload_slots = asyncio.Semaphore(settings.max_concurrent_uploads)
        if settings.warmup:
            # First-call costs (allocator, kernel compiles, autotuning) are paid here, not by
            # the first user, on the shapes serving runs: the full 12.288 s context first,
            # with the lead-in /continue asks for; one step per level.
            await service.batcher.run_on_engine(eng.warmup, service.defaults)
            await asyncio.to_thread(warm_analysis, eng.sample_rate)  # /analyze, bars and beats
        service.ready = True
        log.info("engine ready on %s; accepting requests", getattr(eng, "device", "?"))
        try:
            yield
        finally:
            service.ready = False
            await service.batcher.close()

    app = FastAPIOffline(
        title="snac-dit",
        version=version(),
        summary="Continue music: 12.288 s of audio in, the next 6.144 s out.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        static_url=DOCS_ASSETS,
        favicon_url=f"{DOCS_ASSETS}/favicon.png",
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(generate_router)
    app.include_router(edit_router)
    app.include_router(analyze_router)
    app.include_router(status_router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=[
                *PARAM_HEADERS,
                "X-Sample-Rate",
                "X-Input-Samples",
                "X-Chunks",
                "X-Edit-Start",
                "X-Edit-End",
                "X-Loop-Samples",
                "X-Chunk-Start",
                "X-Keep",
                "Retry-After",
            ],
        )
    app.add_middleware(CrossOriginGuard, allowed_origins=settings.cors_origins)
    # Big uploads' freed buffers go back to the system once no request is in flight.
    app.add_middleware(TrimWhenIdle, keeper=service.memory)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
