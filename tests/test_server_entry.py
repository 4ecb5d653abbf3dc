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
