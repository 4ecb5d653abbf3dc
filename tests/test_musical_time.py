"""Musical time through the real interfaces: POST /analyze, edits by bars and beats, /extend's
chunk starts on the bar grid (HTTP via the app), and the Python client and CLI (a live server).
The input is a click track of known tempo and metre (tests/test_analysis.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

import clients
from clients import Client
from server.app import create_app
from server.background import serve_in_background
from server.settings import Settings
from tests.test_analysis import clicks
from tests.test_clients import _cli
from tests.test_editing import make_engine
from tests.test_server import assert_error, post, read_wav, wav_bytes

SR, CHUNK, JOIN = 32000, 196_608, 2048
FAST = "steps=2,1,1,1&seed=3"


def noise(seconds: float) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture(scope="module")
def client(debug_codec_dir):
    app = create_app(Settings(warmup=False, max_wait_ms=1, max_chunks=3),
                     engine=make_engine(debug_codec_dir, 1))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def beat() -> tuple[np.ndarray, bytes]:
    """20 s at 120 BPM in 4/4 from 0.5 s: bar k starts at 0.5 + 2 (k - 1) s."""
    x = clicks(120, 4, seconds=20.0)
    data = wav_bytes(x)
    return read_wav(data)[0], data


def test_analyze_finds_tempo_bars_and_key(client, beat):
    r = post(client, "/analyze", beat[1], "")
    assert r.status_code == 200, r.text
    a = r.json()
    assert abs(a["tempo"] - 120) < 1.2 and a["time_signature"] == "4/4"
    assert a["beats_per_bar"] == 4 and a["bars"] == len(a["downbeats"]) >= 9
    assert all(abs((d - 0.5) / 2 - round((d - 0.5) / 2)) < 0.01 for d in a["downbeats"])
    assert isinstance(a["key"], str) and len(a["beats"]) >= 36
    assert_error(post(client, "/analyze", wav_bytes(noise(10)), ""), 422, "no_steady_beat")
    assert_error(post(client, "/analyze", beat[1], "steps=2"), 422, "unknown_parameter")
    assert_error(client.post("/analyze", content=b"nonsense",
                             headers={"content-type": "audio/wav"}), 400)


def test_inpaint_by_bars_and_beats(client, beat):
    x, data = beat
    r = post(client, "/inpaint", data, f"{FAST}&start_bar=3&bars=2")
    assert r.status_code == 200, r.text
    s, e = map(float, r.headers["x-span-seconds"].split(","))
    assert abs(s - 4.5) < 0.02 and abs(e - 8.5) < 0.02
    y = read_wav(r.content)[0]
    a, b = int(r.headers["x-edit-start"]), int(r.headers["x-edit-end"])
    assert abs(a + JOIN - s * SR) < 3 and abs(b - JOIN - e * SR) < 3   # header: 0.1 ms
    assert np.array_equal(y[:a], x[:a]) and np.array_equal(y[b:], x[b:])
    r = post(client, "/inpaint", data, f"{FAST}&start_beat=5&beats=3")
    assert r.status_code == 200, r.text
    s, e = map(float, r.headers["x-span-seconds"].split(","))
    assert abs(s - 2.5) < 0.02 and abs(e - 4.0) < 0.02
    # bars that do not fit one chunk, mixed units, a bar past the end, no beat: all 422
    assert_error(post(client, "/inpaint", data, f"{FAST}&start_bar=2&bars=4"), 422,
                 "invalid_parameter", "4 bars from bar 2")
    assert_error(post(client, "/inpaint", data, f"{FAST}&start_bar=2&start=3&end=4"), 422,
                 "invalid_parameter", "one way")
    assert_error(post(client, "/inpaint", data, f"{FAST}&bars=2"), 422, mentions="start_bar")
    assert_error(post(client, "/inpaint", data, f"{FAST}&start_bar=20"), 422,
                 mentions="past the input")
    assert_error(post(client, "/inpaint", data, f"{FAST}&start_bar=x"), 422, mentions="integer")
    flat = wav_bytes(noise(20))
    assert_error(post(client, "/inpaint", flat, f"{FAST}&start_bar=2"), 422, "no_steady_beat")
    assert post(client, "/inpaint", flat, f"{FAST}&start=9&end=10").status_code == 200


def test_loop_by_bars_is_whole_bars_from_a_downbeat(client, beat):
    x, data = beat
    r = post(client, "/loop", data, f"{FAST}&bars=8")
    assert r.status_code == 200, r.text
    y = read_wav(r.content)[0]
    first, n = int(r.headers["x-loop-start"]), int(r.headers["x-input-samples"])
    assert abs(first - 0.5 * SR) < 0.01 * SR                    # the first downbeat
    assert len(y) == int(r.headers["x-loop-samples"]) == n + CHUNK
    assert abs(len(y) - 16 * SR) < 0.02 * SR                     # 8 bars of 2 s
    assert r.headers["x-bars"] == "8" and r.headers["x-time-signature"] == "4/4"
    assert np.array_equal(y[JOIN: n - JOIN], x[first + JOIN: first + n - JOIN])
    assert_error(post(client, "/loop", data, f"{FAST}&bars=6"), 422, mentions="at least 7 bars")
    assert_error(post(client, "/loop", data, f"{FAST}&bars=13"), 422, mentions="at most 12 bars")
    assert_error(post(client, "/loop", wav_bytes(noise(20)), f"{FAST}&bars=8"), 422,
                 "no_steady_beat")


def test_vary_keeps_the_beats(client, beat, debug_codec_dir):
    x, data = beat
    r = post(client, "/vary", data, f"{FAST}&keep=beats&start=6")
    assert r.status_code == 200, r.text
    assert r.headers["x-keep"] == "beats" and int(r.headers["x-held-beats"]) >= 12
    y, start = read_wav(r.content)[0], int(r.headers["x-chunk-start"])
    assert len(y) == len(x) and np.array_equal(y[: start - JOIN], x[: start - JOIN])
    assert not np.allclose(y[start: start + CHUNK], x[start: start + CHUNK], atol=1e-2)
    assert_error(post(client, "/vary", data, f"{FAST}&keep=bars"), 422, mentions="beats")
    assert_error(post(client, "/vary", wav_bytes(noise(20)), f"{FAST}&keep=beats"), 422,
                 "no_steady_beat")
    late = np.concatenate([x[: 10 * SR], np.zeros(10 * SR, np.float32)])   # beats stop at 10 s
    assert_error(post(client, "/vary", wav_bytes(late), f"{FAST}&keep=beats&start=13"), 422,
                 "invalid_parameter", "no beat found in the chunk")
    plain = create_app(Settings(warmup=False, max_wait_ms=1), engine=make_engine(debug_codec_dir, 0))
    with TestClient(plain) as c:                          # no after-context needed
        assert post(c, "/vary", data, f"{FAST}&keep=beats").status_code == 200


def test_extend_reports_chunk_starts_in_bars(client, beat):
    r = post(client, "/extend", beat[1], "steps=1&seed=1&chunks=2")
    assert r.status_code == 200, r.text
    # the input ends at 20 s = 39 beats after bar 1 (0.5 s): bar 10, beat 4; then 12.29 beats on
    assert r.headers["x-chunk-bars"] == "10:4,13:4.29" and abs(float(r.headers["x-tempo"]) -
                                                                 120) < 1.2
    lines = post(client, "/extend", beat[1], "steps=1&seed=1&chunks=2&stream=true").text
    chunks = [ln for ln in lines.splitlines() if '"chunk"' in ln]
    assert '"bar": 10, "beat": 4.0' in chunks[0] and '"bar": 13' in chunks[1]
    flat = post(client, "/extend", wav_bytes(noise(8)), "steps=1&seed=1&chunks=1")
    assert flat.status_code == 200 and "x-chunk-bars" not in flat.headers


@pytest.fixture(scope="module")
def url(debug_codec_dir):
    settings = Settings(warmup=False, max_wait_ms=1)
    with serve_in_background(create_app(settings, engine=make_engine(debug_codec_dir, 1))) as base:
        yield base


@pytest.fixture(scope="module")
def beat_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("musical") / "beat.wav"
    sf.write(path, clicks(120, 4, seconds=20.0), SR, subtype="PCM_16")
    return str(path)


def test_client_analyze_and_edit_by_bars(url, beat_file):
    with Client(url) as c:
        a = c.analyze(beat_file)
        assert abs(a["tempo"] - 120) < 1.2 and a["time_signature"] == "4/4"
        r = c.inpaint(beat_file, start_bar=3, bars=2, steps=1, seed=2)
        s, e = map(float, r.edit["span_seconds"].split(","))
        assert abs(s - 4.5) < 0.02 and abs(e - 8.5) < 0.02
        lp = c.loop(beat_file, bars=8, steps=1, seed=2)
        assert lp.edit["bars"] == 8 and abs(len(lp.audio) - 16 * SR) < 0.02 * SR
        v = c.vary(beat_file, keep="beats", steps=1)
        assert v.edit["keep"] == "beats" and v.edit["held_beats"] > 0
        with pytest.raises(clients.InvalidParameter, match="no steady beat"):
            c.analyze(noise(5), sample_rate=SR)
        ext = c.extend(beat_file, 2, steps=1, seed=1)
        assert ext.edit["chunk_bars"] == "10:4,13:4.29" and ext.edit["tempo"].startswith("12")
        pieces = list(c.extend_stream(beat_file, 2, steps=1, seed=1))
        assert [(p.bar, p.beat) for p in pieces] == [(10, 4.0), (13, 4.29)]


def test_cli_analyze_and_edit_by_bars(url, beat_file, tmp_path):
    r = _cli("analyze", beat_file, url=url)
    assert r.returncode == 0, r.stderr
    assert '"time_signature": "4/4"' in r.stdout and "120.0 BPM" in r.stderr
    out = tmp_path / "in.wav"
    r = _cli("inpaint", beat_file, "-o", str(out), "--start-bar", "2", "--bars", "1",
             "--steps", "1", url=url)
    assert r.returncode == 0 and re.search(r"span_seconds=2\.(49|50)", r.stderr), r.stderr
    r = _cli("loop", beat_file, "-o", str(out), "--force", "--bars", "8", "--steps", "1",
             url=url)
    assert r.returncode == 0 and "bars=8" in r.stderr, r.stderr
    r = _cli("vary", beat_file, "-o", str(out), "--force", "--keep", "beats", "--steps", "1",
             url=url)
    assert r.returncode == 0 and "keep=beats" in r.stderr, r.stderr
    r = _cli("loop", beat_file, "-o", str(out), "--force", "--bars", "3", url=url)
    assert r.returncode == 1 and "at least 7 bars" in r.stderr
    r = _cli("inpaint", beat_file, "-o", str(out), url=url)
    assert r.returncode == 2 and "--start-bar" in r.stderr


def test_held_spans_keep_their_tokens_at_every_level(debug_codec_dir):
    """The engine's beat-driven mask: tokens overlapping a held span stay, the rest of the
    edited span is free (-1), at every level."""
    import torch

    engine = make_engine(debug_codec_dir, 0)
    target = [torch.arange(n).unsqueeze(0) for n in (64, 128, 256, 512)]   # one chunk
    hold = ((16_000, 18_000), (100_000, 101_000))                          # samples in the chunk
    given = engine._free_tokens(target, 0, 0, CHUNK, 0, hold)
    for g, t, stride in zip(given, target, (8, 4, 2, 1), strict=True):
        per = 384 * stride                                                  # samples per token
        kept = set()
        for a, b in hold:
            kept |= set(range(a // per, -(-b // per)))
        assert {int(i) for i in torch.nonzero(g[0] >= 0)} == kept
        assert torch.equal(g[0, sorted(kept)], t[0, sorted(kept)])
