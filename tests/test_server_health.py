"""Serving on a device that can fail: the start-up warm-up runs the shapes serving runs, and a
device fault (a CUDA error other than out-of-memory) fails /health so the process is restarted.

Through HTTP with the real app and a real debug engine (CPU); the fault is imitated by making the
DiT raise the error CUDA raises.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.conftest import tone
from tests.test_server import assert_error, post, wav_bytes


@pytest.fixture
def engine(debug_weights_dir, debug_codec_dir):
    from model.engine import ContinuationEngine

    return ContinuationEngine.load(debug_weights_dir, debug_codec_dir)


def test_startup_warms_up_on_the_full_context_with_the_lead_in(engine, monkeypatch):
    from model.engine import JOIN_SAMPLES

    calls = []
    real = engine.continue_batch

    def spy(audios, params=None, **kw):
        calls.append(([len(a) for a in audios], kw.get("lead_in", 0)))
        return real(audios, params, **kw)

    monkeypatch.setattr(engine, "continue_batch", spy)
    with TestClient(create_app(Settings(warmup=True, max_wait_ms=1), engine=engine)) as c:
        assert c.get("/ready").status_code == 200  # ready only once the warm-up is done
        warmup_calls = list(calls)
    assert warmup_calls, "no warm-up ran"
    # The two-chunk context first (its layouts run other kernel shapes than one chunk's), with
    # the lead-in every /continue asks for; then the shorter context.
    assert warmup_calls[0] == ([engine.context_samples], JOIN_SAMPLES)
    assert [n for n, _ in warmup_calls] == [
        [k * engine.chunk_samples] for k in range(engine.context_chunks, 0, -1)]
    assert {lead for _, lead in warmup_calls} == {JOIN_SAMPLES}


def test_a_device_fault_fails_health_and_readiness(engine):
    app = create_app(Settings(warmup=False, max_wait_ms=1), engine=engine)
    clip = wav_bytes(tone(2.0))
    with TestClient(app) as c:
        assert c.get("/health").json() == {"status": "ok"}
        real = engine.dit.forward
        engine.dit.forward = lambda *a, **kw: (_ for _ in ()).throw(
            RuntimeError("CUDA error: an illegal memory access was encountered"))
        try:
            assert_error(post(c, "/continue", clip, "steps=1&seed=1"), 503, "engine_error")
        finally:
            engine.dit.forward = real
        assert not engine.healthy
        r = c.get("/health")
        assert r.status_code == 503, r.text  # a container health check restarts the process
        assert r.json() == {"status": "device_fault"}
        assert c.get("/ready").status_code == 503
        # Later work fails fast (DeviceFault) instead of touching the dead device again.
        assert_error(post(c, "/continue", clip, "steps=1&seed=1"), 503)
