"""Server settings, read from the environment (prefix SNAC_DIT_) inside `create_app`.

Nothing here is read at import time: tests build many apps with different settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.fast import FastPath

# A Hugging Face hub id is exactly "owner/name"; anything else is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SNAC_DIT_", extra="ignore")

    # Where `make serve` looks by default; see docs/server.md for how to produce both.
    weights: Path = Path("weights/demo/dit")
    codec: str = "weights/demo/codec"  # hub id ("owner/name") or a local codec dir
    device: str = "auto"  # "auto" = cuda when available, else cpu (with a warning)
    dtype: str = "auto"  # "auto" lets the engine choose; or float32 / bfloat16 / float16
    # A codec whose codes fingerprint is not the one the DiT was trained on is refused at
    # startup (its tokens mean nothing to the DiT); True serves the pair anyway, with a warning.
    allow_codec_mismatch: bool = False

    # Dynamic batching: a batch closes when full or when its oldest request has waited this
    # long. A few ms costs nothing next to a multi-second continuation and lets bursts batch.
    max_batch: int = Field(8, ge=1)
    max_wait_ms: float = Field(20.0, ge=0)
    # Requests waiting (queued + running /extend streams) before new ones get 429.
    max_queue: int = Field(64, ge=1)
    max_upload_mb: float = Field(50.0, gt=0)
    # Uploads being received + decoded at once. Each holds its body and decoded audio in RAM
    # (8 x 46 MB uploads took RSS from 0.9 to 2.7 GB, measured). One more waits up to
    # upload_slot_wait_s for a slot, its body unread, then gets 503.
    max_concurrent_uploads: int = Field(4, ge=1)
    upload_slot_wait_s: float = Field(2.0, ge=0)
    # The whole body must arrive within this many seconds (else 408): a client dripping bytes
    # cannot hold a connection and an upload slot forever. 50 MB in 120 s needs ~3.5 Mbit/s.
    upload_timeout_s: float = Field(120.0, gt=0)
    max_chunks: int = Field(8, ge=1)  # bound on /extend?chunks=N
    max_steps: int = Field(256, ge=1)  # per level; bounds the work one request can ask for
    # Model passes one request may cost: sum of steps over levels (guided levels twice) x
    # chunks. The defaults (16+12+8+8) x 8 chunks = 352; 1024 allows e.g. 8 guided chunks.
    max_request_passes: int = Field(1024, ge=1)
    min_input_seconds: float = Field(1.0, ge=0)
    # At most the last 12.288 s are used; the bound keeps a small compressed upload from
    # decoding into gigabytes of float32.
    max_input_seconds: float = Field(600.0, gt=0)
    default_steps: str | None = None  # e.g. "16,12,8,8"; overrides the engine's default

    api_key: SecretStr | None = None  # when set, /continue /extend /info /metrics need it
    # Closed by default: the page is served same-origin and needs no CORS.
    cors_origins: Annotated[list[str], NoDecode] = []
    warmup: bool = True  # engine.warmup() at startup (full context), so the first user is not slow
    # The CPU fast path (model/fast.py, docs/server.md): /info and the start-up log say which
    # levers serve. maskless and inplace_snake are exact, so on; int8 Linear layers change the
    # numbers (a rougher seam measured, docs/benchmarks.md), so they are opt-in.
    maskless: bool = True
    inplace_snake: bool = True
    int8: bool = False
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = torch's default (one per core)
    # Hand freed memory back to the system (glibc malloc_trim) once big uploads are served
    # and the server is idle; off only to measure what it saves (bench/server_load.py).
    trim_memory: bool = True

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v):
        # compose passes SNAC_DIT_API_KEY= when unset; an empty key must not mean "any key".
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v):
        # Accept "a,b" as well as a JSON list, the usual shapes of an env var.
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    def fast_path(self) -> FastPath:
        return FastPath(maskless=self.maskless, inplace_snake=self.inplace_snake, int8=self.int8,
                        threads=self.threads)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def codec_is_hub_id(self) -> bool:
        return not Path(self.codec).exists() and bool(_HUB_ID.match(self.codec))


def missing_weights(settings: Settings) -> list[str]:
    """What is missing for the engine to load, as human instructions; empty when all is there.

    Checked before loading so a fresh checkout says what to do instead of a traceback.
    """
    problems = []
    w = settings.weights
    if not (w / "model.safetensors").is_file() or not (w / "config.json").is_file():
        problems.append(
            f"DiT weights not found at '{w}' (SNAC_DIT_WEIGHTS; expected model.safetensors "
            "and config.json there).\n"
            "    on a CPU, the demo DiT (docs/training.md, \"The demo DiT\"):\n"
            "      python -m training.tokens --audio data/corpus --out data/tokens_demo "
            "--codec weights/demo/codec\n"
            "      python training/train.py --config training/configs/dit_demo.toml\n"
            "    on a GPU: python training/train.py (the base preset; docs/training.md)\n"
            f"    export: python -m training.dit.export RUN_OR_CKPT {w} --fp16"
        )
    if not settings.codec_is_hub_id() and not Path(settings.codec).is_dir():
        problems.append(
            f"codec not found at '{settings.codec}' (SNAC_DIT_CODEC: a local codec dir or a "
            "Hugging Face hub id).\n"
            "    pretrained: SNAC_DIT_CODEC=hubertsiuzdak/snac_32khz (downloads from the hub)\n"
            "    or train one: python training/train_codec.py --config "
            "training/configs/codec_demo.toml (docs/codec-training.md), then use its "
            "export/ dir as SNAC_DIT_CODEC\n"
            "    (use the codec the DiT was trained with)"
        )
    return problems


def missing_weights_message(settings: Settings) -> str | None:
    problems = missing_weights(settings)
    if not problems:
        return None
    return (
        "snac-dit server cannot start: the model is missing.\n  - "
        + "\n  - ".join(problems)
        + "\nSee docs/server.md."
    )
