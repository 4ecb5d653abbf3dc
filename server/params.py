"""HTTP parameters -> `SamplingParams`: per-level lists, strict names, errors naming the field.

`steps=16,12,8,8` sets each level; `steps=8` sets all levels. The same holds for temperature,
top_p, guidance and gumbel; `confidence` is `top` or `sampled`. Unknown names are rejected (a typo like `step=4` must not silently run the
defaults). The seed is resolved here, before the engine runs, so the response can report it.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping

from model.sampler import SamplingParams
from server.errors import InvalidParameter

SAMPLING_FIELDS = ("steps", "temperature", "top_p", "guidance", "gumbel", "confidence", "seed")
# Style actions (issue 37): a reference clip as a second file field 'style', or action=<k>;
# style_scale and style_guidance (cfg | icg) guide on it. Models without them answer 422.
STYLE_FIELDS = ("style", "action", "style_scale", "style_guidance")
CONTINUE_PARAMS = (*SAMPLING_FIELDS, *STYLE_FIELDS, "include_input")
EXTEND_PARAMS = (*CONTINUE_PARAMS, "chunks", "stream")
INPAINT_PARAMS = (*SAMPLING_FIELDS, *STYLE_FIELDS, "start", "end", "start_bar", "bars",
                  "start_beat", "beats")
LOOP_PARAMS = (*SAMPLING_FIELDS, "bars")
VARY_PARAMS = (*SAMPLING_FIELDS, *STYLE_FIELDS, "keep", "start")
SEED_MAX = 2**63 - 1
# The words pydantic accepts for a boolean, so every query, form field and SNAC_DIT_* setting
# reads the same way (any case).
_TRUE, _FALSE = ("true", "1", "yes", "on", "t", "y"), ("false", "0", "no", "off", "f", "n")


def reject_unknown(given: Mapping[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise InvalidParameter(
            f"unknown parameter(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}",
            code="unknown_parameter",
        )


def per_level(name: str, raw: str, n_levels: int, cast: type) -> tuple:
    items = [s.strip() for s in raw.split(",")]
    if len(items) not in (1, n_levels):
        raise InvalidParameter(
            f"{name}: expected one value or {n_levels} comma-separated values (one per level, "
            f"coarse to fine), got {len(items)} in {raw!r}"
        )
    try:
        values = [cast(s) for s in items]
    except ValueError:
        kind = "integers" if cast is int else "numbers"
        raise InvalidParameter(f"{name}: expected {kind}, got {raw!r}") from None
    if cast is float and not all(math.isfinite(v) for v in values):
        raise InvalidParameter(f"{name}: values must be finite, got {raw!r}")
    return tuple(values * n_levels if len(values) == 1 else values)


def parse_bool(name: str, raw: str | None, default: bool = False) -> bool:
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise InvalidParameter(
        f"{name}: expected a boolean ({' / '.join(_TRUE)} or {' / '.join(_FALSE)}), got {raw!r}")


def parse_int(name: str, raw: str | None, default: int, lo: int, hi: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidParameter(f"{name}: expected an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise InvalidParameter(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


def parse_seconds(name: str, raw: str | None, default: float | None = None) -> float:
    """A time in seconds: a finite non-negative number."""
    if raw is None:
        if default is None:
            raise InvalidParameter(f"{name}: required (seconds into the input)")
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise InvalidParameter(f"{name}: expected seconds (a number), got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidParameter(f"{name}: must be a finite number of seconds >= 0, got {raw!r}")
    return value


def sampling_params(
    given: Mapping[str, str], defaults: SamplingParams, n_levels: int, max_steps: int
) -> SamplingParams:
    """Overlay the given fields on `defaults`, check them, and fix a seed."""
    changes: dict = {}
    for name, cast in (
        ("steps", int),
        ("temperature", float),
        ("top_p", float),
        ("guidance", float),
        ("gumbel", float),
    ):
        if given.get(name) is not None:
            changes[name] = per_level(name, given[name], n_levels, cast)
    if given.get("confidence") is not None:
        changes["confidence"] = given["confidence"].strip().lower()
    if given.get("style_scale") is not None:
        try:
            changes["style_scale"] = float(given["style_scale"])
        except ValueError:
            raise InvalidParameter(f"style_scale: not a number: {given['style_scale']!r}") from None
    if given.get("style_guidance") is not None:
        changes["style_guidance"] = given["style_guidance"].strip().lower()
    steps = changes.get("steps", defaults.steps)
    if any(s < 1 for s in steps):
        raise InvalidParameter(f"steps: every level needs at least 1 step, got {steps}")
    if any(s > max_steps for s in steps):
        raise InvalidParameter(f"steps: at most {max_steps} per level on this server, got {steps}")
    seed = given.get("seed")
    changes["seed"] = (
        parse_int("seed", seed, 0, 0, SEED_MAX) if seed is not None else secrets.randbelow(2**31)
    )
    try:
        return dataclasses.replace(defaults, **changes).validated(n_levels)
    except ValueError as e:  # the sampler's own range checks; its message names the field
        raise InvalidParameter(str(e)) from None


def param_headers(p: SamplingParams) -> dict[str, str]:
    """Response headers stating exactly what ran, so a result can be reproduced."""

    def join(xs):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)

    return {
        "X-Seed": str(p.seed),
        "X-Steps": join(p.steps),
        "X-Temperature": join(p.temperature),
        "X-Top-P": join(p.top_p),
        "X-Guidance": join(p.guidance),
        "X-Gumbel": join(p.gumbel),
        "X-Confidence": p.confidence,
    }


PARAM_HEADERS = ("X-Seed", "X-Steps", "X-Temperature", "X-Top-P", "X-Guidance", "X-Gumbel",
                 "X-Confidence")


def request_passes(params: SamplingParams, chunks: int = 1, styled: bool = False) -> int:
    """Model passes one request costs: every denoising step of every level of every chunk, with
    guided levels counted twice (the unconditional rows are as much work again), and once more
    for guidance on a style (its reference rows)."""
    extra = int(styled and params.style_scale != 1.0)
    per_chunk = sum(s * (1 + (g != 1.0) + extra)
                    for s, g in zip(params.steps, params.guidance, strict=True))
    return per_chunk * chunks


def check_budget(params: SamplingParams, chunks: int, budget: int, styled: bool = False) -> None:
    cost = request_passes(params, chunks, styled)
    if cost > budget:
        raise InvalidParameter(
            f"compute_budget: this request needs {cost} model passes (steps {list(params.steps)}"
            f" per chunk, guided levels twice, style guidance once more, x {chunks} chunk{'s' * (chunks != 1)}); this "
            f"server allows at most {budget} (SNAC_DIT_MAX_REQUEST_PASSES). Ask for fewer "
            "steps or chunks.",
            code="compute_budget",
        )
