"""What handlers receive by dependency: the running service and the API-key check."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.batcher import Batcher
from server.errors import Unauthorized, Unavailable
from server.memory import MemoryKeeper
from server.metrics import Metrics
from server.settings import Settings


@dataclass
class Service:
    """Everything the lifespan builds, kept on `app.state.service`."""

    settings: Settings
    metrics: Metrics
    engine: object = None  # ContinuationEngine once loaded
    codec: dict | None = None  # which codec and decoder serve (server.codec_check.codec_report)
    batcher: Batcher | None = None
    defaults: object = None  # SamplingParams the server applies when a field is not given
    ready: bool = False
    # Uploads being read and decoded now; bounded by settings.max_concurrent_uploads.
    upload_slots: asyncio.Semaphore | None = field(default=None, repr=False)
    memory: MemoryKeeper = field(default_factory=MemoryKeeper, repr=False)  # trims when idle


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_ready_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    if not svc.ready or svc.batcher is None or not svc.batcher.alive:
        raise Unavailable("the model is not loaded yet", code="not_ready", retry_after=5)
    return svc


def check_api_key(request: Request) -> None:
    key = request.app.state.service.settings.api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not secrets.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise Unauthorized(
            "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')"
        )


ServiceDep = Annotated[Service, Depends(get_service)]
ReadyDep = Annotated[Service, Depends(get_ready_service)]
AuthDep = Annotated[None, Depends(check_api_key)]
