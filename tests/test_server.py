"""The HTTP contract against the real app and the real engine (debug weights, CPU).

Steps are kept at 1-2 per level: these tests check the contract, not the music.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.conftest import tone

SR = 32000
CHUNK = 196_608
FAST = "steps=2,2,1,1"


def wav_bytes(x: np.ndarray, rate: int = SR, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def read_wav(data: bytes) -> tuple[np.ndarray, int, sf._SoundFileInfo]:
    info = sf.info(io.BytesIO(data))
    x, rate = sf.read(io.BytesIO(data), dtype="float32")
    return x, rate, info


@pytest.fixture(scope="module")
def engine(debug_weights_dir, debug_codec_dir):
    from model.engine import ContinuationEngine

    return ContinuationEngine.load(debug_weights_dir, debug_codec_dir)


@pytest.fixture(scope="module")
def client(engine):
    settings = Settings(
        warmup=False, max_upload_mb=2, max_chunks=4, max_wait_ms=1, max_input_seconds=20
    )
    with TestClient(create_app(settings, engine=engine)) as c:
        yield c


@pytest.fixture(scope="module")
def clip() -> bytes:
    return wav_bytes(tone(2.0))


def post(client, path: str, data: bytes, query: str = FAST, ctype: str | None = None):
    if ctype is None:
        return client.post(f"{path}?{query}", files={"audio": ("clip.wav", data, "audio/wav")})
    return client.post(f"{path}?{query}", content=data, headers={"content-type": ctype})


def assert_error(r, status: int, code: str | None = None, mentions: str | None = None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and isinstance(body["detail"], str) and body["detail"]
    if code is not None:
        assert body["error"] == code, body
    if mentions is not None:
        assert mentions in body["detail"], body


def test_continue_returns_one_chunk_and_reports_a_reproducible_seed(client, clip):
    r = post(client, "/continue", clip, FAST)  # no seed: one is drawn and reported
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    x, rate, info = read_wav(r.content)
    assert (rate, info.channels, info.subtype, info.frames) == (SR, 1, "PCM_16", CHUNK)
    assert np.isfinite(x).all() and 0 < np.abs(x).max() <= 1.0
    assert r.headers["x-steps"] == "2,2,1,1"
    assert r.headers["x-top-p"] == "0.95,0.95,0.95,0.95"
    assert len(r.headers["x-temperature"].split(",")) == 4
    assert len(r.headers["x-guidance"].split(",")) == 4
    assert r.headers["x-sample-rate"] == str(SR)
    seed = int(r.headers["x-seed"])
    again = post(client, "/continue", clip, f"{FAST}&seed={seed}")
    assert again.headers["x-seed"] == str(seed)
    assert again.content == r.content  # the reported seed reproduces the bytes exactly


def test_form_field_params_and_include_input(client, clip):
    files = {"audio": ("a.wav", clip, "audio/wav")}
    r = client.post(
        "/continue", files=files, data={"steps": "1", "seed": "3", "include_input": "1"}
    )
    assert r.status_code == 200, r.text
    assert (r.headers["x-steps"], r.headers["x-seed"]) == ("1,1,1,1", "3")
    n_in = len(tone(2.0))
    x, rate, info = read_wav(r.content)
    assert info.frames == n_in + CHUNK
    assert r.headers["x-input-samples"] == str(n_in)
    # The input comes back first (16-bit), up to the crossfade into the continuation.
    from model.engine import JOIN_SAMPLES

    assert np.abs(x[: n_in - JOIN_SAMPLES] - tone(2.0)[: n_in - JOIN_SAMPLES]).max() < 1e-3
    # The same name in both the query and the form is ambiguous.
    r = client.post(f"/continue?{FAST}", files=files, data={"steps": "1"})
    assert_error(r, 422, "invalid_parameter", "steps")


def test_extend_three_chunks(client, clip):
    r = post(client, "/extend", clip, "chunks=3&steps=1&seed=5")
    assert r.status_code == 200, r.text
    x, rate, info = read_wav(r.content)
    assert (rate, info.channels, info.frames) == (SR, 1, 3 * CHUNK)
    assert r.headers["x-chunks"] == "3" and r.headers["x-seed"] == "5"
    # Chained chunks are new material, not one chunk repeated.
    assert not np.array_equal(x[:CHUNK], x[CHUNK : 2 * CHUNK])


def test_extend_is_seam_exact_over_http_streamed_or_not(client, engine, clip):
    """/extend's WAV equals a one-pass decode of the context and all its tokens (same seed),
    to 16-bit precision; the stream carries the same samples, split at the hold-back."""
    import base64
    import dataclasses

    import torch

    from audio import read_audio
    from model.sampler import derive_seed
    from model.sampler import extend as extend_tokens

    query = "chunks=3&steps=2,1,1,1&seed=5"
    whole = post(client, "/extend", clip, query)
    assert whole.status_code == 200, whole.text
    x, _, _ = read_wav(whole.content)
    r = post(client, "/extend", clip, query + "&stream=true")
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    pieces = [read_wav(base64.b64decode(m["audio"]))[0] for m in lines if m["event"] == "chunk"]
    H = engine.holdback_samples
    assert [len(p) for p in pieces] == [CHUNK - H, CHUNK, CHUNK + H]
    assert np.array_equal(np.concatenate(pieces), x)

    params = dataclasses.replace(engine.default_params, steps=(2, 1, 1, 1), seed=5)
    audio = torch.from_numpy(read_audio(clip, SR))
    context = engine._encode([audio])
    new = list(extend_tokens(engine.dit, context, 3, params, engine.diffusion.schedules))
    heard = engine.heard_context(context, engine._window(audio), new[0], 5)  # the join, decoded
    tokens = [torch.cat([c, *(n[lv] for n in new)], dim=1) for lv, c in enumerate(heard)]
    one_pass = engine.codec.decode(tokens, seed=derive_seed(5, 0, "decode") % 2**31)
    ctx = context[0].shape[1] // engine.codec.frames_per_chunk[0] * CHUNK  # 1 chunk for 2 s in
    ref, _, _ = read_wav(wav_bytes(one_pass[0, ctx:].clamp(-1, 1).numpy()))
    assert np.abs(x - ref).max() <= 1.5 / 32768


def test_short_clip_context_is_its_last_whole_chunk(client):
    """9 s in: the continuation comes from the last 6.144 s alone (the first 2.856 s change
    nothing), not from 12.288 s with silence in front."""
    nine = tone(9.0)
    other_start = np.concatenate([0.5 * tone(2.856, freq=330.0), nine[-CHUNK:]])
    a = post(client, "/continue", wav_bytes(nine), "steps=2,1,1,1&seed=3")
    b = post(client, "/continue", wav_bytes(other_start), "steps=2,1,1,1&seed=3")
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.content == b.content


def test_commit_order_parameters(client, clip):
    r = post(client, "/continue", clip, "steps=2,1,1,1&seed=3&confidence=sampled&gumbel=0.5")
    assert r.status_code == 200, r.text
    assert (r.headers["x-confidence"], r.headers["x-gumbel"]) == ("sampled", "0.5,0.5,0.5,0.5")
    assert post(client, "/continue", clip, "steps=2,1,1,1&seed=3").headers["x-confidence"] == "top"
    assert_error(post(client, "/continue", clip, "confidence=bogus"), 422, "invalid_parameter",
                 "confidence")
    assert_error(post(client, "/continue", clip, "gumbel=-1"), 422, "invalid_parameter", "gumbel")
    assert_error(post(client, "/continue", clip, "gumbel=1,2"), 422, "invalid_parameter",
                 "gumbel")


def _bad_inputs(clip: bytes) -> list[tuple[str, dict, int, str]]:
    """(name, request kwargs, status, error code)."""
    good = wav_bytes(tone(2.0))
    nan = tone(2.0)
    nan[100] = np.nan
    f = lambda data, name="clip.wav": {"files": {"audio": (name, data, "audio/wav")}}  # noqa: E731
    return [
        (
            "corrupt header",
            f(b"RIFX" + good[4:12] + b"garbage!" + good[20:]),
            400,
            "undecodable_audio",
        ),
        ("truncated file (header cut)", f(good[:30]), 400, "undecodable_audio"),
        ("truncated file (header only)", f(good[:44]), 400, "empty_audio"),
        ("zero bytes", f(b""), 400, "empty_audio"),
        (
            "text named .wav",
            f(b"this is not audio, only text\n" * 20, "notes.wav"),
            400,
            "undecodable_audio",
        ),
        ("NaN float WAV", f(wav_bytes(nan, subtype="FLOAT")), 400, "non_finite_audio"),
        ("0.5 s clip", f(wav_bytes(tone(0.5))), 422, "audio_too_short"),
        # 25 s > the 20 s limit here, in 200 kB: refused from its header, before decoding.
        ("too long", f(wav_bytes(tone(25.0, 8000), 8000, "PCM_U8")), 422, "audio_too_long"),
        ("over-limit body", f(b"\0" * (3 * 2**20)), 413, "payload_too_large"),
        (
            "unknown params",
            {"params": {"stepz": "2", "colour": "red"}, **f(good)},
            422,
            "unknown_parameter",
        ),
        ("steps=0", {"params": {"steps": "0"}, **f(good)}, 422, "invalid_parameter"),
        ("steps not a number", {"params": {"steps": "many"}, **f(good)}, 422, "invalid_parameter"),
        ("wrong level count", {"params": {"steps": "4,4"}, **f(good)}, 422, "invalid_parameter"),
        ("negative seed", {"params": {"seed": "-3"}, **f(good)}, 422, "invalid_parameter"),
        (
            "infinite temperature",
            {"params": {"temperature": "inf"}, **f(good)},
            422,
            "invalid_parameter",
        ),
        (
            "unsupported media type",
            {"content": good, "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            {"content": good, "headers": {"content-type": ""}},
            415,
            "unsupported_media_type",
        ),
        (
            "multipart without audio",
            {"files": {"sound": ("a.wav", good, "audio/wav")}},
            422,
            "unknown_parameter",
        ),
        (
            "multipart with only fields",
            {"data": {"steps": "2"}, "files": {}},
            415,
            "unsupported_media_type",
        ),
    ]


BAD_NAMES = [b[0] for b in _bad_inputs(b"")]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_gets_its_4xx_as_json(client, clip, name):
    _, kwargs, status, code = next(b for b in _bad_inputs(clip) if b[0] == name)
    r = client.post("/continue", **kwargs)
    assert_error(r, status, code)


def test_error_details_name_the_field(client, clip):
    r = post(client, "/continue", clip, "stepz=2&colour=red")
    assert_error(r, 422, "unknown_parameter", "colour")
    assert "stepz" in r.json()["detail"]
    for query, field in [
        ("steps=0", "steps"),
        ("top_p=x", "top_p"),
        ("seed=1.5", "seed"),
        ("include_input=maybe", "include_input"),
    ]:
        assert_error(post(client, "/continue", clip, query), 422, mentions=field)
    r = post(client, "/extend", clip, "chunks=5&steps=1")  # the limit here is 4
    assert_error(r, 422, "invalid_parameter", "chunks")
    assert_error(post(client, "/extend", clip, "chunks=0"), 422, mentions="chunks")
    assert_error(post(client, "/extend", clip, "chunks=2&stream=perhaps"), 422, mentions="stream")


@pytest.mark.parametrize("kind", ["6-channel 96 kHz", "8-bit unsigned, raw body", "truncated data"])
def test_unusual_but_valid_audio_is_accepted(client, kind):
    # DESIGN §6: any format libsndfile reads, any rate, any channel count. A file cut inside
    # its data decodes to what is there (libsndfile's behaviour), which is still usable audio.
    # (Stereo 44.1 kHz FLAC goes through tests/test_clients.py.)
    ctype = None
    if kind == "6-channel 96 kHz":
        data = wav_bytes(np.stack([tone(1.5, 96000, 220.0 * (i + 1)) for i in range(6)], 1), 96000)
    elif kind == "truncated data":
        full = wav_bytes(tone(3.0))
        data = full[: len(full) // 2]
    else:
        data, ctype = wav_bytes(tone(1.5), subtype="PCM_U8"), "audio/x-wav"
    r = post(client, "/continue", data, "steps=1", ctype=ctype)
    assert r.status_code == 200, r.text
    assert read_wav(r.content)[2].frames == CHUNK


def test_server_still_healthy_after_bad_inputs(client, clip):
    for _, kwargs, _, _ in _bad_inputs(clip):
        assert client.post("/continue", **kwargs).status_code < 500
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    assert post(client, "/continue", clip, "steps=1").status_code == 200


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/continue"), 405, "method_not_allowed")


def test_info_reports_geometry_defaults_limits(client):
    info = client.get("/info").json()
    assert info["sample_rate"] == SR and info["chunk_samples"] == CHUNK
    assert info["context_samples"] == 2 * CHUNK and info["n_levels"] == 4
    assert info["limits"]["max_chunks"] == 4
    assert len(info["defaults"]["steps"]) == 4
    assert isinstance(info["engine"], dict) and info["version"]
    json.dumps(info)  # JSON-able all the way down


def test_metrics_and_docs(client, clip):
    post(client, "/continue", clip, "steps=0")  # counted like any request, no engine work
    text = client.get("/metrics").text
    for name in (
        "snac_dit_requests_total",
        "snac_dit_request_seconds_bucket",
        "snac_dit_queue_depth",
        "snac_dit_batch_size_bucket",
        "snac_dit_engine_seconds",
    ):
        assert name in text, name
    assert 'snac_dit_requests_total{route="/continue",status="422"}' in text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    params = {p["name"] for p in spec["paths"]["/extend"]["post"]["parameters"]}
    assert {"steps", "seed", "chunks", "stream"} <= params


def test_api_key_guards_generation_not_health(engine, clip):
    settings = Settings(warmup=False, api_key="s3cret")
    with TestClient(create_app(settings, engine=engine)) as c:
        assert_error(
            c.post("/continue?steps=1", files={"audio": ("a.wav", clip)}), 401, "unauthorized"
        )
        assert_error(c.get("/info", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        # With the key a request gets past auth, here to the parameter check (no engine work).
        past = c.post(
            "/continue?steps=0",
            files={"audio": ("a.wav", clip)},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert_error(past, 422, "invalid_parameter")
        assert c.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_docs_list_every_endpoint_that_needs_the_api_key(engine):
    """docs/server.md's SNAC_DIT_API_KEY row names exactly the routes that answer 401 without
    the key (every route of the OpenAPI document, plus the page and the docs)."""
    import re
    from pathlib import Path

    row = next(line for line in (Path(__file__).parents[1] / "docs" / "server.md")
               .read_text().splitlines() if line.startswith("| `SNAC_DIT_API_KEY`"))
    documented = set(re.findall(r"`(/[\w{}/]*)`", row.split("need")[0]))
    with TestClient(create_app(Settings(warmup=False, api_key="s3cret"), engine=engine)) as c:
        routes = {(m, path) for path, ops in c.get("/openapi.json").json()["paths"].items()
                  for m in ops} | {("get", "/"), ("get", "/docs")}
        guarded = {path for m, path in routes if c.request(m, path).status_code == 401}
    assert guarded == documented, (guarded, documented)
    assert {"/continue", "/extend", "/inpaint", "/loop", "/vary", "/info", "/metrics"} <= guarded


@pytest.mark.parametrize("word,value", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True), ("t", True),
    ("Y", True), ("false", False), ("0", False), ("no", False), ("Off", False), ("f", False),
    ("n", False),
])
def test_booleans_read_the_same_words_everywhere(client, clip, monkeypatch, word, value):
    """include_input (/continue) and stream (/extend) read the words the SNAC_DIT_* settings
    read, and refuse the same others."""
    monkeypatch.setenv("SNAC_DIT_WARMUP", word)
    assert Settings().warmup is value
    r = post(client, "/continue", clip, f"{FAST}&seed=1&include_input={word}")
    assert r.status_code == 200 and ("x-input-samples" in r.headers) is value, r.text
    r = post(client, "/extend", clip, f"{FAST}&seed=1&chunks=1&stream={word}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson") is value


@pytest.mark.parametrize("name", ["include_input", "stream"])
def test_a_word_that_is_not_a_boolean_is_refused_the_same_way(client, clip, monkeypatch, name):
    monkeypatch.setenv("SNAC_DIT_WARMUP", "maybe")
    with pytest.raises(ValueError):
        Settings()
    r = post(client, "/extend", clip, f"{FAST}&chunks=1&{name}=maybe")
    assert_error(r, 422, "invalid_parameter", name)
    assert "true / 1 / yes / on / t / y or false / 0 / no / off / f / n" in r.json()["detail"]


def test_cors_closed_by_default_open_when_configured(engine):
    pre = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(Settings(warmup=False), engine=engine)) as c:
        r = c.options("/continue", headers=pre)
        assert "access-control-allow-origin" not in r.headers
    settings = Settings(warmup=False, cors_origins="https://example.org")
    with TestClient(create_app(settings, engine=engine)) as c:
        r = c.options("/continue", headers=pre)
        assert r.headers["access-control-allow-origin"] == "https://example.org"
        r = c.get("/health", headers={"Origin": "https://example.org"})
        assert "X-Seed" in r.headers["access-control-expose-headers"]


def test_settings_from_environment(monkeypatch, engine):
    monkeypatch.setenv("SNAC_DIT_MAX_BATCH", "3")
    monkeypatch.setenv("SNAC_DIT_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("SNAC_DIT_API_KEY", "")  # compose passes an empty value when unset
    monkeypatch.setenv("SNAC_DIT_DEFAULT_STEPS", "3,2,1,1")
    monkeypatch.setenv("SNAC_DIT_WARMUP", "false")
    s = Settings()
    assert s.max_batch == 3 and s.api_key is None
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    with TestClient(create_app(s, engine=engine)) as c:
        info = c.get("/info").json()  # open: the empty key did not switch auth on
    assert info["defaults"]["steps"] == [3, 2, 1, 1] and info["limits"]["max_batch"] == 3


def test_a_dead_worker_fails_requests_and_health_instead_of_hanging(engine, clip, monkeypatch):
    app = create_app(Settings(warmup=False), engine=engine)
    with TestClient(app) as c:
        batcher = app.state.service.batcher

        async def bug():  # simulate a bug in the worker loop itself (not an engine fault)
            raise RuntimeError("bug")

        monkeypatch.setattr(batcher, "_collect", bug)
        assert_error(post(c, "/continue", clip, "steps=1"), 503, "worker_down")
        assert c.get("/health").status_code == 503  # so an orchestrator restarts the process
        assert c.get("/ready").status_code == 503
        assert_error(post(c, "/continue", clip, "steps=1"), 503, "not_ready")


def test_include_input_crossfades_into_the_continuation_without_a_click(client, engine):
    """include_input returns the input unchanged up to its last 64 ms, a crossfade there into
    the codec's decoding of the input's end, then the continuation (which follows that decoding
    seamlessly). No sample-to-sample step at the join larger than the signals' own."""
    import base64

    from model.engine import JOIN_SAMPLES, join_input

    x_in = tone(3.0)
    clip = wav_bytes(x_in)
    x_in, _, _ = read_wav(clip)                              # what the server received (16-bit)
    plain = post(client, "/continue", clip, "steps=2,1,1,1&seed=11")
    joined = post(client, "/continue", clip, "steps=2,1,1,1&seed=11&include_input=true")
    assert plain.status_code == joined.status_code == 200
    y, _, _ = read_wav(joined.content)
    cont, _, _ = read_wav(plain.content)
    n = len(x_in)
    assert len(y) == n + CHUNK and joined.headers["x-input-samples"] == str(n)
    assert np.array_equal(y[: n - JOIN_SAMPLES], x_in[: n - JOIN_SAMPLES])
    assert np.array_equal(y[n:], cont)
    step = np.abs(np.diff(y))
    join = step[n - JOIN_SAMPLES - 1: n + 1].max()
    own = max(step[: n - JOIN_SAMPLES - 1].max(), step[n + 1:].max())
    assert join <= own + 0.01, (join, own)
    # A plain concatenation would have stepped by |last input sample - first continuation one|.
    assert np.abs(join_input(np.ones(4096), np.zeros(JOIN_SAMPLES + 10))[1:] -
                  join_input(np.ones(4096), np.zeros(JOIN_SAMPLES + 10))[:-1]).max() < 0.002

    # /extend: the same join, streamed or not.
    query = "chunks=2&steps=1&seed=11&include_input=true"
    whole = post(client, "/extend", clip, query)
    lines = [json.loads(line) for line in post(client, "/extend", clip, query + "&stream=true")
             .text.splitlines() if line]
    assert [m["event"] for m in lines] == ["input", "chunk", "chunk", "done"]
    parts = [read_wav(base64.b64decode(m["audio"]))[0] for m in lines if "audio" in m]
    assert len(parts[0]) == n and np.array_equal(np.concatenate(parts), read_wav(whole.content)[0])
    assert np.array_equal(parts[0][: n - JOIN_SAMPLES], x_in[: n - JOIN_SAMPLES])


def test_join_input_is_the_identity_when_the_codec_is_perfect():
    from model.engine import JOIN_SAMPLES, join_input

    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32) * 0.1
    cont = rng.standard_normal(500).astype(np.float32) * 0.1
    y = join_input(x, np.concatenate([x[-JOIN_SAMPLES:], cont]))
    np.testing.assert_allclose(y, np.concatenate([x, cont]), atol=1e-6)
    short = join_input(x[:100], np.concatenate([np.zeros(JOIN_SAMPLES), cont]))  # input < fade
    assert len(short) == 100 + len(cont) and abs(short[0] - x[0]) < 0.01
