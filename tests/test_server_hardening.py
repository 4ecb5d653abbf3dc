"""Hardening for the open internet, through the real app (HTTP) and the real entry point:
cross-origin POSTs refused unless allowed, truncated multipart is a 400, a per-request compute
budget, loopback by default with a warning when exposed without a key."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.__main__ import exposure_warning, is_loopback
from server.app import create_app
from server.settings import Settings
from tests.conftest import tone
from tests.test_server import FAST, assert_error, wav_bytes
from tests.test_server_entry import _env


@pytest.fixture(scope="module")
def engine(debug_weights_dir, debug_codec_dir):
    from model.engine import ContinuationEngine

    return ContinuationEngine.load(debug_weights_dir, debug_codec_dir)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return wav_bytes(tone(2.0))


def app_client(engine, **settings):
    return TestClient(create_app(Settings(warmup=False, max_wait_ms=1, **settings),
                                 engine=engine))


def test_cross_origin_simple_post_is_refused_before_running_anything(engine, clip):
    with app_client(engine) as c:
        evil = {"Origin": "https://evil.example"}
        r = c.post(f"/continue?{FAST}", files={"audio": ("a.wav", clip)}, headers=evil)
        assert_error(r, 403, "cross_origin_forbidden", "SNAC_DIT_CORS_ORIGINS")
        r = c.post("/extend?chunks=1", files={"audio": ("a.wav", clip)},
                   headers={"Origin": "null"})                       # sandboxed page, file://
        assert_error(r, 403, "cross_origin_forbidden")
        assert "snac_dit_batch_size_count 0.0" in c.get("/metrics").text  # nothing ran
        # The server's own page is same-origin; clients without an Origin are not browsers.
        same = c.post(f"/continue?{FAST}", files={"audio": ("a.wav", clip)},
                      headers={"Origin": "http://testserver"})
        assert same.status_code == 200, same.text
        assert c.post(f"/continue?{FAST}", files={"audio": ("a.wav", clip)}).status_code == 200
        assert c.get("/health", headers=evil).status_code == 200       # reads are not guarded


def test_allowed_origins_pass(engine, clip):
    with app_client(engine, cors_origins="https://studio.example") as c:
        ok = c.post(f"/continue?{FAST}", files={"audio": ("a.wav", clip)},
                    headers={"Origin": "https://studio.example"})
        assert ok.status_code == 200, ok.text
        assert ok.headers["access-control-allow-origin"] == "https://studio.example"
        bad = c.post(f"/continue?{FAST}", files={"audio": ("a.wav", clip)},
                     headers={"Origin": "https://other.example"})
        assert_error(bad, 403, "cross_origin_forbidden")
    with app_client(engine, cors_origins="*") as c:
        anyone = c.post(f"/continue?{FAST}", files={"audio": ("a.wav", clip)},
                        headers={"Origin": "https://anyone.example"})
        assert anyone.status_code == 200, anyone.text


def test_truncated_multipart_is_malformed_not_missing_audio(engine, clip):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; "
            f"filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode() + clip + \
        f"\r\n--{boundary}--\r\n".encode()
    ctype = {"content-type": f"multipart/form-data; boundary={boundary}"}
    with app_client(engine) as c:
        whole = c.post(f"/continue?{FAST}", content=body, headers=ctype)
        assert whole.status_code == 200, whole.text
        for cut in (len(body) // 2, len(body) - 8, 30):
            r = c.post(f"/continue?{FAST}", content=body[:cut], headers=ctype)
            assert_error(r, 400, "malformed_multipart", "truncated")
        assert c.get("/health").status_code == 200


def test_compute_budget_is_a_422_naming_it(engine, clip):
    with app_client(engine, max_request_passes=40, max_chunks=8) as c:
        r = c.post("/continue?steps=16,12,8,8", files={"audio": ("a.wav", clip)})
        assert_error(r, 422, "compute_budget", "44 model passes")
        r = c.post("/continue?steps=8,8,8,8&guidance=2", files={"audio": ("a.wav", clip)})
        assert_error(r, 422, "compute_budget", "64 model passes")
        r = c.post(f"/extend?chunks=8&{FAST}", files={"audio": ("a.wav", clip)})
        assert_error(r, 422, "compute_budget", "x 8 chunks")
        assert "SNAC_DIT_MAX_REQUEST_PASSES" in r.json()["detail"]
        ok = c.post(f"/extend?chunks=2&{FAST}", files={"audio": ("a.wav", clip)})
        assert ok.status_code == 200, ok.text


def test_loopback_is_the_default_and_exposure_warns():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    assert exposure_warning("127.0.0.1", has_api_key=False) is None
    assert exposure_warning("0.0.0.0", has_api_key=True) is None
    assert "SNAC_DIT_API_KEY" in exposure_warning("0.0.0.0", has_api_key=False)


@pytest.mark.parametrize("args, env, warned", [
    ([], {}, False),
    (["--host", "0.0.0.0"], {}, True),
    ([], {"HOST": "0.0.0.0"}, True),
    (["--host", "0.0.0.0"], {"SNAC_DIT_API_KEY": "k"}, False),
])
def test_entry_point_warns_when_exposed_without_a_key(tmp_path, args, env, warned):
    # No weights in tmp_path: the server stops after the checks, which is all this needs.
    r = subprocess.run([sys.executable, "-m", "server", *args], cwd=tmp_path,
                       env=_env(**env), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert ("WARNING: listening on 0.0.0.0" in r.stderr) is warned, r.stderr


def test_offline_hub_codec_is_one_paragraph_not_a_traceback(tmp_path, debug_weights_dir):
    """The hub id keeps working for real users; offline it is one clear paragraph and exit 2.
    HF_HUB_OFFLINE=1 and an empty HF_HOME make sure nothing is downloaded here."""
    env = _env(SNAC_DIT_WEIGHTS=debug_weights_dir, SNAC_DIT_CODEC="hubertsiuzdak/snac_32khz",
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-m", "server"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "cannot start" in line]
    assert len(errors) == 1, r.stderr
    for needed in ("hubertsiuzdak/snac_32khz", "offline", "weights/demo/codec",
                   "config.json + pytorch_model.bin"):
        assert needed in errors[0], errors[0]


def test_a_dit_that_does_not_fit_its_codec_is_a_clear_error(tmp_path, debug_weights_dir):
    from model.codec import DEBUG_CODEC_CONFIG, Codec

    other = Codec.load(dict(DEBUG_CODEC_CONFIG, codebook_size=64)).save(tmp_path / "codec64")
    env = _env(SNAC_DIT_WEIGHTS=debug_weights_dir, SNAC_DIT_CODEC=str(other))
    r = subprocess.run([sys.executable, "-m", "server"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot start" in r.stderr


def test_exported_weights_are_readable_by_other_users(tmp_path, debug_weights_dir):
    """A read-only weights mount in the container is read by a non-root user."""
    import stat

    from model.codec import DEBUG_CODEC_CONFIG, Codec
    from model.weights import load_dit, save_pretrained

    codec_dir = Codec.load(DEBUG_CODEC_CONFIG).save(tmp_path / "codec")
    dit_dir = save_pretrained(load_dit(debug_weights_dir), tmp_path / "dit")
    for f in [*codec_dir.iterdir(), *dit_dir.iterdir()]:
        assert f.stat().st_mode & stat.S_IROTH, f"{f} is not world-readable"


def _raw_partial_upload(url: str, declared: int, sent: bytes):
    """A socket that sent the headers and part of a /continue body, then went quiet."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    s.sendall((f"POST /continue?{FAST} HTTP/1.1\r\nHost: {u.netloc}\r\n"
               f"Content-Type: audio/wav\r\nContent-Length: {declared}\r\n\r\n").encode() + sent)
    return s


def _read_response(sock) -> tuple[int, dict]:
    import json as _json

    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), _json.loads(body[body.index(b"{"):])


@pytest.fixture
def live(engine):
    from server.background import serve_in_background

    def start(**settings):
        app = create_app(Settings(warmup=False, max_wait_ms=1, **settings), engine=engine)
        return serve_in_background(app)

    return start


def test_a_body_dripped_in_too_slowly_gets_408(live, clip):
    import time

    import httpx

    with live(upload_timeout_s=1.0) as url:
        sock = _raw_partial_upload(url, len(clip), clip[:100])
        t0 = time.monotonic()
        status, body = _read_response(sock)
        sock.close()
        assert status == 408 and body["error"] == "request_timeout", body
        assert "SNAC_DIT_UPLOAD_TIMEOUT_S" in body["detail"]
        assert time.monotonic() - t0 < 10
        ok = httpx.post(f"{url}/continue?{FAST}", files={"audio": ("a.wav", clip)}, timeout=60)
        assert ok.status_code == 200, ok.text


def test_concurrent_uploads_are_bounded_with_an_early_503(live, clip):
    import time

    import httpx

    with live(max_concurrent_uploads=2, upload_timeout_s=60) as url:
        held = [_raw_partial_upload(url, len(clip), clip[:1000]) for _ in range(2)]
        deadline = time.monotonic() + 20
        while True:  # until both held uploads have claimed their slots
            r = httpx.post(f"{url}/continue?{FAST}", files={"audio": ("a.wav", clip)}, timeout=60)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["error"] == "uploads_busy", r.text
        assert r.headers["retry-after"] == "1"
        assert "SNAC_DIT_MAX_CONCURRENT_UPLOADS" in r.json()["detail"]
        for s in held:  # the clients give up: their slots come back
            s.close()
        deadline = time.monotonic() + 20
        while True:
            r = httpx.post(f"{url}/continue?{FAST}", files={"audio": ("a.wav", clip)}, timeout=60)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text


def test_api_docs_need_no_internet(engine):
    """/docs references only this server's own files, and those files are served."""
    import re

    with app_client(engine) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        urls += re.findall(r"""url: ?['"]([^'"]+)['"]""", page.text)
        assert urls and all(not u.startswith(("http://", "https://", "//")) for u in urls), urls
        assert "cdn" not in page.text.lower()
        for u in urls:
            r = c.get(u)
            assert r.status_code == 200 and len(r.content) > 100, u
        assert c.get("/docs-assets/swagger-ui-bundle.js").headers["content-type"].startswith(
            ("application/javascript", "text/javascript"))


def test_memory_goes_back_once_big_uploads_are_served(engine):
    """After uploads adding up to 16 MB, the server trims the heap (malloc_trim) once no
    request is in flight; small requests never trigger it; SNAC_DIT_TRIM_MEMORY=false turns it
    off. What it saves is measured by bench/server_load.py --only-uploads (docs/server.md)."""
    import ctypes.util
    import io

    import soundfile as sf

    if not ctypes.util.find_library("c"):
        pytest.skip("no C library to trim")
    buf = io.BytesIO()
    sf.write(buf, np.zeros((40 * 44100, 2), np.float32), 44100, format="WAV", subtype="PCM_16")
    big = buf.getvalue()                                         # 7 MB: three pass 16 MiB
    for trim in (True, False):
        with app_client(engine, trim_memory=trim) as c:
            keeper = c.app.state.service.memory
            for _ in range(4):
                r = c.post(f"/continue?{FAST}", files={"audio": ("a.wav", wav_bytes(tone(2.0)))})
                assert r.status_code == 200
            time.sleep(0.3)
            assert keeper.trims == 0  # 4 small uploads: far below the threshold
            for _ in range(3):
                assert c.post(f"/continue?{FAST}", files={"audio": ("a.wav", big)}).status_code \
                    == 200
            deadline = time.monotonic() + 10
            while trim and keeper.trims == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert keeper.trims == (1 if trim else 0)
            assert (keeper.pending < keeper.threshold) is trim  # off: nothing is ever trimmed
