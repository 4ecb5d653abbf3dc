"""Codec training: losses on hand-checkable cases, the VQ-loss forward against snac, the real
entry point (train, SIGTERM, resume, export), exact resume, decoder-only fine-tuning.

Everything runs the debug codec (real 32 kHz geometry, 0.47 M params) on 0.384 s segments with
one torch thread: on a shared 2-core box an oversubscribed second thread makes each step several
times slower, not faster.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from snac import SNAC

from model.codec import DEBUG_CODEC_CONFIG
from training.codec.cli import main
from training.codec.config import (
    MODEL_PRESETS,
    CodecTrainConfig,
    load_config,
    segment_samples,
)
from training.codec.discriminators import CodecDiscriminator
from training.codec.eval import codebook_stats
from training.codec.losses import (
    MelLoss,
    MultiResolutionSTFTLoss,
    ReconstructionLosses,
    discriminator_loss,
    feature_matching_loss,
    generator_adv_loss,
    mel_filterbank,
    si_sdr,
)
from training.codec.model import codec_forward, count_params, quantize
from training.run import config as run_config
from training.run.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parent.parent
SR = 32000

# A debug run: 0.384 s segments (one padding unit), batch 2, tiny discriminators.
FAST = ["--preset", "debug", "--curriculum", "[[0, 0.384, 2]]", "--val_seconds", "0.384",
        "--val_files", "1", "--num_workers", "0", "--mpd_channels", "4", "--msd_channels", "4",
        "--threads", "1", "--progress", "false", "--resume", "never"]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """Five 1.5 s files: harmonic tones with tremolo (one at 48 kHz stereo: resampled + downmixed)."""
    d = tmp_path_factory.mktemp("codec_audio")
    t = np.arange(int(1.5 * SR)) / SR
    for i, f in enumerate([110.0, 165.0, 220.0, 330.0, 440.0]):
        x = sum(0.2 / k * np.sin(2 * np.pi * k * f * t) for k in (1, 2, 3))
        x = (x * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        if i == 4:
            t48 = np.arange(int(1.5 * 48000)) / 48000
            x48 = 0.3 * np.sin(2 * np.pi * f * t48).astype(np.float32)
            sf.write(d / f"tone{i}.flac", np.stack([x48, x48], axis=1), 48000)
        else:
            sf.write(d / f"tone{i}.wav", x, SR)
    return d


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- losses


def test_losses_are_zero_for_identical_signals():
    x = torch.randn(2, 1, 8192) * 0.3
    terms = ReconstructionLosses(SR, [32, 256, 2048], [5, 40, 320], [1024, 2048])(x, x.clone())
    assert set(terms) == {"mel", "stft", "l1"}
    for name, value in terms.items():
        assert float(value) == 0.0, name
    feats = [[torch.randn(2, 4, 10), torch.randn(2, 1, 10)] for _ in range(3)]
    assert float(feature_matching_loss(feats, feats)) == 0.0


def test_losses_grow_with_distortion():
    x = torch.randn(1, 1, 8192) * 0.3
    mel, stft = MelLoss(SR, [64, 512], [10, 80]), MultiResolutionSTFTLoss([512, 1024])
    small, big = x + 0.01 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)
    assert 0 < float(mel(small, x)) < float(mel(big, x))
    assert 0 < float(stft(small, x)) < float(stft(big, x))


def test_si_sdr_known_values():
    t = torch.arange(32000) / SR
    ref = torch.sin(2 * math.pi * 440 * t)
    orth = torch.sin(2 * math.pi * 1000 * t)    # integer periods: orthogonal to ref
    est = torch.stack([ref + 0.1 * orth, 3.0 * ref + 0.3 * orth, ref + orth])
    got = si_sdr(est, ref.expand(3, -1))
    # Power ratio 1 : 0.01 -> 20 dB, whatever the overall scale; 1 : 1 -> 0 dB.
    assert torch.allclose(got, torch.tensor([20.0, 20.0, 0.0]), atol=1e-3)


def test_gan_losses_hand_values():
    ones, zeros = [[torch.ones(2, 3)]], [[torch.zeros(2, 3)]]
    assert float(discriminator_loss(ones, zeros)) == 0.0      # perfect discriminator
    assert float(discriminator_loss(zeros, ones)) == 2.0      # (1-0)^2 + 1^2
    assert float(generator_adv_loss(ones)) == 0.0
    assert float(generator_adv_loss([[torch.zeros(1)], [torch.zeros(1)]])) == 2.0


def test_mel_filterbank_puts_a_tone_in_the_right_band():
    fb = mel_filterbank(SR, 2048, 40)                       # (40, 1025)
    assert fb.shape == (40, 1025) and (fb >= 0).all()
    assert (fb.sum(1) > 0).all()                            # no empty filter at this size
    freqs = torch.linspace(0, SR / 2, 1025)
    centers = freqs[fb.argmax(1)]
    assert (centers.diff() > 0).all()                       # filters ascend in frequency
    spec = torch.zeros(1025)
    spec[int(3000 / (SR / 2048))] = 1.0                     # a 3 kHz bin
    assert abs(float(centers[(fb @ spec).argmax()]) - 3000) < 400


def test_codebook_stats():
    codes = [[torch.tensor([[0, 0, 1, 1]])], [torch.tensor([[5, 5, 5, 5]])]]
    s = codebook_stats(codes, codebook_size=8)
    assert s["usage_0"] == 2 / 8 and s["usage_1"] == 1 / 8
    assert s["perplexity_0"] == pytest.approx(2.0) and s["perplexity_1"] == pytest.approx(1.0)


# ---------------------------------------------------------------- model pieces


def test_quantize_matches_snac_encode():
    torch.manual_seed(0)
    model = SNAC(**DEBUG_CODEC_CONFIG).eval()
    x = torch.randn(2, 1, 24576) * 0.3
    with torch.no_grad():
        ref_codes = model.encode(x)
        z = model.encoder(model.preprocess(x))
        z_q, codes, commitment, codebook, _, _ = quantize(model.quantizer, z)
        ref_zq, _ = model.quantizer(z)
    assert [c.shape for c in codes] == [(2, 8), (2, 16), (2, 32), (2, 64)]
    for a, b in zip(codes, ref_codes, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(z_q, ref_zq)
    assert float(commitment) > 0 and float(commitment) == pytest.approx(float(codebook))


def test_vq_losses_reach_encoder_and_codebooks():
    torch.manual_seed(0)
    model = SNAC(**DEBUG_CODEC_CONFIG)
    out = codec_forward(model, torch.randn(1, 1, 12288) * 0.3)
    assert out.audio.shape == (1, 1, 12288)
    out.commitment.backward(retain_graph=True)
    assert model.encoder.block[0].parametrizations.weight.original1.grad.abs().sum() > 0
    assert model.quantizer.quantizers[0].codebook.weight.grad is None  # commitment: encoder only
    out.codebook.backward()
    assert model.quantizer.quantizers[0].codebook.weight.grad.abs().sum() > 0


def test_direction_gradients_keep_the_forward_pass_and_drop_the_radial_part():
    torch.manual_seed(0)
    model = SNAC(**DEBUG_CODEC_CONFIG)
    x = torch.randn(2, 1, 24576) * 0.3
    z = model.encoder(model.preprocess(x)).detach()
    raw = quantize(model.quantizer, z)
    outs = {}
    for mode in ("raw", "direction"):
        zz = z.clone().requires_grad_(True)
        z_q, codes, commitment, codebook, latents, _ = quantize(model.quantizer, zz,
                                                                gradients=mode)
        outs[mode] = (z_q, codes, commitment, codebook)
    # Same codes and same quantised output: only the gradients differ.
    for a, b in zip(raw[1], outs["direction"][1], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(outs["direction"][0], raw[0])
    # The VQ losses compare unit vectors: bounded by 4 / codebook_dim per level.
    d = model.quantizer.codebook_dim
    assert 0 < outs["direction"][2].item() <= 4 * len(raw[1]) / d
    # The straight-through passes the direction only: at level A (the first, so the z_e it
    # sees is in_proj(z) exactly) the gradient on z_e is orthogonal to z_e.
    vq = model.quantizer.quantizers[0]
    z_e = vq.in_proj(F.avg_pool1d(z, vq.stride, vq.stride)).detach().requires_grad_(True)
    code, _ = vq.decode_latents(z_e)
    unit = F.normalize(z_e, dim=1)
    gain = code.norm(dim=1, keepdim=True)
    st = gain * (unit + (code / gain - unit).detach())
    st.pow(2).sum().backward()       # any loss with a radial pull
    radial = (z_e.grad * unit).sum(dim=1)
    assert z_e.grad.abs().max() > 0
    assert radial.abs().max() < 1e-4 * z_e.grad.abs().max()
    with pytest.raises(ValueError, match="gradients"):
        quantize(model.quantizer, z, gradients="cosine")


def test_direction_gradients_train_code_gains_from_the_decoder():
    torch.manual_seed(0)
    model = SNAC(**DEBUG_CODEC_CONFIG)
    out = codec_forward(model, torch.randn(1, 1, 12288) * 0.3, gradients="direction")
    out.audio.pow(2).mean().backward()      # a reconstruction-like loss, no VQ terms
    assert model.quantizer.quantizers[0].codebook.weight.grad.abs().sum() > 0
    assert model.encoder.block[0].parametrizations.weight.original1.grad.abs().sum() > 0


def test_discriminator_outputs():
    disc = CodecDiscriminator(mpd_channels=4, stft_channels=4)
    outs = disc(torch.randn(2, 1, 12288))
    assert len(outs) == 5 + 3                               # periods 2,3,5,7,11 + 3 STFT scales
    assert all(len(o) >= 2 and o[-1].shape[0] == 2 for o in outs)


def test_presets_and_param_counts():
    assert count_params(SNAC(**MODEL_PRESETS["small"])) == 8_549_698       # ~8.5 M
    for preset in MODEL_PRESETS.values():                  # one geometry for all presets
        assert preset["encoder_rates"] == [2, 3, 8, 8] and preset["vq_strides"] == [8, 4, 2, 1]
    assert segment_samples(1.0, SR, 12288) == 36864        # 1 s rounds up to 3 pad units


# ---------------------------------------------------------------- config


def test_config_toml_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "debug"\nsteps = 7\n[loss_weights]\nmel = 3\n[model]\nnoise = false\n')
    cfg = load_config(str(toml), ["--steps", "9", "--loss_weights.adv=0", "--gan", "false",
                                  "--train", "some/dir", "--betas", "[0.5, 0.9]"])
    assert cfg.steps == 9 and cfg.gan is False and cfg.train == ["some/dir"]
    assert cfg.betas == [0.5, 0.9]
    # A partial table updates the defaults rather than replacing them.
    assert cfg.loss_weights["mel"] == 3.0 and cfg.loss_weights["adv"] == 0
    assert cfg.loss_weights["commitment"] == 0.25 and cfg.loss_weights["codebook"] == 1.0
    assert cfg.model_config()["noise"] is False and cfg.model_config()["encoder_dim"] == 8
    assert load_config(None, ["--model.decoder_dim", "256"]).model == {"decoder_dim": 256}


@pytest.mark.parametrize("bad, match", [
    (dict(stepz=3), "unknown key"),
    (dict(gan="yes"), "true/false"),
    (dict(preset="huge"), "unknown preset"),
    (dict(loss_weights=dict(mell=1.0)), "unknown loss terms"),
    (dict(curriculum=[[5, 1.0, 2]]), "start at step 0"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        run_config.load(CodecTrainConfig, base=bad)


@pytest.mark.parametrize("path", sorted((REPO / "training" / "configs").glob("codec_*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(str(path), [])
    assert cfg.init or cfg.preset in MODEL_PRESETS


def test_bad_data_source_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(FAST + ["--train", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "r")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no readable training audio"):
        main(FAST + ["--train", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "r")])


@pytest.mark.parametrize("device, match", [("gpu", "not a device"),
                                           ("cuda:7", "no CUDA device is available")])
def test_bad_device_is_a_clear_error(tmp_path, audio_dir, device, match):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=match):
        main(FAST + ["--train", str(audio_dir), "--out_dir", str(tmp_path / "r"),
                     "--device", device])


def test_defaults_follow_the_recipe():
    cfg = CodecTrainConfig()
    assert cfg.lr == 6e-4 and cfg.lr_decay == 0.999994
    assert cfg.loss_weights["commitment"] == 0.25 and cfg.loss_weights["codebook"] == 1.0
    assert cfg.mpd_periods == [2, 3, 5, 7, 11] and cfg.stft_ffts == [1024, 2048, 4096]
    assert [row[1] for row in cfg.curriculum] == [1.0, 2.0, 3.0, 4.0]


# ---------------------------------------------------------------- training runs


def test_losses_fall_without_gan(tmp_path, audio_dir):
    run = tmp_path / "run"
    rc = main(FAST + ["--train", str(audio_dir), "--out_dir", str(run), "--gan", "false",
                      "--steps", "16", "--log_every", "4", "--val_every", "0"])
    assert rc == 0
    rows = [r for r in read_log(run) if "loss/mel" in r]
    assert len(rows) == 4
    for r in rows:
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith("loss/"))
        assert "loss/adv" not in r                           # discriminator off
    assert rows[-1]["loss/mel"] < 0.9 * rows[0]["loss/mel"]
    assert rows[-1]["loss/total"] < rows[0]["loss/total"]
    val = [r for r in read_log(run) if "val/mel" in r]
    assert len(val) == 1 and math.isfinite(val[0]["val/si_sdr"])
    assert 0 < val[0]["val/usage_0"] <= 1 and val[0]["val/perplexity_3"] >= 1


def test_exact_resume_with_gan(tmp_path, audio_dir):
    """4 straight steps == 2 steps + resume + 2 steps, bit for bit (weights, disc, optimisers)."""
    common = FAST + ["--train", str(audio_dir), "--steps", "4", "--log_every", "1",
                     "--val_every", "0", "--ckpt_every", "100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--out_dir", str(straight)]) == 0
    assert main(common + ["--out_dir", str(split), "--steps", "2"]) == 0
    # Same command minus "--resume never": picks the newest checkpoint, config from it + CLI.
    resume_args = [a for a in common if a not in ("--resume", "never")]
    assert main(resume_args + ["--out_dir", str(split)]) == 0

    a = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1][1])
    b = load_checkpoint(list_checkpoints(split / "checkpoints")[-1][1])
    assert a["trainer"]["step"] == b["trainer"]["step"] == 4
    for key in ("model", "disc"):
        assert a["weights"][key].keys() == b["weights"][key].keys()
        for name in a["weights"][key]:
            assert torch.equal(a["weights"][key][name], b["weights"][key][name]), (key, name)
    for key in ("opt_g", "opt_d"):
        for pid, st in a["trainer"][key]["state"].items():
            assert torch.equal(st["exp_avg_sq"], b["trainer"][key]["state"][pid]["exp_avg_sq"])
    assert torch.equal(a["trainer"]["rng"]["torch"], b["trainer"]["rng"]["torch"])
    losses = [r["loss/total"] for r in read_log(straight) if "loss/total" in r]
    losses_split = [r["loss/total"] for r in read_log(split) if "loss/total" in r]
    assert losses == losses_split and all(math.isfinite(v) for v in losses)
    assert all("loss/adv" in r and "loss/disc" in r for r in read_log(split) if "loss/total" in r)


def _as_legacy_pickle(folder: Path) -> Path:
    """Rewrite a checkpoint folder as the single pickle codec runs wrote before the shared
    format (training/run/checkpoint.py reads both), with its RNG state in the old types."""
    ck = load_checkpoint(folder)
    step, rng = ck["trainer"]["step"], ck["trainer"]["rng"]
    name, keys, *rest = rng["numpy"]
    old = {k: v for k, v in ck["trainer"].items() if k != "rng"}
    old.update(ck["weights"], model_config=ck["config"]["model"], config=ck["config"]["train"],
               step=step, rng={"python": rng["python"], "torch": rng["torch"],
                               "numpy": (name, keys.numpy().astype(np.uint32), *rest)})
    path = folder.parent / f"ckpt_{step:09d}.pt"
    torch.save(old, path)
    shutil.rmtree(folder)
    return path


def test_a_run_with_old_pickle_checkpoints_resumes_exactly(tmp_path, audio_dir):
    """A codec run from before the shared checkpoint format goes on, bit for bit, from its
    newest `ckpt_*.pt`; the next save is a folder, and keep_last also retires the pickles."""
    common = FAST + ["--train", str(audio_dir), "--steps", "4", "--log_every", "1",
                     "--val_every", "0", "--ckpt_every", "1", "--gan", "false",
                     "--keep_last", "2"]
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert main(common + ["--out_dir", str(straight)]) == 0
    assert main(common + ["--out_dir", str(old), "--steps", "2"]) == 0
    for _, folder in list_checkpoints(old / "checkpoints"):
        _as_legacy_pickle(folder)
    assert [p.name for _, p in list_checkpoints(old / "checkpoints")] == [
        "ckpt_000000001.pt", "ckpt_000000002.pt"]
    resume = [a for a in common if a not in ("--resume", "never")]
    assert main(resume + ["--out_dir", str(old)]) == 0

    assert [p.name for _, p in list_checkpoints(old / "checkpoints")] == [
        "ckpt-000003", "ckpt-000004"]
    a = load_checkpoint(straight / "checkpoints")
    b = load_checkpoint(old / "checkpoints")
    for name, value in a["weights"]["model"].items():
        assert torch.equal(value, b["weights"]["model"][name]), name
    losses = [r["loss/total"] for r in read_log(straight) if "loss/total" in r]
    assert losses == [r["loss/total"] for r in read_log(old) if "loss/total" in r]


def test_entry_point_sigterm_resume_export(tmp_path, audio_dir):
    """The script as users run it: SIGTERM saves and exits 143; rerunning resumes and exports;
    the export loads in snac, in the project's Codec, and round-trips audio."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "training" / "train_codec.py"), *FAST,
           "--train", str(audio_dir), "--out_dir", str(run), "--log_every", "1",
           "--val_every", "0", "--ckpt_every", "1000", "--steps", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.jsonl").exists() and len(read_log(run)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    (step, _), = list_checkpoints(run / "checkpoints")
    assert step >= 2 and not (run / "export").exists()

    resume = [a for a in cmd if a not in ("--resume", "never")]
    resume[resume.index("--steps") + 1] = str(step + 1)
    done = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [step, step + 1]

    export = run / "export"
    assert {p.name for p in export.iterdir()} >= {"config.json", "pytorch_model.bin",
                                                  "model.safetensors"}
    snac_model = SNAC.from_pretrained(str(export))
    x = torch.randn(1, 1, 24576) * 0.3
    with torch.no_grad():
        codes = snac_model.encode(x)
        y = snac_model.decode(codes)
    assert [c.shape[-1] for c in codes] == [8, 16, 32, 64] and y.shape == x.shape

    from safetensors.torch import load_file
    st = load_file(str(export / "model.safetensors"))
    for name, tensor in snac_model.state_dict().items():
        assert torch.equal(st[name], tensor), name

    from model.codec import Codec
    codec = Codec.load(str(export))
    assert codec.sample_rate == SR and codec.frames_per_chunk == (64, 128, 256, 512)
    with torch.no_grad():
        for a, b in zip(codec.encode(x[:, 0]), codes, strict=True):
            assert torch.equal(a.cpu(), b)

    from training.tokens import tokenizer
    tokens = tmp_path / "tokens"
    rc = tokenizer.main(["--audio", str(audio_dir), "--out", str(tokens), "--codec", str(export),
                        "--device", "cpu", "--workers", "1", "--no-progress"])
    assert rc == 0 and any(tokens.iterdir())


def test_decoder_only_finetune_keeps_codes(tmp_path, audio_dir, debug_codec_dir):
    """Fine-tune from an export dir with the encoder + quantiser frozen: only the decoder moves,
    so the codes (and any tokenised dataset) stay valid."""
    run = tmp_path / "ft"
    rc = main(FAST + ["--train", str(audio_dir), "--out_dir", str(run), "--init", debug_codec_dir,
                      "--freeze_encoder", "true", "--steps", "2", "--val_every", "0",
                      "--loss_weights.feat", "0"])
    assert rc == 0
    before = SNAC.from_pretrained(debug_codec_dir).state_dict()
    after = SNAC.from_pretrained(str(run / "export")).state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"decoder"}
    # The export subcommand: run dir -> its newest checkpoint -> the same weights.
    assert main(["export", str(run), str(tmp_path / "again")]) == 0
    again = SNAC.from_pretrained(str(tmp_path / "again")).state_dict()
    assert all(torch.equal(again[k], after[k]) for k in after)
