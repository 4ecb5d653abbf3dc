"""Exact resume, SIGKILL between checkpoints, SIGTERM: on a tiny token geometry (fast on CPU).

Tokens are synthetic (shards.write_token_dir) with chunks of 4/8/16/32 tokens and a 32-entry
codebook, so a training step of the debug DiT takes milliseconds; the real geometry and the real
tokeniser are covered by the smoke test in test_train.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training.dit.config import load_config
from training.dit.trainer import Trainer
from training.run import checkpoint as ckpt_io
from training.tokens.shards import split_of, write_token_dir

ROOT = Path(__file__).resolve().parents[1]
CHUNK_FRAMES, V = 4, 32  # A-frames per chunk, codebook size
STRIDES = (8, 4, 2, 1)


def make_tokens(out: Path, n_train: int = 3, chunks: int = 4, seed: int = 0,
                same: bool = False, codebook_size: int = V) -> Path:
    """A token dir: `n_train` train files + 1 val file of `chunks` chunks of random tokens
    (`same`: every file holds the same tokens)."""
    rng = np.random.default_rng(seed)
    n_frames = chunks * CHUNK_FRAMES

    def tokens():
        return [rng.integers(0, codebook_size, n_frames * STRIDES[0] // s).astype(np.uint16)
                for s in STRIDES]

    val = next(f"val{i}.wav" for i in range(100) if split_of(f"val{i}.wav", 0.5) == "val")
    train = [n for n in (f"train{i}.wav" for i in range(100)) if split_of(n, 0.5) == "train"]
    first = tokens()
    files = {name: first if same else tokens() for name in train[:n_train]}
    files[val] = tokens()
    write_token_dir(out, files, val_fraction=0.5, strides=STRIDES, chunk_frames=CHUNK_FRAMES,
                    pad_frames=1, codebook_size=codebook_size)
    return out


def tiny_overrides(tokens: Path, out: Path, name: str, **extra) -> list[tuple[str, object]]:
    pairs = {
        "name": name, "out_dir": str(out), "data.tokens": str(tokens), "data.batch_size": 2,
        "data.num_workers": 0, "optim.grad_accum": 2, "eval.every": 3, "eval.audio": False,
        "eval.batch_size": 2, "ckpt.every": 2, "ckpt.keep": 2, "log.every": 1,
        "curriculum.stages.0.steps": 2, "curriculum.stages.1.steps": 2,
        "curriculum.stages.2.steps": 2,
    }
    pairs.update(extra)
    return list(pairs.items())


def debug_config(tokens, out, name, **extra):
    return load_config(ROOT / "training/configs/debug.toml", tiny_overrides(tokens, out, name, **extra))


# With style actions (issue 37) the split falls on the last dense-softmax step, so the resumed
# half starts with the top-k switch and the style dropout draws.
STYLE = {"model.style_actions": 4, "model.style_topk": 2, "model.style_warmup": 3}


@pytest.mark.parametrize("extra", [{}, STYLE], ids=["plain", "style"])
def test_resume_is_bitwise_exact(tmp_path, extra):
    tokens = make_tokens(tmp_path / "tokens")
    straight = Trainer(debug_config(tokens, tmp_path, "straight", **extra))
    assert straight.fit() == 0
    assert straight.step == 6

    first = Trainer(debug_config(tokens, tmp_path, "split", stop_at=3, **extra))  # mid-stage
    assert first.fit() == 0 and first.step == 3
    saved = ckpt_io.latest_checkpoint(tmp_path / "split")
    assert saved.name == "ckpt-000003"
    # As DiT checkpoints were written before the format was shared with the codec trainer:
    # no list of weights files in config.json (model + ema implied). They resume the same.
    record = json.loads((saved / "config.json").read_text())
    assert record.pop("weights") == ["model", "ema"]
    (saved / "config.json").write_text(json.dumps(record))
    second = Trainer(debug_config(tokens, tmp_path, "split", **extra))
    second.load(tmp_path / "split")
    assert second.step == 3
    assert second.fit() == 0 and second.step == 6

    a, b = straight.dit.state_dict(), second.dit.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in straight.ema.state_dict().items():
        assert torch.equal(v, second.ema.state_dict()[k]), f"ema {k}"
    sa, sb = straight.opt.state_dict()["state"], second.opt.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    assert straight.sched.get_last_lr() == second.sched.get_last_lr()
    assert straight.data_state == second.data_state
    # The run really trained (and crossed all three stages), not a no-op on both sides.
    fresh = Trainer(debug_config(tokens, tmp_path, "fresh", **extra))
    assert any(not torch.equal(v, fresh.dit.state_dict()[k]) for k, v in a.items())
    if extra:  # the style path is there and trains
        assert straight.dit.config.style_actions == 4
        assert not torch.equal(a["style_proj.weight"], fresh.dit.state_dict()["style_proj.weight"])
    stages = [json.loads(line).get("stage") for line in
              (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert {"pretrain", "one_chunk", "full"} <= set(stages)


def test_checkpoint_keeps_last_k_and_latest(tmp_path):
    tokens = make_tokens(tmp_path / "tokens")
    t = Trainer(debug_config(tokens, tmp_path, "k", **{"ckpt.every": 1, "ckpt.keep": 2}))
    t.fit()
    names = sorted(p.name for p in (tmp_path / "k").glob("ckpt-*"))
    assert names == ["ckpt-000005", "ckpt-000006"]
    ck = ckpt_io.load_checkpoint(tmp_path / "k")
    assert ck["path"].name == "ckpt-000006" and ck["trainer"]["step"] == 6
    assert ck["config"]["model"]["codebook_size"] == V
    assert set(ck["weights"]["ema"]) == set(ck["weights"]["model"])
    assert not list((tmp_path / "k").glob(".tmp-*"))


def _run(args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "training/train.py"), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


def _cli(tokens, out, name, **extra) -> list[str]:
    args = ["--config", str(ROOT / "training/configs/debug.toml")]
    for k, v in tiny_overrides(tokens, out, name, **extra):
        args += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return args


def _wait_for(pred, proc, timeout=60.0):
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.05)


def _steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if line.endswith("}") and '"train"' in line]


def test_sigkill_loses_only_steps_since_last_checkpoint_then_sigterm_saves(tmp_path):
    tokens = make_tokens(tmp_path / "tokens")
    run = tmp_path / "killed"
    long = {"curriculum.stages.2.steps": 100000, "eval.every": 0, "ckpt.every": 3}
    proc = _run(_cli(tokens, tmp_path, "killed", **long))
    _wait_for(lambda: len(ckpt_io.list_checkpoints(run)) >= 2 and max(_steps_logged(run)) % 3,
              proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    reached = max(_steps_logged(run))
    # Every ckpt-* directory is complete; the newest loads and is less than 3 steps behind.
    for p in run.glob("ckpt-*"):
        assert all((p / f).is_file() for f in ckpt_io.FILES), p
    ck = ckpt_io.load_checkpoint(run)
    step = ck["trainer"]["step"]
    assert ck["path"].name == ckpt_io.ckpt_name(step)
    assert reached - 3 < step <= reached and step % 3 == 0

    # `--resume` continues from exactly that step; SIGTERM then saves and exits 143 (128 + 15,
    # like the codec trainer: run/signals.py).
    proc = _run(_cli(tokens, tmp_path, "killed", **long) + ["--resume"])
    _wait_for(lambda: max(_steps_logged(run)) >= reached + 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert f"resumed from {ck['path']} at step {step}" in out
    assert "SIGTERM: stopped after step" in out
    last = ckpt_io.load_checkpoint(run)["trainer"]["step"]
    assert last == max(_steps_logged(run)) >= reached + 2  # the signal's own checkpoint
