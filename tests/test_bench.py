"""The benchmark scripts time what they say (they run for real on CPU at tiny sizes)."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_latency_times_the_continue_path_with_its_join_and_lead_in():
    latency = load("latency")
    engine = latency.build_engine("debug", "debug", "cpu", torch.float32)
    calls = []
    real = engine.continue_batch
    engine.continue_batch = lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    med = latency.measure(engine, batch_size=2, steps=(1, 1, 1, 1), warmup=0, repeats=1)
    assert calls == [{"lead_in": latency.JOIN_SAMPLES}]  # what the server's batcher passes
    assert set(med) == {*latency.PHASES, "total"}
    assert all(med[p] > 0 for p in latency.PHASES), med  # the join (heard_context) included
    assert sum(med[p] for p in latency.PHASES) <= med["total"] * 1.01
    # the instrumentation leaves the engine as it was
    assert "_encode" not in engine.__dict__ and "heard_context" not in engine.__dict__
    from model.sampler import generate

    assert latency.engine_module.generate is generate


def test_latency_defaults_to_bf16_on_cuda_and_warms_up():
    latency = load("latency")
    src = (ROOT / "bench" / "latency.py").read_text()
    assert '"bfloat16" if cuda' in src and "(2 if cuda else 1)" in src
    with pytest.raises(SystemExit):
        latency.main(["--dtype", "float16"])  # not a choice: the server runs bf16 or fp32


def test_gpu_validation_dry_run_runs_every_phase(tmp_path):
    # The prepared GPU run (bench/gpu_validate.py) rehearsed on the CPU at tiny sizes: every
    # phase runs and lands in one JSON with the device in it. A subprocess: the kernel needs
    # TRITON_INTERPRET=1 before triton is first imported.
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "validate.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_validate.py"), "--dry-run",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["device"].startswith("cpu")
    phases = report["phases"]
    assert list(phases) == ["env", "train_step", "kernel", "attention", "throughput", "latency",
                            "server"]
    errors = {k: v["error"] for k, v in phases.items() if "error" in v}
    assert not errors, errors
    assert phases["train_step"]["ok"], phases["train_step"]
    cases = {k: v for k, v in phases["kernel"].items() if k != "seconds"}
    assert len(cases) == 3 and all(c["ok"] for c in cases.values()), cases
    assert any(c["tiles"]["partial"] > 0 for c in cases.values())
    assert phases["env"]["auto_backend"]["base fp32"][0] == "sdpa"
    assert [row["batch_size"] for row in phases["latency"]["rows"]] == [1, 2]
    assert phases["server"]["statuses"] == {"200": 4}


def test_independent_clips_cuts_the_middle_of_each_named_track(tmp_path):
    """bench/independent_clips.py: 24 clips of 18.432 s at 32 kHz, each the middle of its track
    (resampled when the track is not at 32 kHz); a missing track is named, not skipped."""
    import numpy as np
    import soundfile as sf

    clips = load("independent_clips")
    root = tmp_path / "root"
    for folder, names in clips.TRACKS.values():
        (root / folder).mkdir(parents=True)
        for name in names:
            sr = 44100 if name == "Art" else 32000
            n = int(20.0 * sr)
            x = np.zeros((n, 2), np.float32)        # stereo: a click marks the middle
            x[n // 2] = 0.5
            sf.write(root / folder / f"{name}.ogg", x, sr)
    out = tmp_path / "clips"
    assert clips.main(["--root", str(root), "--out", str(out)]) == 0
    files = sorted(out.glob("*.flac"))
    assert len(files) == 24 and (out / "hedgewars-Art.flac").exists()
    for f in (out / "hedgewars-Art.flac", out / "naev-snow.flac"):
        y, sr = sf.read(f)
        assert sr == 32000 and y.ndim == 1 and len(y) == int(18.432 * 32000)
        assert abs(int(np.abs(y).argmax()) - len(y) // 2) < 100      # the track's middle
    (root / clips.TRACKS["naev"][0] / "snow.ogg").unlink()
    assert clips.main(["--root", str(root), "--out", str(tmp_path / "again")]) == 1


def test_train_throughput_times_a_size_given_by_overrides(tmp_path):
    """`--model` overrides the preset's size (and adds style actions), `--codebook` sizes the
    synthetic tokens; the row says what was timed."""
    import json

    out = tmp_path / "tp.jsonl"
    bench = load("train_throughput")
    bench.main(["--preset", "debug", "--model", "d_model=32,n_layers=1,n_heads=2,style_actions=2",
                "--codebook", "64", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                "--workers", "0", "--dtype", "fp32", "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["model"].startswith("d_model=32") and row["codebook"] == 64
    assert row["step_s"] > 0 and row["loss"] > 0
    # 32 wide, one layer, 64 codes: far fewer parameters than the debug preset's 64 x 2
    base = tmp_path / "base.jsonl"
    bench.main(["--preset", "debug", "--codebook", "64", "--batch-size", "1", "--steps", "1",
                "--warmup", "0", "--workers", "0", "--dtype", "fp32", "--out", str(base)])
    assert row["params"] < 0.5 * json.loads(base.read_text())["params"]
