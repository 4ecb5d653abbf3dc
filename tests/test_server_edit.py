"""/inpaint, /loop and /vary through HTTP: the real app, an editing debug model, CPU."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.test_editing import make_engine
from tests.test_server import assert_error, post, read_wav, wav_bytes

SR, CHUNK, JOIN = 32000, 196_608, 2048
FAST = "steps=2,1,1,1&seed=3"


def song(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def client(debug_codec_dir):
    app = create_app(Settings(warmup=False, max_wait_ms=1), engine=make_engine(debug_codec_dir, 1))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def plain_client(debug_codec_dir):
    app = create_app(Settings(warmup=False, max_wait_ms=1), engine=make_engine(debug_codec_dir, 0))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, bytes]:
    data = wav_bytes(song(20.0))
    return read_wav(data)[0], data


def test_inpaint_returns_the_input_with_the_span_regenerated(client, clip):
    x, data = clip
    r = post(client, "/inpaint", data, f"{FAST}&start=9&end=10.5")
    assert r.status_code == 200, r.text
    y, rate, info = read_wav(r.content)
    assert rate == SR and info.channels == 1 and len(y) == len(x)
    a, b = int(r.headers["x-edit-start"]), int(r.headers["x-edit-end"])
    assert (a, b) == (9 * SR - JOIN, int(10.5 * SR) + JOIN)
    assert np.array_equal(y[:a], x[:a]) and np.array_equal(y[b:], x[b:])
    assert not np.allclose(y[9 * SR: int(10.5 * SR)], x[9 * SR: int(10.5 * SR)], atol=1e-2)
    assert r.headers["x-seed"] == "3"
    again = post(client, "/inpaint", data, f"{FAST}&start=9&end=10.5")
    assert again.content == r.content                        # the seed fixes the result


def test_loop_appends_a_bridge_and_says_how_to_loop(client, clip):
    x, data = clip
    r = post(client, "/loop", data, FAST)
    assert r.status_code == 200, r.text
    y = read_wav(r.content)[0]
    assert len(y) == len(x) + CHUNK == int(r.headers["x-loop-samples"])
    assert int(r.headers["x-input-samples"]) == len(x)
    assert np.array_equal(y[JOIN: len(x) - JOIN], x[JOIN: len(x) - JOIN])
    assert_error(post(client, "/loop", wav_bytes(song(4.0)), FAST), 422, "audio_too_short")


def test_vary_regenerates_a_chunk_above_the_kept_levels(client, plain_client, clip):
    x, data = clip
    for c in (client, plain_client):                    # any model can vary
        r = post(c, "/vary", data, f"{FAST}&keep=AB&start=6.2")
        assert r.status_code == 200, r.text
        y = read_wav(r.content)[0]
        start = int(r.headers["x-chunk-start"])
        assert start == int(6.2 * SR) // 12288 * 12288 and r.headers["x-keep"] == "AB"
        assert len(y) == len(x) and np.array_equal(y[: start - JOIN], x[: start - JOIN])
        assert np.array_equal(y[start + CHUNK + JOIN:], x[start + CHUNK + JOIN:])
    r = post(client, "/vary", data, FAST)               # default: the last whole chunk, keep A
    assert r.status_code == 200 and r.headers["x-keep"] == "A"
    assert int(r.headers["x-chunk-start"]) == (len(x) - CHUNK) // 12288 * 12288


@pytest.mark.parametrize("path,query,field", [
    ("/inpaint", "end=3", "start"),
    ("/inpaint", "start=3", "end"),
    ("/inpaint", "start=5&end=4", "start/end: the span is empty or reversed (start 5 s, end 4 s)"),
    ("/inpaint", "start=2&end=9", "a span of 7 s (2 to 9 s) is longer than one chunk (6.144 s)"),
    ("/inpaint", "start=19&end=25", "end: 25 s is past the end of the input (20.000 s)"),
    ("/inpaint", "start=19.9&end=20", "end: 20 s is too close to the end of the input (20.000 s)"
                                      ": a span is regenerated inside a 6.144 s chunk on the "
                                      "0.384 s grid, so it can end at most at 19.968 s here"),
    ("/inpaint", "start=nan&end=4", "start"),
    ("/inpaint", "start=1&end=2&keep=A", "unknown"),
    ("/vary", "keep=ABC", "keep"),
    ("/vary", "start=18", "start"),
    ("/vary", "start=-1", "start"),
    ("/loop", "chunks=2", "unknown"),
])
def test_bad_edit_parameters_are_422_naming_the_field(client, clip, path, query, field):
    r = post(client, path, clip[1], f"{FAST}&{query}")
    assert r.status_code == 422, (r.status_code, r.text)
    assert field in r.json()["detail"]


def test_errors_speak_seconds_never_samples(client, clip):
    for query in ("start=5&end=4", "start=2&end=9", "start=19&end=25", "start=19.9&end=20"):
        r = post(client, "/inpaint", clip[1], f"{FAST}&{query}")
        assert r.status_code == 422 and " s" in r.json()["detail"], r.text
        assert "sample" not in r.json()["detail"], r.text


@pytest.mark.parametrize("path", ["/continue", "/extend", "/inpaint", "/loop", "/vary"])
@pytest.mark.parametrize("seconds", [0.5, 3.0])
def test_too_short_input_is_audio_too_short_on_every_endpoint(client, path, seconds):
    """Below the server's minimum (1 s) everywhere; below one 6.144 s chunk where an edit needs a
    whole chunk (/continue and /extend left-pad such input instead)."""
    query = {"/extend": "&chunks=1", "/inpaint": "&start=0.1&end=0.4"}.get(path, "")
    r = post(client, path, wav_bytes(song(seconds)), FAST + query)
    if seconds == 3.0 and path in ("/continue", "/extend"):
        assert r.status_code == 200, r.text
        return
    assert_error(r, 422, "audio_too_short")
    assert f"{seconds:.2f} s" in r.json()["detail"], r.text


def test_a_model_without_after_context_refuses_inpaint_and_loop(plain_client, clip):
    for path, q in (("/inpaint", "start=9&end=10"), ("/loop", "")):
        assert_error(post(plain_client, path, clip[1], f"{FAST}&{q}"), 422, "model_cannot_edit",
                     "after-context")
    info = plain_client.get("/info").json()
    assert info["engine"]["editing"] == {"inpaint": False, "loop": False, "vary": True}


def test_openapi_documents_the_edit_endpoints(client):
    spec = client.get("/openapi.json").json()
    for path, names in (("/inpaint", {"start", "end", "steps", "seed"}), ("/loop", {"steps"}),
                        ("/vary", {"keep", "start"})):
        params = {p["name"] for p in spec["paths"][path]["post"]["parameters"]}
        assert names <= params, (path, params)
