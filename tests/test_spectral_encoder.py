"""The spectral encoder (model/spectral_encoder.py): its features hold a tone's partials where
they belong, a codec built with it saves beside SNAC's files, loads, tokenises the same and
keeps its tokens local, and the codec trainer's entry point trains, resumes and exports it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from model.codec import DEBUG_CODEC_CONFIG, Codec
from model.spectral_encoder import (
    SpectralEncoder,
    SpectralEncoderConfig,
    build_encoder,
    high_band_filters,
)
from training.codec.cli import main
from training.run.checkpoint import list_checkpoints, load_checkpoint

SR = 32000
SPECTRAL_DEBUG = dict(DEBUG_CODEC_CONFIG, noise=False,
                      encoder=dict(kind="stft", latent_dim=128, hop=384, dim=32, layers=1),
                      decoder=dict(kind="istft", latent_dim=128, hop=384, n_fft=1536, dim=32,
                                   layers=2, phase="griffin_lim", gl_iters=4))


def tone(freq: float, seconds: float = 0.768, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return (amp * torch.sin(2 * math.pi * freq * t))[None, None]


def test_features_hold_a_partial_in_its_own_bin_and_highs_in_bands():
    enc = SpectralEncoder(SpectralEncoderConfig(latent_dim=16, dim=16, layers=1))
    cfg = enc.cfg
    assert cfg.n_linear == 192 and cfg.n_features == 224
    low = enc.features(tone(440.0))
    assert low.shape == (1, cfg.n_features, int(0.768 * SR) // cfg.hop)
    mid = low[0, :, low.shape[-1] // 2]
    assert int(mid[: cfg.n_linear].argmax()) == round(440.0 * cfg.n_fft / SR)   # bin 28
    # a semitone up is a different bin: the pitch is in the input
    up = enc.features(tone(466.2))[0, :, low.shape[-1] // 2]
    assert int(up[: cfg.n_linear].argmax()) == round(466.2 * cfg.n_fft / SR)    # bin 30
    # a 6 kHz tone lights one high band, not the linear bins
    high = enc.features(tone(6000.0))[0, :, low.shape[-1] // 2]
    assert high[cfg.n_linear:].max() > high[: cfg.n_linear].max() + 3
    bands = high_band_filters(cfg)
    assert torch.allclose(bands.sum(1), torch.ones(cfg.high_bands))
    assert (bands[:, : cfg.n_linear] == 0).all()
    with pytest.raises(ValueError, match="multiple of hop"):
        enc.features(torch.zeros(1, 1, 1000))
    with pytest.raises(ValueError, match="linear_max_hz"):
        SpectralEncoderConfig(linear_max_hz=20000.0)
    with pytest.raises(ValueError, match="unknown encoder kind"):
        build_encoder({"kind": "wavelet"})


def test_the_bass_stft_tells_bass_semitones_apart():
    """C2 and C#2 (65.4 and 69.3 Hz) fall in one 15.6 Hz bin of the main STFT; the bass STFT's
    3.9 Hz bins hold them apart. Without a bass STFT the features are the same as before."""
    plain = SpectralEncoder(SpectralEncoderConfig(latent_dim=16, dim=16, layers=1))
    enc = SpectralEncoder(SpectralEncoderConfig(latent_dim=16, dim=16, layers=1,
                                                bass_n_fft=8192))
    cfg = enc.cfg
    lo, hi = cfg.bass_bins
    assert (lo, hi) == (7, 134) and cfg.n_features == 224 + 127
    peaks = {}
    for hz in (65.41, 69.30):
        f = enc.features(tone(hz, seconds=1.536))
        mid = f[0, :, f.shape[-1] // 2]
        peaks[hz] = (int(mid[: cfg.n_linear].argmax()), lo + int(mid[224:].argmax()))
        assert torch.equal(f[:, :224], plain.features(tone(hz, seconds=1.536)))
    assert peaks[65.41][0] == peaks[69.30][0]                        # one main bin
    assert [p[1] for p in peaks.values()] == [round(65.41 * 8192 / SR), round(69.30 * 8192 / SR)]
    with pytest.raises(ValueError, match="bass_n_fft"):
        SpectralEncoderConfig(bass_n_fft=1001)


def test_a_spectral_codec_saves_loads_and_tokenises_locally(tmp_path):
    codec = Codec.load(SPECTRAL_DEBUG, seed=0)
    out = codec.save(tmp_path / "c")
    names = {p.name for p in out.iterdir()}
    assert {"encoder.json", "encoder.safetensors", "decoder.json", "decoder.safetensors",
            "config.json", "model.safetensors"} <= names
    assert "encoder" not in json.loads((out / "config.json").read_text())
    again = Codec.load(str(out))
    assert again.fingerprint == codec.fingerprint
    assert again.codes_fingerprint == codec.codes_fingerprint
    x = torch.randn(1, 3 * 12288) * 0.2
    codes = codec.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(codes, again.encode(x), strict=True))
    assert [c.shape[-1] for c in codes] == [12, 24, 48, 96]
    # the encoder is part of what the codes mean; the SNAC encoder it replaces is not this one
    snac_encoder = Codec.load({k: v for k, v in SPECTRAL_DEBUG.items() if k != "encoder"}, seed=0)
    assert snac_encoder.codes_fingerprint != codec.codes_fingerprint
    # tokens stay local: the measured reach is within the geometry's border (what serving
    # and the tokeniser re-encode around a seam), and well inside SNAC's own
    assert codec.encoder_reach() <= codec.border_samples <= snac_encoder.border_samples
    # re-saving a SNAC-encoder codec over it removes the stale encoder files
    snac_encoder.save(out)
    assert not (out / "encoder.json").exists()


def test_a_broken_encoder_file_is_a_clear_load_error(tmp_path):
    from model.weights import CodecLoadError

    out = Codec.load(SPECTRAL_DEBUG, seed=0).save(tmp_path / "c")
    spec = json.loads((out / "encoder.json").read_text())
    (out / "encoder.json").write_text(json.dumps(dict(spec, dim=48)))
    with pytest.raises(CodecLoadError, match="encoder.*cannot be loaded"):
        Codec.load(str(out))


@pytest.fixture(scope="module")
def tone_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tones")
    for i, f in enumerate((220.0, 330.0, 440.0)):
        sf.write(d / f"t{i}.wav", tone(f, 1.5)[0, 0].numpy().astype(np.float32), SR)
    return d


def test_the_spectral_codec_trains_resumes_exactly_and_exports(tmp_path, tone_dir, capsys):
    common = ["--preset", "debug", "--curriculum", "[[0, 0.384, 2]]", "--val_seconds", "0.384",
              "--val_files", "1", "--num_workers", "0", "--threads", "1", "--progress", "false",
              "--gan", "false", "--model.noise", "false",
              "--encoder", '{kind = "stft", dim = 32, layers = 1}',
              "--decoder", '{kind = "istft", dim = 32, layers = 2, phase = "griffin_lim", '
                           'gl_iters = 4}',
              "--loss_weights.amp", "4", "--loss_weights.phase", "0",
              "--loss_weights.consistency", "0", "--loss_weights.chroma", "2",
              "--loss_weights.encoder_spectrum", "1", "--loss_weights.l1", "0",
              "--train", str(tone_dir), "--steps", "4", "--log_every", "1", "--val_every", "4",
              "--ckpt_every", "100", "--resume", "never"]
    common += ["--train_gl_iters", "2"]     # training renders with 2, validation with 4
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--out_dir", str(straight)]) == 0
    assert main(common + ["--out_dir", str(split), "--steps", "2"]) == 0
    assert main([a for a in common if a not in ("--resume", "never")]
                + ["--out_dir", str(split)]) == 0
    a = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1][1])
    b = load_checkpoint(list_checkpoints(split / "checkpoints")[-1][1])
    assert a["config"]["model"]["encoder"]["kind"] == "stft"
    assert any(k.startswith("encoder.embed") for k in a["weights"]["model"])
    for name, tensor in a["weights"]["model"].items():
        assert torch.equal(tensor, b["weights"]["model"][name]), name
    rows = [json.loads(r) for r in (straight / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss/total" in r]
    assert all(math.isfinite(r["loss/total"]) for r in train)
    export = Codec.load(str(straight / "export"))
    assert export.snac.encoder.cfg.kind == "stft" and export.decoder_name == "istft"
    assert export.snac.decoder.cfg.gl_iters == 4          # training's own count is not exported
    y = export.decode(export.encode(tone(330.0)[0]))
    assert y.shape == (1, int(0.768 * SR)) and torch.isfinite(y).all()
    # a resume takes the recipe's new render options (no weight changes); a shape change is
    # ignored with a warning
    at = common.index("--decoder") + 1
    resumed = [a for a in common if a not in ("--resume", "never")]
    resumed[at] = ('{kind = "istft", dim = 32, layers = 3, phase = "griffin_lim", gl_iters = 4, '
                   'gl_init = "random"}')
    capsys.readouterr()
    assert main(resumed + ["--out_dir", str(split), "--steps", "5", "--val_every", "0"]) == 0
    assert "decoder.layers ignored on resume" in capsys.readouterr().err
    ck = load_checkpoint(list_checkpoints(split / "checkpoints")[-1][1])
    assert ck["config"]["model"]["decoder"]["gl_init"] == "random"
    assert ck["config"]["model"]["decoder"]["layers"] == 2
    assert Codec.load(str(split / "export")).snac.decoder.cfg.gl_init == "random"
    # its card says which encoder the codes come from, and what snac alone cannot do with them
    import importlib.util
    from pathlib import Path

    from training.codec.card import main as card_main

    spec = importlib.util.spec_from_file_location(
        "eval_codec", Path(__file__).resolve().parents[1] / "bench" / "eval_codec.py")
    eval_codec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_codec)
    result = tmp_path / "eval.json"
    assert eval_codec.main(["--codec", str(straight / "export"), "--audio", str(tone_dir),
                            "--seconds", "0.768", "--segments", "1", "--repeats", "1",
                            "--threads", "1", "--out", str(result)]) == 0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.jsonl").write_text(json.dumps(
        {"status": "kept", "output_path": "audio/t0.wav", "package": "synthetic",
         "licence": "CC0-1.0"}) + "\n")
    (corpus / "summary.json").write_text(json.dumps({"total_hours": 0.01, "kept": 1, "packages": {
        "synthetic": {"kept": 1, "hours": 0.01, "licences": {"CC0-1.0": 1}}}}))
    assert card_main(["--run", str(straight), "--codec", str(straight / "export"), "--eval",
                      str(result), "--corpus", str(corpus)]) == 0
    text = (straight / "export" / "MODEL_CARD.md").read_text()
    assert "Encoder: **stft**" in text and "spectral encoder 32 × 1" in text
    assert "tokenises only through `Codec.load`" in text
    assert "loads them for tokenising" not in text
    # a warm start keeps the saved encoder and says that a new `encoder` table is ignored
    capsys.readouterr()
    assert main(common + ["--out_dir", str(tmp_path / "warm"), "--init",
                          str(straight / "export"), "--steps", "1", "--val_every", "0"]) == 0
    assert "encoder ignored" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(common + ["--encoder", '{kind = "wavelet"}', "--out_dir", str(tmp_path / "bad")])
    assert stop.value.code == 2
    assert "unknown encoder kind 'wavelet'" in capsys.readouterr().err


def test_training_batches_render_with_train_gl_iters_and_validation_with_the_decoders_own():
    from training.codec.config import load_config
    from training.codec.trainer import CodecTrainer

    cfg = load_config(None, ["--preset", "debug", "--model.noise", "false", "--threads", "1",
                             "--decoder", '{kind = "istft", dim = 16, layers = 1, '
                                          'phase = "griffin_lim", gl_iters = 6}',
                             "--train_gl_iters", "2", "--loss_weights.amp", "1"]).validate()
    trainer = CodecTrainer(cfg)
    decoder, seen = trainer.model.decoder, []
    render = decoder.render
    decoder.render = lambda *a: seen.append(decoder.cfg.gl_iters) or render(*a)
    trainer.train_step(torch.randn(2, 1, 12288) * 0.1)
    assert seen == [2] and decoder.cfg.gl_iters == 6
    with pytest.raises(ValueError, match="train_gl_iters"):
        load_config(None, ["--train_gl_iters", "-1"]).validate()


def test_the_server_serves_a_dit_on_a_spectral_codecs_codes(tmp_path):
    """A DiT trained on a spectral codec's codes is served by it: /info names both parts and
    the codes match; /continue answers a chunk."""
    import io

    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings
    from tests.test_server_entry import _dit_trained_on, _wav

    codec = Codec.load(SPECTRAL_DEBUG, seed=0)
    assert (codec.encoder_name, codec.decoder_name) == ("stft", "istft")
    codec_dir = str(codec.save(tmp_path / "spectral"))
    weights = _dit_trained_on(tmp_path, "dit", {"fingerprint": codec.fingerprint,
                                                 "codes_fingerprint": codec.codes_fingerprint})
    with TestClient(create_app(Settings(weights=weights, codec=codec_dir, device="cpu",
                                        warmup=False))) as c:
        info = c.get("/info").json()["codec"]
        assert (info["encoder"], info["decoder"], info["codes_match"]) == ("stft", "istft", True)
        r = c.post("/continue?steps=1", files={"audio": ("a.wav", _wav(7.0), "audio/wav")})
        assert r.status_code == 200, r.text
    audio, sr = sf.read(io.BytesIO(r.content))
    assert sr == SR and len(audio) == 196_608 and np.abs(audio).max() > 0


def test_realtime_bench_times_the_path_through_a_spectral_codec(tmp_path, debug_weights_dir,
                                                                debug_codec_dir):
    import subprocess
    import sys
    from pathlib import Path

    spectral = str(Codec.load(SPECTRAL_DEBUG, seed=0).save(tmp_path / "spectral"))
    out = tmp_path / "rt.jsonl"
    args = [sys.executable, "bench/realtime.py", "--weights", debug_weights_dir, "--codec",
            debug_codec_dir, "--time-codec", spectral, "--threads", "1", "--steps", "1,1,1,1",
            "--warmup", "0", "--repeats", "1", "--levers", "none", "--out", str(out)]
    root = Path(__file__).resolve().parents[1]
    subprocess.run(args + ["--modes", "continue"], cwd=root, check=True, capture_output=True,
                   timeout=600)
    row = json.loads(out.read_text())
    assert row["encoder"] == row["decoder"] == spectral
    assert row["median_s"]["encode"] > 0 and row["median_s"]["decode"] > 0
    http = subprocess.run(args + ["--modes", "http"], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert http.returncode != 0 and "--time-codec apply to the other modes" in http.stderr


def test_a_decoder_only_fine_tune_of_a_spectral_codec_keeps_its_codes(tmp_path, tone_dir):
    """The plan once the codes are frozen (docs/codec-training.md): the decoder keeps training
    with `freeze_encoder`, so a DiT trained on the codes stays valid. Only the decoder moves,
    and the codes fingerprint is the same."""
    common = ["--preset", "debug", "--curriculum", "[[0, 0.384, 2]]", "--val_seconds", "0.384",
              "--val_files", "1", "--num_workers", "0", "--threads", "1", "--progress", "false",
              "--gan", "false", "--model.noise", "false",
              "--encoder", '{kind = "stft", dim = 32, layers = 1}',
              "--decoder", '{kind = "istft", dim = 32, layers = 1, phase = "frequency"}',
              "--loss_weights.amp", "4", "--loss_weights.phase", "0", "--loss_weights.l1", "0",
              "--loss_weights.consistency", "0", "--loss_weights.frequency", "10",
              "--loss_weights.frequency_bass", "10", "--loss_weights.chroma", "2",
              "--loss_weights.encoder_spectrum", "1", "--train", str(tone_dir), "--steps", "2",
              "--val_every", "0", "--ckpt_every", "100", "--resume", "never"]
    assert main(common + ["--out_dir", str(tmp_path / "base")]) == 0
    base = tmp_path / "base" / "export"
    assert main(common + ["--out_dir", str(tmp_path / "ft"), "--init", str(base),
                          "--freeze_encoder", "true", "--frequency_bass_hz", "520"]) == 0
    before, after = Codec.load(str(base)), Codec.load(str(tmp_path / "ft" / "export"))
    assert after.codes_fingerprint == before.codes_fingerprint
    a, b = before.snac.state_dict(), after.snac.state_dict()
    changed = {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}
    assert changed == {"decoder"}
    x = tone(330.0)[0]
    for p, q in zip(before.encode(x), after.encode(x), strict=True):
        assert torch.equal(p, q)
