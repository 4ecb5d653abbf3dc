"""The real entry point, `python -m server` (what `make serve` runs), in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAC_DIT_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_refuses_to_start_without_weights_and_says_how_to_get_them(tmp_path):
    # A fresh checkout: the default weights/demo/{dit,codec} do not exist.
    r = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    err = r.stderr
    for needed in (
        "weights/demo/dit",
        "weights/demo/codec",
        "python training/train.py",
        "python training/train.py --config training/configs/dit_demo.toml",
        "python -m training.dit.export RUN_OR_CKPT weights/demo/dit --fp16",
        "hubertsiuzdak/snac_32khz",
        "python training/train_codec.py",
        "SNAC_DIT_WEIGHTS",
        "SNAC_DIT_CODEC",
    ):
        assert needed in err, f"{needed!r} missing from:\n{err}"
    assert "Traceback" not in err


def test_invalid_setting_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=tmp_path,
        env=_env(SNAC_DIT_MAX_BATCH="lots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "max_batch" in r.stderr and "Traceback" not in r.stderr


def test_serves_debug_weights_on_host_port(tmp_path, debug_weights_dir, debug_codec_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(
        HOST="127.0.0.1",
        PORT=str(port),
        SNAC_DIT_WEIGHTS=debug_weights_dir,
        SNAC_DIT_CODEC=debug_codec_dir,
        SNAC_DIT_DEVICE="cpu",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "server"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        info = httpx.get(f"{url}/info", timeout=5).json()
        assert info["chunk_samples"] == 196_608 and info["sample_rate"] == 32_000
        assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "no GPU: serving on CPU" not in out  # device=cpu was asked for explicitly


# -- the codec must be the one the DiT was trained on ---------------------------------------------


def _dit_trained_on(tmp_path, name: str, codec_entry: dict) -> str:
    """A debug DiT whose config.json records the codec its tokens came from (as export does)."""
    import torch

    from model.dit import DiT, DiTConfig
    from model.weights import save_pretrained

    torch.manual_seed(0)
    return str(save_pretrained(DiT(DiTConfig.from_name("debug")), tmp_path / name,
                               {"codec": codec_entry}))


def test_refuses_a_codec_the_dit_was_not_trained_on(tmp_path, debug_codec, debug_codec_dir):
    trained = {"fingerprint": "0123456789abcdef", "codes_fingerprint": "fedcba9876543210",
               "source": "weights/other/codec"}
    weights = _dit_trained_on(tmp_path, "dit", trained)
    r = subprocess.run(
        [sys.executable, "-m", "server"], cwd=tmp_path, capture_output=True, text=True,
        env=_env(SNAC_DIT_WEIGHTS=weights, SNAC_DIT_CODEC=debug_codec_dir,
                 SNAC_DIT_DEVICE="cpu"), timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    message = [line for line in r.stderr.splitlines() if "cannot start" in line]
    assert len(message) == 1, r.stderr  # one paragraph
    for needed in (debug_codec.codes_fingerprint, "fedcba9876543210", "codes fingerprint",
                   debug_codec_dir, weights, "weights/other/codec",
                   "SNAC_DIT_ALLOW_CODEC_MISMATCH=1"):
        assert needed in message[0], f"{needed!r} missing from: {message[0]}"


def test_codec_override_and_info_say_which_codec_serves(tmp_path, debug_codec, debug_codec_dir):
    import torch
    from fastapi.testclient import TestClient

    from model.codec import DEBUG_CODEC_CONFIG, Codec
    from server.app import create_app
    from server.codec_check import CodecMismatch
    from server.settings import Settings

    # A decoder-only change (another decoder on the same frozen codes) keeps the codes: served.
    redecoded = Codec.load(DEBUG_CODEC_CONFIG, seed=0)
    with torch.no_grad():
        next(redecoded.snac.decoder.parameters()).add_(0.01)
    redecoded_dir = str(redecoded.save(tmp_path / "redecoded"))
    trained = {"fingerprint": debug_codec.fingerprint,
               "codes_fingerprint": debug_codec.codes_fingerprint, "source": debug_codec_dir}
    weights = _dit_trained_on(tmp_path, "dit", trained)
    settings = Settings(weights=weights, codec=redecoded_dir, device="cpu", warmup=False)
    with TestClient(create_app(settings)) as c:
        codec = c.get("/info").json()["codec"]
    assert codec == {
        "source": redecoded_dir, "encoder": "snac", "decoder": "snac", "decoder_phase": None,
        "fingerprint": redecoded.fingerprint,
        "codes_fingerprint": debug_codec.codes_fingerprint, "dit_trained_on": trained,
        "codes_match": True,
    }
    assert redecoded.fingerprint != debug_codec.fingerprint

    # Other codes: refused, unless the expert override is set; then /info says they differ.
    other = _dit_trained_on(tmp_path, "other", trained | {"codes_fingerprint": "fedcba9876543210"})
    with pytest.raises(CodecMismatch, match="fedcba9876543210"):
        with TestClient(create_app(Settings(weights=other, codec=debug_codec_dir, device="cpu",
                                            warmup=False))):
            pass
    settings = Settings(weights=other, codec=debug_codec_dir, device="cpu", warmup=False,
                        allow_codec_mismatch=True)
    with TestClient(create_app(settings)) as c:
        assert c.get("/info").json()["codec"]["codes_match"] is False
        r = c.post("/continue?steps=1", files={"audio": ("a.wav", _wav(2.0), "audio/wav")})
        assert r.status_code == 200, r.text

    # A DiT exported before codes fingerprints: the whole codec is compared.
    old = _dit_trained_on(tmp_path, "old", {"fingerprint": debug_codec.fingerprint})
    with TestClient(create_app(Settings(weights=old, codec=debug_codec_dir, device="cpu",
                                        warmup=False))) as c:
        assert c.get("/info").json()["codec"]["codes_match"] is True


def _wav(seconds: float) -> bytes:
    import io

    import soundfile as sf

    from tests.conftest import tone

    buf = io.BytesIO()
    sf.write(buf, tone(seconds), 32000, format="WAV", subtype="PCM_16")
    return buf.getvalue()
