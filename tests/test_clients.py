"""The client library and CLI against a live uvicorn on 127.0.0.1 (random port), real engine."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import clients
from clients import AsyncClient, Client
from clients.errors import error_for
from server.app import create_app
from server.background import serve_in_background
from server.settings import Settings
from tests.conftest import tone

REPO = Path(__file__).resolve().parents[1]
CHUNK = 196_608


@pytest.fixture(scope="module")
def url(debug_weights_dir, debug_codec_dir):
    from model.engine import ContinuationEngine

    engine = ContinuationEngine.load(debug_weights_dir, debug_codec_dir)
    settings = Settings(warmup=False, max_chunks=3, max_wait_ms=1)
    with serve_in_background(create_app(settings, engine=engine)) as base:
        yield base


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clients") / "song.flac"  # any format the server reads
    sf.write(path, np.stack([tone(1.5, 44100), tone(1.5, 44100, 330.0)], 1), 44100)
    return path


def test_importing_clients_never_imports_torch():
    code = (
        "import sys, clients, clients.__main__, clients.client; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_wav_roundtrip_is_16bit_exact():
    x = np.round(np.linspace(-1, 1, 1001) * 32767) / 32768
    data = clients.encode_wav(x, 22050)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
    y, rate = clients.decode_wav(data)
    assert rate == 22050 and np.abs(y - x).max() <= 1 / 32768


def test_continue_from_file_bytes_and_from_an_array(url, song):
    with Client(url) as c:
        assert c.health() == {"status": "ok"} and c.ready()
        r = c.continue_(song.read_bytes(), steps=[1, 1, 1, 1], seed=3)  # file bytes, as a list
        assert r.audio.shape == (CHUNK,) and r.audio.dtype == np.float32
        assert r.sample_rate == 32000 and r.seed == 3 and r.params["steps"] == "1,1,1,1"
        arr = c.continue_(
            tone(1.2, 48000), sample_rate=48000, steps=1, temperature=0.9, include_input=True
        )
        assert arr.input_samples == int(1.2 * 32000)
        assert arr.audio.shape == (arr.input_samples + CHUNK,)
        assert arr.params["temperature"] == "0.9,0.9,0.9,0.9"
        assert arr.params["gumbel"] == "1,1,1,1" and arr.params["confidence"] == "top"
        g = c.continue_(song, steps=2, seed=3, gumbel=0, confidence="sampled")
        assert g.params["gumbel"] == "0,0,0,0" and g.params["confidence"] == "sampled"
        with pytest.raises(clients.SnacDitError):
            c.continue_(song, steps=1, confidence="loudest")


def test_extend_whole_and_streamed_agree(url, song, tmp_path):
    with Client(url) as c:
        whole = c.extend(song, 2, steps=1, seed=8)
        chunks = list(c.extend_stream(song, 2, steps=1, seed=8))
    assert whole.audio.shape == (2 * CHUNK,)
    assert [ch.index for ch in chunks] == [0, 1] and all(ch.seed == 8 for ch in chunks)
    assert all(ch.params == whole.params for ch in chunks) and whole.params["steps"] == "1,1,1,1"
    joined, rate = clients.join_chunks(chunks)
    np.testing.assert_array_equal(joined, whole.audio)
    whole.save(tmp_path / "w.wav")
    assert sf.info(tmp_path / "w.wav").frames == 2 * CHUNK


def test_typed_errors(url, song):
    with Client(url) as c:
        with pytest.raises(clients.InvalidParameter) as e:
            c.continue_(song, steps=0)
        assert e.value.status == 422 and "steps" in e.value.detail
        with pytest.raises(clients.BadRequest) as e:
            c.continue_(b"definitely not audio" * 10)
        assert e.value.code == "undecodable_audio"
        with pytest.raises(clients.InvalidParameter, match="chunks"):
            c.extend(song, 9, steps=1)
        with pytest.raises(clients.InvalidParameter, match="chunks"):
            list(c.extend_stream(song, 9, steps=1))
        with pytest.raises(ValueError, match="sample_rate"):
            c.continue_(tone(1.0))
    with Client("http://127.0.0.1:9") as dead, pytest.raises(clients.ConnectionFailed):
        dead.health()
    # Status -> class, and Retry-After parsed, for the statuses a live test cannot cheaply force.
    e = error_for(429, b'{"error": "queue_full", "detail": "busy"}', "3")
    assert isinstance(e, clients.Overloaded) and e.retry_after == 3.0 and e.code == "queue_full"
    e = error_for(503, b"<html>proxy error</html>", None)
    assert isinstance(e, clients.Unavailable) and e.code == "http_503"
    assert isinstance(error_for(401, b"{}", None), clients.Unauthorized)
    assert isinstance(error_for(502, b"", None), clients.ServerError)


def test_async_client(url, song):
    async def main():
        async with AsyncClient(url) as c:
            assert await c.ready()
            info = await c.info()

            async def stream():
                return [
                    ch async for ch in c.extend_stream(song, 1, steps=1, seed=1, include_input=True)
                ]

            result, chunks = await asyncio.gather(c.continue_(song, steps=1, seed=1), stream())
            return info, result, chunks

    info, result, chunks = asyncio.run(main())
    assert info["chunk_samples"] == CHUNK
    assert result.seed == 1 and result.audio.shape == (CHUNK,)
    assert [ch.index for ch in chunks] == [-1, 0]  # the input first, then the chunk
    assert chunks[0].audio.shape == (int(1.5 * 32000),)
    # The first chunk of a chain is the plain continuation for the same seed.
    np.testing.assert_array_equal(chunks[1].audio, result.audio)


def _cli(*args, url: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "SNAC_DIT_URL": url}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "clients", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_continue_and_extend(url, song, tmp_path):
    out = tmp_path / "out.wav"
    r = _cli("continue", str(song), "-o", str(out), "--steps", "1,1,1,1", "--seed", "4", url=url)
    assert r.returncode == 0, r.stderr
    assert "seed=4" in r.stderr and "confidence=top" in r.stderr
    r = _cli("continue", str(song), "-o", str(out), "--steps", "2", "--seed", "4", "--gumbel",
             "0,0,0.5,0.5", "--confidence", "sampled", "--force", url=url)
    assert r.returncode == 0, r.stderr
    assert "gumbel=0,0,0.5,0.5" in r.stderr and "confidence=sampled" in r.stderr
    info = sf.info(out)
    assert (info.frames, info.samplerate, info.channels) == (CHUNK, 32000, 1)

    ext = tmp_path / "ext.wav"
    r = _cli(
        "extend", str(song), "--chunks", "2", "-o", str(ext), "--steps", "1", "--stream", url=url
    )
    assert r.returncode == 0, r.stderr
    assert "chunk 1/2" in r.stderr and "chunk 2/2" in r.stderr
    assert sf.info(ext).frames == 2 * CHUNK
    # The streamed summary states what ran, as the one-shot one does.
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {ext}") and "steps=1,1,1,1" in summary, summary
    assert "temperature=" in summary and "confidence=top" in summary, summary


def test_cli_output_name_is_derived_and_nothing_is_overwritten(url, song, tmp_path):
    r = _cli("continue", str(song), "--steps", "1", "--seed", "4", url=url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    derived = tmp_path / "song-continued.wav"
    assert sf.info(derived).frames == CHUNK and f"wrote {derived.name}" in r.stderr
    before = derived.read_bytes()
    # Again: refused before asking the server, the file untouched, the way out named.
    r = _cli("continue", str(song), "--steps", "1", "--seed", "5", url=url, cwd=tmp_path)
    assert r.returncode == 2 and "song-continued.wav exists" in r.stderr and "--force" in r.stderr
    assert derived.read_bytes() == before and "Traceback" not in r.stderr
    r = _cli("extend", str(song), "--chunks", "1", "-o", "song-continued.wav", "--steps", "1",
             "--stream", url=url, cwd=tmp_path)
    assert r.returncode == 2 and derived.read_bytes() == before
    r = _cli("continue", str(song), "--steps", "1", "--seed", "5", "--force", url=url, cwd=tmp_path)
    assert r.returncode == 0 and derived.read_bytes() != before, r.stderr
    for command, extra, name in (("extend", ["--chunks", "1"], "song-extended.wav"),
                                 ("extend", ["--chunks", "1", "--stream", "--force"],
                                  "song-extended.wav")):
        r = _cli(command, str(song), "--steps", "1", *extra, url=url, cwd=tmp_path)
        assert r.returncode == 0 and (tmp_path / name).is_file(), r.stderr


def test_cli_errors_exit_nonzero_with_the_servers_message(url, song, tmp_path):
    r = _cli("continue", str(song), "-o", str(tmp_path / "x.wav"), "--steps", "0", url=url)
    assert r.returncode == 1 and "steps" in r.stderr and "invalid_parameter" in r.stderr
    r = _cli("continue", str(tmp_path / "missing.wav"), "-o", str(tmp_path / "x.wav"), url=url)
    assert r.returncode == 2 and "no such file" in r.stderr
    assert not (tmp_path / "x.wav").exists()


def test_cli_unreachable_server_names_the_url_and_what_to_do(tmp_path):
    r = _cli("info", url="http://127.0.0.1:9")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "http://127.0.0.1:9" in r.stderr and "make serve" in r.stderr and "--url" in r.stderr


def test_cli_takes_a_bare_host_port_url(url):
    bare = url.removeprefix("http://")
    r = _cli("info", url=bare)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["limits"]["max_request_passes"] == 1024
    with Client(bare) as c:
        assert c.health()["status"] == "ok"
    r = _cli("info", url="ftp://example.org")
    assert r.returncode == 2 and "http://" in r.stderr and "Traceback" not in r.stderr


def test_cli_output_into_a_closed_pipe_is_quiet(url):
    """`python -m clients info | head -c 10`: no BrokenPipe traceback."""
    env = {**os.environ, "SNAC_DIT_URL": url}
    cmd = f"{sys.executable} -m clients info | head -c 10"
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert len(r.stdout) == 10
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_cli_help_explains_each_sampling_option():
    r = subprocess.run([sys.executable, "-m", "clients", "continue", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    text = " ".join(r.stdout.split())
    assert "--temperature TEMPERATURE sampling temperature" in text
    assert "--top-p TOP_P nucleus mass" in text and "--guidance GUIDANCE classifier-free" in text
    assert text.count("16,12,8,8") == 1


@pytest.fixture(scope="module")
def edit_url(debug_codec_dir):
    from tests.test_editing import make_engine

    settings = Settings(warmup=False, max_wait_ms=1)
    with serve_in_background(create_app(settings, engine=make_engine(debug_codec_dir, 1))) as base:
        yield base


@pytest.fixture(scope="module")
def long_song(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clients") / "long.wav"
    sf.write(path, tone(14.0), 32000, subtype="PCM_16")
    return path


def test_client_inpaint_loop_and_vary(edit_url, long_song):
    n = sf.info(long_song).frames
    with Client(edit_url) as c:
        r = c.inpaint(long_song, 7.0, 8.0, steps=1, seed=2)
        assert r.audio.shape == (n,) and r.seed == 2
        assert r.edit == {"edit_start": 7 * 32000 - 2048, "edit_end": 8 * 32000 + 2048,
                          "span_seconds": "7.0000,8.0000"}
        lp = c.loop(long_song.read_bytes(), steps=1, seed=2)
        assert lp.audio.shape == (n + CHUNK,) and lp.edit["loop_samples"] == n + CHUNK
        assert lp.input_samples == n
        v = c.vary(long_song, keep="AB", start=1.0, steps=1)
        assert v.audio.shape == (n,) and v.edit["keep"] == "AB"
        assert v.edit["chunk_start"] == 32000 // 12288 * 12288
        with pytest.raises(TypeError, match="unknown sampling"):
            c.loop(long_song, step=1)
        with pytest.raises(clients.InvalidParameter, match="start/end"):
            c.inpaint(long_song, 3.0, 12.0, steps=1)

    async def run():
        async with AsyncClient(edit_url) as ac:
            return await ac.inpaint(long_song, 7.0, 8.0, steps=1, seed=2)

    assert np.array_equal(asyncio.run(run()).audio, r.audio)


def test_cli_inpaint_loop_vary(edit_url, long_song, tmp_path):
    n = sf.info(long_song).frames
    for args, frames, says, name in (
        (["inpaint", "--start", "7", "--end", "8"], n, "edit_start=221952", "long-inpainted.wav"),
        (["loop"], n + CHUNK, f"loop_samples={n + CHUNK}", "long-loop.wav"),
        (["vary", "--keep", "AB"], n, "keep=AB", "long-varied.wav"),
    ):
        out = tmp_path / name  # the name derived from the input
        r = _cli(args[0], str(long_song), "--steps", "1", *args[1:], url=edit_url, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert sf.info(out).frames == frames and says in r.stderr, r.stderr
    r = _cli("inpaint", str(long_song), "-o", str(tmp_path / "x.wav"), "--start", "1", url=edit_url)
    assert r.returncode == 2 and "--end" in r.stderr
