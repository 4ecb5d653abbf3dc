"""Codebook health in codec training: centring, data init, dead-code restart, and the collapse
regression test (a short real run of the entry point on synthetic music must end with every
level using many codes on held-out audio)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from snac import SNAC

from model.codec import DEBUG_CODEC_CONFIG, Codec
from training.codec.cli import main
from training.codec.eval import collapsed_levels
from training.codec.model import codec_forward, fold_input_means, load_for_training, quantize
from training.codec.vq import CodebookKeeper
from training.run.checkpoint import latest_checkpoint

SR = 32000


def synthetic_song(seed: int, seconds: float) -> np.ndarray:
    """A 'song': random notes of random harmonic timbres over a bass line, with noise hits."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    out = np.zeros(n, dtype=np.float64)
    t_note = 0
    while t_note < n:
        length = int(rng.uniform(0.08, 0.4) * SR)
        f0 = 110.0 * 2 ** (rng.integers(0, 36) / 12)
        t = np.arange(min(length, n - t_note)) / SR
        amps = rng.uniform(0, 1, 6) / np.arange(1, 7) ** rng.uniform(0.5, 2)
        note = sum(a * np.sin(2 * np.pi * (k + 1) * f0 * t) for k, a in enumerate(amps))
        out[t_note: t_note + len(t)] += 0.3 * note * np.exp(-t * rng.uniform(2, 12))
        if rng.random() < 0.3:                             # a percussive noise burst
            out[t_note: t_note + len(t)] += 0.2 * rng.standard_normal(len(t)) * np.exp(-t * 40)
        t_note += length
    bass = 0.2 * np.sin(2 * np.pi * 55.0 * 2 ** (rng.integers(0, 12) / 12) * np.arange(n) / SR)
    return ((out + bass) / max(1e-9, np.abs(out + bass).max()) * 0.8).astype(np.float32)


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("songs")
    train, val = root / "train", root / "val"
    train.mkdir()
    val.mkdir()
    for i in range(6):
        sf.write(train / f"song{i}.flac", synthetic_song(i, 4.0), SR)
    for i in range(3):
        sf.write(val / f"held{i}.flac", synthetic_song(100 + i, 2.0), SR)
    return train, val


RUN = ["--preset", "debug", "--curriculum", "[[0, 0.384, 4]]", "--val_seconds", "1.152",
       "--num_workers", "0", "--threads", "1", "--progress", "false", "--resume", "never",
       "--gan", "false", "--log_every", "10"]


def val_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/mel" in r]


def test_short_run_on_music_keeps_every_level_in_use(tmp_path, songs):
    """The regression test for codebook collapse. Held-out audio is 3 x 1.152 s: 36 / 72 / 144
    / 288 vectors at levels A-D. The same run with the remedies switched off is checked to
    collapse, so this test can tell the difference."""
    train, val = songs
    healthy, bare = tmp_path / "healthy", tmp_path / "bare"
    common = RUN + ["--train", str(train), "--val", str(val), "--steps", "60", "--val_every", "60",
                    "--collapse_perplexity", "3"]
    assert main(common + ["--out_dir", str(healthy)]) == 0
    assert main(common + ["--out_dir", str(bare), "--centre_vq_input", "false",
                          "--codebook_init", "random", "--dead_code_every", "0"]) == 0
    good, worse = val_rows(healthy)[-1], val_rows(bare)[-1]
    floors = [8, 12, 16, 24]        # distinct codes on held-out audio, per level
    for level, floor in enumerate(floors):
        assert good[f"val/unique_{level}"] >= floor, (level, good)
        assert good[f"val/perplexity_{level}"] >= 4, (level, good)
    assert good["val/collapsed"] == []
    # Without the remedies the same run does collapse (so the floors above are not free).
    assert sum(worse[f"val/unique_{lv}"] for lv in range(4)) < \
        0.5 * sum(good[f"val/unique_{lv}"] for lv in range(4))


def test_collapse_is_reported_loudly(tmp_path, songs, capsys):
    train, val = songs
    run = tmp_path / "bare"
    assert main(RUN + ["--train", str(train), "--val", str(val), "--steps", "20",
                       "--val_every", "20", "--out_dir", str(run), "--centre_vq_input", "false",
                       "--codebook_init", "random", "--dead_code_every", "0",
                       "--collapse_perplexity", "1e6"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: codebook level 0 has COLLAPSED at step 20" in err
    assert val_rows(run)[-1]["val/collapsed"] == [0, 1, 2, 3]


def test_collapsed_levels():
    metrics = {"val/perplexity_0": 2.0, "val/perplexity_1": 50.0, "val/mel": 1.0}
    assert collapsed_levels(metrics, 8.0) == [0]
    assert collapsed_levels(metrics, 100.0) == [0, 1]


def test_centring_folds_into_a_plain_snac_model():
    """Codes of training-time centring with a fixed centre == plain snac encode of the folded
    model: the export is an ordinary snac checkpoint."""
    torch.manual_seed(0)
    model = SNAC(**DEBUG_CODEC_CONFIG).eval()
    x = torch.randn(2, 1, 24576) * 0.3
    with torch.no_grad():
        z = model.encoder(model.preprocess(x))
        means = [m + 0.1 for m in quantize(model.quantizer, z)[5]]
        _, codes_c, _, _, _, _ = quantize(model.quantizer, z, means)
        folded = fold_input_means(_copy(model), means)
        ref = folded.encode(x)
    for a, b in zip(codes_c, ref, strict=True):
        assert torch.equal(a, b)
    # Folding changed something: the unfolded model encodes differently.
    assert any(not torch.equal(a, b) for a, b in zip(model.encode(x), ref, strict=True))


def _copy(model: SNAC) -> SNAC:
    clone = SNAC(**DEBUG_CODEC_CONFIG).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def test_keeper_revives_only_dead_codes_and_zeroes_their_moments():
    torch.manual_seed(0)
    model = SNAC(**DEBUG_CODEC_CONFIG)
    rvq = model.quantizer
    keeper = CodebookKeeper(rvq.quantizers, window=2, noise=0.0, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = codec_forward(model, torch.randn(1, 1, 12288) * 0.3)
    (out.commitment + out.codebook).backward()
    opt.step()
    before = [vq.codebook.weight.detach().clone() for vq in rvq.quantizers]
    used = [torch.unique(c) for c in out.codes]
    keeper.observe(out.codes)
    assert keeper.revive(out.latents, 1, opt) == [0, 0, 0, 0]    # window not yet over
    keeper.observe(out.codes)
    revived = keeper.revive(out.latents, 2, opt)
    for level, vq in enumerate(rvq.quantizers):
        w = vq.codebook.weight.detach()
        dead = torch.ones(w.shape[0], dtype=torch.bool)
        dead[used[level]] = False
        assert revived[level] == int(dead.sum())
        assert torch.equal(w[~dead], before[level][~dead])            # used codes untouched
        assert not torch.equal(w[dead], before[level][dead])
        # noise 0: every restarted code is one of the batch's own projected vectors
        pool = out.latents[level].transpose(1, 2).reshape(-1, w.shape[1])
        dist = torch.cdist(w[dead], pool, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
        assert float(dist.max()) < 1e-5
        state = opt.state[vq.codebook.weight]
        assert float(state["exp_avg"][dead].abs().max()) == 0.0
        assert float(state["exp_avg_sq"][dead].abs().max()) == 0.0
    # Restarted codes get a grace period: the next check finds nothing dead.
    assert keeper.revive(out.latents, 3, opt) == [0, 0, 0, 0]


def test_keeper_state_round_trip_and_shape_check():
    model = SNAC(**DEBUG_CODEC_CONFIG)
    keeper = CodebookKeeper(model.quantizer.quantizers)
    keeper.observe([torch.tensor([[1, 2]]), torch.tensor([[3]]), torch.tensor([[4]]),
                    torch.tensor([[5]])])
    other = CodebookKeeper(model.quantizer.quantizers)
    other.load_state_dict(keeper.state_dict())
    assert torch.equal(other.last_used, keeper.last_used) and torch.equal(other.seen, keeper.seen)
    small = SNAC(**dict(DEBUG_CODEC_CONFIG, codebook_size=64))
    with pytest.raises(ValueError, match="shape"):
        CodebookKeeper(small.quantizer.quantizers).load_state_dict(keeper.state_dict())


def test_checkpoint_export_and_resume_agree_on_the_folded_codec(tmp_path, songs):
    """A centred run's checkpoint, exported, encodes exactly like the trainer's own export."""
    train, val = songs
    run = tmp_path / "run"
    assert main(RUN + ["--train", str(train), "--val", str(val), "--steps", "12",
                       "--val_every", "0", "--out_dir", str(run), "--ckpt_every", "12"]) == 0
    ckpt = latest_checkpoint(run / "checkpoints")
    from_ckpt, _ = load_for_training(str(ckpt))
    exported = Codec.load(str(run / "export"))
    x = torch.from_numpy(synthetic_song(7, 1.152))[None]
    a = Codec(from_ckpt, exported.config).encode(x)
    b = exported.encode(x)
    for ca, cb in zip(a, b, strict=True):
        assert torch.equal(ca, cb)


def test_encoder_learns_at_its_own_rate():
    from training.codec.config import load_config
    from training.codec.trainer import CodecTrainer

    cfg = load_config(None, ["--preset", "debug", "--gan", "false", "--lr", "6e-4",
                             "--encoder_lr_scale", "0.25"])
    trainer = CodecTrainer(cfg)
    front, back = trainer.opt_g.param_groups
    assert front["lr"] == pytest.approx(1.5e-4) and back["lr"] == pytest.approx(6e-4)
    enc = {id(p) for p in trainer.model.encoder.parameters()}
    vq = {id(p) for p in trainer.model.quantizer.parameters()}
    assert {id(p) for p in front["params"]} == enc | vq
    assert {id(p) for p in back["params"]} == {id(p) for p in trainer.model.decoder.parameters()}


def test_a_resumed_run_uses_the_rates_its_config_asks_for_now():
    """Optimizer.load_state_dict restores the saved learning rates; the trainer puts the
    config's back (decayed to the step), so `--encoder_lr_scale` on a resume takes effect."""
    from training.codec.config import load_config
    from training.codec.trainer import CodecTrainer

    base = ["--preset", "debug", "--gan", "false", "--lr", "6e-4", "--lr_decay", "0.99"]
    first = CodecTrainer(load_config(None, base + ["--encoder_lr_scale", "0.25"]))
    for _ in range(3):
        first.sched_g.step()
    sd = {**first.state_dict(), "step": 3}      # as codec_checkpoint saves it
    resumed = CodecTrainer(load_config(None, base + ["--encoder_lr_scale", "1.0"]))
    resumed.load_state_dict(sd)
    front, back = resumed.opt_g.param_groups
    assert front["lr"] == pytest.approx(6e-4 * 0.99 ** 3)
    assert back["lr"] == pytest.approx(6e-4 * 0.99 ** 3)
    resumed.sched_g.step()                      # and the schedule goes on from there
    assert front["lr"] == pytest.approx(6e-4 * 0.99 ** 4)


@pytest.mark.parametrize("bad, match", [
    (["--encoder_lr_scale", "0"], "encoder_lr_scale"),
    (["--dead_code_window", "0"], "dead_code_window"),
    (["--codebook_init", "kmeans"], "codebook_init"),
    (["--centre_calibration_batches", "-1"], "centre_calibration_batches"),
])
def test_codebook_config_errors(bad, match):
    from training.codec.config import load_config

    with pytest.raises(ValueError, match=match):
        load_config(None, bad)


def test_fp16_export_loads_in_snac_and_in_the_project(tmp_path, songs):
    """`train_codec.py export RUN OUT --fp16`: what weights/demo/codec ships."""
    train, val = songs
    run = tmp_path / "run"
    assert main(RUN + ["--train", str(train), "--val", str(val), "--steps", "4",
                       "--val_every", "0", "--out_dir", str(run)]) == 0
    out = tmp_path / "fp16"
    assert main(["export", str(run), str(out), "--fp16"]) == 0
    full = (run / "export" / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.6 * full
    ours = Codec.load(str(out))
    theirs = SNAC.from_pretrained(str(out))
    x = torch.from_numpy(synthetic_song(9, 1.152))[None]
    with torch.no_grad():
        ref = theirs.encode(x[:, None])
    for a, b in zip(ours.encode(x), ref, strict=True):
        assert torch.equal(a, b)
    assert all(p.dtype == torch.float32 for p in ours.snac.parameters())


def test_eval_and_model_card_of_a_snapshot(tmp_path, songs):
    """bench/eval_codec.py on held-out audio (with the Opus baseline) and the card written from
    it: the fingerprint, the targets and the held-out tracks with their licences."""
    import importlib.util

    from training.codec.card import main as card_main

    train, _ = songs
    corpus = tmp_path / "corpus"
    (corpus / "audio").mkdir(parents=True)
    rows = []
    for f in sorted(train.iterdir()):
        (corpus / "audio" / f.name).write_bytes(f.read_bytes())
        rows.append({"package": "synthetic-music", "licence": "CC0-1.0", "status": "kept",
                     "output_path": f"audio/{f.name}"})
    (corpus / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (corpus / "summary.json").write_text(json.dumps({
        "total_hours": 0.01, "kept": len(rows), "packages": {"synthetic-music": {
            "kept": len(rows), "hours": 0.01, "licences": {"CC0-1.0": len(rows)}}}}))
    run = tmp_path / "run"
    assert main(RUN + ["--train", str(corpus / "manifest.jsonl"), "--val_files", "2",
                       "--steps", "4", "--val_every", "2", "--out_dir", str(run)]) == 0
    shipped = tmp_path / "codec"
    assert main(["export", str(run), str(shipped), "--fp16"]) == 0

    spec = importlib.util.spec_from_file_location(
        "eval_codec", Path(__file__).resolve().parents[1] / "bench" / "eval_codec.py")
    eval_codec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_codec)
    out = tmp_path / "eval.json"
    assert eval_codec.main(["--codec", str(shipped), "--corpus", str(corpus / "manifest.jsonl"),
                            "--val-files", "2", "--segments", "1", "--repeats", "1",
                            "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # 6 files, val_files 2: the split holds out at most a fifth, so 1 track, 1 segment
    assert len(result["held_out_tracks"]) == 1 and result["segments"] == 1
    assert result["opus_mel"] > 0 and 5 < result["opus_kbps"] < 12
    assert result["codec_mel"] > 0 and len(result["perplexity"]) == 4
    # pitch, beside its floor and ceiling computed from the same segment
    table = result["table"]
    assert set(table) == {"codec", "envelope_noise", "opus", "griffin_lim", "original"}
    assert table["original"]["chroma"] == pytest.approx(1.0)
    assert table["original"].get("frame_f1", 1.0) == 1.0
    assert all(-1 <= m["chroma"] <= 1 for m in table.values())
    assert all("comb_db" in m and "mel" in m for m in table.values())

    assert card_main(["--run", str(run), "--codec", str(shipped), "--eval", str(out),
                      "--corpus", str(corpus)]) == 0
    text = (shipped / "MODEL_CARD.md").read_text()
    assert f"fingerprint `{Codec.load(str(shipped)).fingerprint}`" in text
    assert "not final" in text and "≤ 0.75 × Opus" in text and "synthetic-music" in text
    assert "CC0-1.0" in text and "Steps: 4" in text
    # An earlier snapshot of the run (its checkpoint since retired) by --step.
    assert card_main(["--run", str(run), "--codec", str(shipped), "--eval", str(out),
                      "--corpus", str(corpus), "--step", "2", "--frozen"]) == 0
    text = (shipped / "MODEL_CARD.md").read_text()
    assert "Steps: 2" in text and "These codes are final" in text and "not final" not in text
    assert f"codes fingerprint `{Codec.load(str(shipped)).codes_fingerprint}`" in text

    # An annealing branch from step 4 (the steady run goes on elsewhere): the card covers the
    # parent's steps to the branch point, then the branch's, and says how it was annealed.
    branch = tmp_path / "branch"
    assert main(RUN + ["--train", str(corpus / "manifest.jsonl"), "--val_files", "2",
                       "--steps", "6", "--val_every", "0", "--out_dir", str(branch),
                       "--resume", str(latest_checkpoint(run / "checkpoints")),
                       "--anneal_start", "4", "--anneal_steps", "2", "--anneal_to", "0.5"]) == 0
    assert main(["export", str(branch), str(shipped), "--fp16"]) == 0
    assert card_main(["--run", str(branch), "--parent", str(run), "--codec", str(shipped),
                      "--eval", str(out), "--corpus", str(corpus)]) == 0
    text = (shipped / "MODEL_CARD.md").read_text()
    assert "Steps: 6" in text and "--anneal_start 4 --anneal_steps 2 --anneal_to 0.5" in text
    assert f"a branch of `{run}`" in text


def test_warm_start_from_a_folded_export_keeps_its_codes(tmp_path, songs):
    """`--init EXPORT` (what a fresh machine does with weights/demo/codec): the export is folded,
    so before batch centring trains it the trainer moves the mean input back out of in_proj.
    On the calibration batch the centred training forward then picks the export's own codes."""
    from training.codec.config import load_config
    from training.codec.trainer import CodecTrainer

    train, val = songs
    run = tmp_path / "run"
    assert main(RUN + ["--train", str(train), "--val", str(val), "--steps", "6",
                       "--val_every", "0", "--out_dir", str(run)]) == 0
    export = run / "export"
    x = torch.from_numpy(np.stack([synthetic_song(s, 0.384) for s in (20, 21, 22, 23)]))[:, None]
    ref = Codec.load(str(export)).encode(x[:, 0])

    cfg = load_config(None, ["--init", str(export), "--gan", "false"])
    trainer = CodecTrainer(cfg)
    trainer.calibration = [x]
    trainer._unfold(x)
    with torch.no_grad():
        codes = codec_forward(trainer.model, x, centre="batch").codes
    for a, b in zip(codes, ref, strict=True):
        assert torch.equal(a, b)
    # Without the unfold the centring would subtract the mean a second time: other codes.
    plain = CodecTrainer(cfg)
    with torch.no_grad():
        wrong = codec_forward(plain.model, x, centre="batch").codes
    assert any(not torch.equal(a, b) for a, b in zip(wrong, ref, strict=True))
    # And through the entry point: a warm start trains and exports.
    assert main(RUN + ["--train", str(train), "--val", str(val), "--steps", "2", "--val_every",
                       "0", "--init", str(export), "--out_dir", str(tmp_path / "warm")]) == 0


def test_the_rate_anneals_from_a_step_and_old_schedules_load():
    """anneal_start/steps/to: linear from the configured rate to anneal_to x, then flat; a
    schedule saved as ExponentialLR (runs from before the anneal) loads into it."""
    import torch

    from training.codec.config import load_config
    from training.codec.trainer import CodecTrainer

    base = ["--preset", "debug", "--gan", "false", "--lr", "1e-3", "--lr_decay", "1.0"]
    cfg = load_config(None, base + ["--anneal_start", "2", "--anneal_steps", "4",
                                    "--anneal_to", "0.2"])
    assert [round(cfg.lr_factor(s), 6) for s in range(8)] == [1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0.2]
    trainer = CodecTrainer(cfg)
    rates = []
    for _ in range(6):
        trainer.sched_g.step()
        rates.append(trainer.opt_g.param_groups[-1]["lr"])
    assert rates == pytest.approx([1e-3, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4])

    old = torch.optim.lr_scheduler.ExponentialLR(torch.optim.SGD(
        [torch.zeros(1, requires_grad=True)] * 1, lr=1e-3), 1.0)
    for _ in range(4):
        old.step()
    sd = {**trainer.state_dict(), "step": 4}
    sd["sched_g"] = {**old.state_dict(), "base_lrs": trainer.sched_g.base_lrs,
                     "_last_lr": trainer.sched_g.get_last_lr()}
    resumed = CodecTrainer(cfg)
    resumed.load_state_dict(sd)
    assert resumed.opt_g.param_groups[-1]["lr"] == pytest.approx(6e-4)   # step 4 of the anneal
    with pytest.raises(ValueError, match="anneal"):
        load_config(None, base + ["--anneal_to", "0"])
