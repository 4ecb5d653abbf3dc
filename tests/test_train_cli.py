"""`python training/train.py` on a machine without a GPU: a GPU-sized config is refused with the
way to the CPU demo config, before anything is built (the entry point, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def train(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "training/train.py", "--out_dir",
                           str(tmp_path / "runs"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_default_gpu_sized_config_on_a_cpu_points_to_the_demo_config(tmp_path):
    r = train("--data.tokens", str(tmp_path / "none"), tmp_path=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = " ".join(r.stderr.split())
    assert "no GPU here" in err and "preset 'base', 111 M parameters" in err, err
    assert "python training/train.py --config training/configs/dit_demo.toml" in err
    assert "--device cpu" in err
    # The missing tokens are said in the same go, not one re-run later.
    assert "python -m training.tokens" in err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_cpu_sized_config_or_an_explicit_cpu_is_not_refused(tmp_path):
    for args in (["--model.preset", "small"], ["--device", "cpu"],
                 ["--config", "training/configs/dit_demo.toml"]):
        r = train(*args, "--data.tokens", str(tmp_path / "none"), tmp_path=tmp_path)
        assert r.returncode == 2 and "no GPU here" not in r.stderr, (args, r.stderr)
        assert "no tokenised data" in r.stderr, (args, r.stderr)
