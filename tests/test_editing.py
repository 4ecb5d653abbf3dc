"""Editing through the engine: inpaint a span, vary a chunk's finer levels, close a loop.

A random editing-layout DiT and the debug codec: this checks the plumbing (plans, splicing,
crossfades, batching, refusals); the memorised-songs test in test_sampler.py checks that the
sampler fills what a trained model knows.
"""

from __future__ import annotations

import pytest
import torch

from model.codec import Codec
from model.dit import DiT, DiTConfig
from model.engine import JOIN_SAMPLES, ContinuationEngine, EditRequest, EditUnsupported
from model.sampler import SamplingParams

CHUNK, PAD, RATE = 196_608, 12_288, 32_000
FAST = SamplingParams(steps=(2, 1, 1, 1), seed=5)


def make_engine(debug_codec_dir: str, after: int) -> ContinuationEngine:
    torch.manual_seed(0)
    codec = Codec.load(debug_codec_dir)
    dit = DiT(DiTConfig.from_name("debug", codebook_size=codec.codebook_size,
                                  max_after_chunks=after))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.05)
    return ContinuationEngine(codec, dit)


@pytest.fixture(scope="module")
def engine(debug_codec_dir):
    return make_engine(debug_codec_dir, after=1)


@pytest.fixture(scope="module")
def plain(debug_codec_dir):
    return make_engine(debug_codec_dir, after=0)


def clip(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * RATE)) / RATE
    return 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.01 * torch.randn(t.shape[0], generator=g)


def test_edit_plan_puts_the_span_in_a_grid_chunk_with_the_context_around_it(engine, plain):
    n = 4 * CHUNK
    t0, n_ctx, n_after = engine.edit_plan(n, 2 * CHUNK + 1000, 2 * CHUNK + 50_000)
    assert t0 % PAD == 0 and t0 <= 2 * CHUNK + 1000 and t0 + CHUNK >= 2 * CHUNK + 50_000
    assert n_ctx == min(2, t0 // CHUNK) and n_after == 1
    assert engine.edit_plan(n, 100, 5000)[:2] == (0, 0)            # at the start: no context
    assert engine.edit_plan(n, n - 5000, n)[2] == 0                # at the end: no after chunk
    assert plain.edit_plan(n, 2 * CHUNK, 2 * CHUNK + 1000)[2] == 0  # a model that cannot use it
    for bad in ((0, CHUNK + 1), (500, 400), (0, n + 1)):
        with pytest.raises(ValueError):
            engine.edit_plan(n, *bad)
    with pytest.raises(ValueError, match="at least one whole chunk"):
        engine.edit_plan(CHUNK - 1, 0, 100)


def test_inpaint_changes_the_span_only_and_joins_it_by_crossfades(engine):
    x = clip(20.0)
    start, end = int(9.0 * RATE), int(11.0 * RATE)
    (y,) = engine.edit_batch([EditRequest(x, start, end, params=FAST)])
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(y[: start - JOIN_SAMPLES], x[: start - JOIN_SAMPLES])
    assert torch.equal(y[end + JOIN_SAMPLES:], x[end + JOIN_SAMPLES:])
    assert not torch.allclose(y[start:end], x[start:end], atol=1e-3)
    step = (y[1:] - y[:-1]).abs()
    own = (x[1:] - x[:-1]).abs().max()
    for at in (start, end):            # no step at a join larger than the audio's own
        assert step[at - JOIN_SAMPLES - 1: at + JOIN_SAMPLES].max() <= max(
            own, step[start:end].max()) + 1e-3
    # Same seed, same result; alone or batched with another request of another layout.
    other = EditRequest(clip(8.0, 1), RATE, 2 * RATE, keep=1, params=FAST)
    again = engine.edit_batch([other, EditRequest(x, start, end, params=FAST)])[1]
    torch.testing.assert_close(again, y, atol=1e-5, rtol=0)


def test_variation_keeps_coarse_levels_and_works_without_after_context(engine, plain):
    x = clip(14.0)
    start = 6 * PAD
    for eng in (engine, plain):
        (y,) = eng.edit_batch([EditRequest(x, start, start + CHUNK, keep=2, params=FAST)])
        assert y.shape == x.shape and torch.equal(y[: start - JOIN_SAMPLES], x[: start - JOIN_SAMPLES])
    with pytest.raises(EditUnsupported, match="without after-context"):
        plain.edit_batch([EditRequest(x, start, start + RATE, params=FAST)])
    with pytest.raises(ValueError, match="keep"):
        engine.edit_batch([EditRequest(x, start, start + RATE, keep=4, params=FAST)])


def test_loop_appends_a_bridge_that_wraps_around_without_a_step(engine, plain):
    x = clip(9.0)
    (y,) = engine.loop_batch([x], [FAST])
    assert y.shape == (x.shape[0] + CHUNK,) and torch.isfinite(y).all()
    n = x.shape[0]
    assert torch.equal(y[JOIN_SAMPLES: n - JOIN_SAMPLES], x[JOIN_SAMPLES: n - JOIN_SAMPLES])
    wrap = torch.cat([y[-JOIN_SAMPLES:], y[:JOIN_SAMPLES]])   # played on repeat
    steps = (y[1:] - y[:-1]).abs().max()
    assert (wrap[1:] - wrap[:-1]).abs().max() <= steps + 1e-6
    with pytest.raises(EditUnsupported):
        plain.loop_batch([x], [FAST])
    with pytest.raises(ValueError, match="at least one whole chunk"):
        engine.loop_batch([clip(3.0)], [FAST])
