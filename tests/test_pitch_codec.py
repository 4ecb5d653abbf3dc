"""The codec judged by pitch: the metrics on signals with known answers, the inverse-STFT
decoder (its signal path, its files beside SNAC's, seam-free decoding), its training terms,
the chroma head, and the codec trainer's entry point with both.

A chord keeps its notes through Griffin-Lim and loses them to envelope-shaped noise; a pulse
train at the frame rate has a comb, noise has none. The decoder tests use the debug codec's
geometry (real 32 kHz rates and strides, tiny widths).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from snac import SNAC

from model.codec import DEBUG_CODEC_CONFIG, Codec
from model.vocoder import ISTFTDecoder, ISTFTDecoderConfig, set_render_options
from training.codec import pitch
from training.codec.card import bass_text, origin_text, warmup_text
from training.codec.cli import main
from training.codec.config import CodecTrainConfig
from training.codec.losses import anti_wrap, chroma_filterbank, spectral_decoder_losses
from training.run.checkpoint import list_checkpoints, load_checkpoint

SR = 32000
FRAME_RATE = SR / 384
ISTFT_DEBUG = dict(DEBUG_CODEC_CONFIG, noise=False, decoder=dict(
    kind="istft", latent_dim=128, hop=384, n_fft=1536, dim=32, layers=2))


def chord_progression(seconds: float = 6.144) -> np.ndarray:
    """Four triads with decaying envelopes, five harmonics each: clear notes."""
    t = np.arange(int(seconds * SR)) / SR
    x = np.zeros_like(t)
    chords = [(261.6, 329.6, 392.0), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6),
              (196.0, 246.9, 293.7)]
    n = len(t) // len(chords)
    for i, chord in enumerate(chords):
        s = slice(i * n, (i + 1) * n)
        tt = t[s] - t[s][0]
        x[s] = sum(np.sin(2 * np.pi * f * k * t[s]) / k for f in chord for k in range(1, 6)) \
            * np.exp(-3 * tt)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def chord():
    x = chord_progression()
    return x, pitch.transcribe(x, SR)


# ---------------------------------------------------------------- metrics
def test_chroma_tells_the_notes_from_their_envelope(chord):
    x, _ = chord
    assert pitch.chroma_correlation(x, x, SR) == pytest.approx(1.0, abs=1e-6)
    assert pitch.chroma_correlation(x, pitch.griffin_lim(x, SR), SR) > 0.9
    assert pitch.chroma_correlation(x, pitch.envelope_noise(x, SR), SR) < 0.3
    # a note that is in none of the chords: no better than noise
    t = np.arange(len(x)) / SR
    shifted = (0.3 * np.sin(2 * np.pi * 277.2 * t) * np.exp(-2 * (t % 1.536))).astype(np.float32)
    assert pitch.chroma_correlation(x, shifted, SR) < 0.5
    assert math.isnan(pitch.chroma_correlation(np.zeros_like(x), x, SR))


def test_register_chroma_sees_a_wrong_bass_note_where_it_is():
    """A bass line a semitone off (the upper voices right) costs the bass register's chroma,
    not the upper register's."""
    t = np.arange(int(4.0 * SR)) / SR

    def voices(bass_hz: float) -> np.ndarray:
        x = sum(np.sin(2 * np.pi * bass_hz * k * t) / k for k in (1, 2, 3))
        x = x + sum(0.5 * np.sin(2 * np.pi * f * t) for f in (523.3, 659.3, 784.0))
        return (0.1 * x).astype(np.float32)

    right, wrong = voices(65.41), voices(69.30)                    # C2 vs C#2, under C major
    bass = pitch.chroma_correlation(right, wrong, SR, pitch.REGISTERS["chroma_bass"])
    upper = pitch.chroma_correlation(right, wrong, SR, pitch.REGISTERS["chroma_upper"])
    assert bass < 0.5 < 0.9 < upper, (bass, upper)
    metrics = pitch.pitch_metrics(right, right, SR, 83.33, ref_events=[])
    assert metrics["chroma_bass"] == pytest.approx(1.0) and metrics["chroma_upper"] == \
        pytest.approx(1.0)


def test_transcription_scores_the_chord_and_not_its_noise(chord):
    x, ref = chord
    assert len(ref) >= 8                           # the model hears the notes of the triads
    same = pitch.transcription_scores(ref, ref, len(x) / SR)
    assert same == {"frame_f1": 1.0, "chroma_f1": 1.0, "onset_f1": 1.0}
    noise = pitch.pitch_metrics(x, pitch.envelope_noise(x, SR), SR, FRAME_RATE, ref)
    kept = pitch.pitch_metrics(x, pitch.griffin_lim(x, SR), SR, FRAME_RATE, ref)
    assert noise["frame_f1"] < 0.2 and noise["onset_f1"] < 0.2
    assert kept["frame_f1"] > 0.8 and kept["chroma_f1"] > 0.8
    assert pitch.transcription_scores([], ref, 6.0) is None      # nothing to score against


def test_frame_rate_comb_finds_a_buzz():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(5 * SR).astype(np.float32)
    pulses = np.zeros(5 * SR, np.float32)
    pulses[::384] = 1.0
    buzz = np.convolve(pulses, np.hanning(64), "same") * 0.1 + 0.01 * noise
    assert pitch.frame_rate_comb(buzz, SR, FRAME_RATE) > 10
    assert abs(pitch.frame_rate_comb(noise, SR, FRAME_RATE)) < 1.5


# ---------------------------------------------------------------- the decoder
def test_istft_framing_reconstructs_exactly():
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1))
    x = torch.randn(2, 1, 384 * 40)
    S = d.analysis(x)
    assert S.shape == (2, 769, 40)
    y = d.synthesize(S.abs().clamp(min=1e-12).log(), S.angle())
    assert y.shape == x.shape
    assert torch.allclose(y, x, atol=1e-4)
    assert d(torch.randn(1, 16, 7)).shape == (1, 1, 7 * 384)


def test_griffin_lim_phase_rebuilds_a_chord_from_magnitudes_alone():
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1, phase="griffin_lim"))
    x = chord_progression(2.304)
    S = d.analysis(torch.from_numpy(x).view(1, 1, -1))
    zero = torch.zeros_like(S.real)
    y = d.render(S.abs().clamp(min=1e-12).log(), zero)[0, 0].numpy()
    assert pitch.chroma_correlation(x, y, SR) > 0.9
    learned = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1))
    z = learned.render(S.abs().clamp(min=1e-12).log(), zero)[0, 0].numpy()
    assert np.abs(y - z).max() > 1e-3                      # zero phase is not what GL gives
    with pytest.raises(ValueError, match="phase"):
        ISTFTDecoder(ISTFTDecoderConfig(phase="guess"))


def test_spectral_terms_vanish_on_the_truth_and_wrap_phase():
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1))
    x = torch.from_numpy(chord_progression(1.152)).view(1, 1, -1)
    S = d.analysis(x)
    terms = spectral_decoder_losses(d, S.abs().clamp(min=1e-5).log(), S.angle(), x)
    assert terms["amp"] < 1e-8 and terms["phase"] < 1e-3 and terms["consistency"] < 1e-6
    wrong = spectral_decoder_losses(d, S.abs().clamp(min=1e-5).log(), S.angle() + 1.0, x)
    assert wrong["phase"] > 0.9                                   # the instantaneous phase
    assert torch.allclose(anti_wrap(torch.tensor([2 * math.pi + 0.1, -0.1, math.pi - 0.1])),
                          torch.tensor([0.1, 0.1, math.pi - 0.1]), atol=1e-5)


def test_the_partials_term_weighs_partials_where_log_magnitude_weighs_the_noise_floor():
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1))
    x = torch.from_numpy(chord_progression(1.152)).view(1, 1, -1)
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    S = d.analysis(x)
    log_mag = S.abs().clamp(min=1e-5).log()
    # the partials smeared over 9 bins (the envelope kept: what a decoder that has not heard
    # the notes predicts), against the truth with its noise floor scattered as noise scatters
    smeared = torch.nn.functional.avg_pool1d(S.abs().transpose(1, 2), 9, 1, 4,
                                             count_include_pad=False).transpose(1, 2)
    smeared = smeared.clamp(min=1e-5).log()
    floor = log_mag < log_mag.max() - 40 / 8.69
    jitter = torch.randn(log_mag.shape, generator=torch.Generator().manual_seed(1))
    scattered = torch.where(floor, log_mag + 1.5 * jitter, log_mag)
    a = spectral_decoder_losses(d, smeared, S.angle(), x)
    b = spectral_decoder_losses(d, scattered, S.angle(), x)
    assert spectral_decoder_losses(d, log_mag, S.angle(), x)["partials"] < 1e-8
    assert a["amp"] < b["amp"]                     # log-magnitude MSE prefers the smear...
    assert a["partials"] > 1.5 * b["partials"]     # ...the partials term does not


def test_the_output_chroma_term_tells_the_notes_from_their_envelope():
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1))
    x = torch.from_numpy(chord_progression(1.152)).view(1, 1, -1)
    S = d.analysis(x)
    log_mag = S.abs().clamp(min=1e-5).log()
    term = lambda lm: float(spectral_decoder_losses(d, lm, S.angle(), x)["output_chroma"])  # noqa: E731
    # the envelope with its partials smeared over 9 bins, and the chord a semitone up
    smeared = torch.nn.functional.avg_pool1d(S.abs().transpose(1, 2), 9, 1, 4,
                                             count_include_pad=False).transpose(1, 2)
    t = torch.arange(x.shape[-1]) / SR
    up = sum(torch.sin(2 * math.pi * f * 2 ** (1 / 12) * k * t) / k
             for f in (261.6, 329.6, 392.0) for k in range(1, 6)).view(1, 1, -1) * 0.05
    shifted = d.analysis(up).abs().clamp(min=1e-5).log()
    assert term(log_mag) < 1e-4
    assert term(smeared.clamp(min=1e-5).log()) > 0.2
    assert term(shifted) > 0.8          # the wrong pitch classes: no better than none
    fb = chroma_filterbank(1536, SR, 769)
    assert fb.shape == (12, 769) and fb[:, :12].abs().sum() == 0       # nothing below 250 Hz
    a4 = round(440 * 1536 / SR)                                        # bin 21: A4
    assert int(fb[:, a4].argmax()) == 9                                # pitch class A


def test_a_codec_with_the_istft_decoder_saves_beside_snac_files(tmp_path):
    codec = Codec.load(ISTFT_DEBUG, seed=0)
    assert codec.decoder_name == "istft"
    out = codec.save(tmp_path / "c")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "pytorch_model.bin", "decoder.json",
            "decoder.safetensors"} <= names
    assert "decoder" not in json.loads((out / "config.json").read_text())
    x = torch.randn(1, 24576) * 0.3
    again = Codec.load(str(out))
    assert again.decoder_name == "istft" and again.fingerprint == codec.fingerprint
    codes = codec.encode(x)
    # snac itself still loads the directory, for tokenising: the same codes
    snac_codes = SNAC.from_pretrained(str(out)).eval().encode(x[:, None])
    assert all(torch.equal(a, b) for a, b in zip(codes, snac_codes, strict=True))
    assert torch.equal(codec.decode(codes), again.decode(codes))
    # the codes fingerprint ignores which decoder renders them
    plain = Codec.load({k: v for k, v in ISTFT_DEBUG.items() if k != "decoder"}, seed=0)
    assert plain.codes_fingerprint == codec.codes_fingerprint
    assert plain.fingerprint != codec.fingerprint and plain.decoder_name == "snac"
    # re-saving a SNAC-decoder codec over it removes the stale decoder files
    plain.save(out)
    assert Codec.load(str(out)).decoder_name == "snac"


def test_istft_decoding_with_context_is_seam_free():
    codec = Codec.load(ISTFT_DEBUG, seed=1)
    g = torch.Generator().manual_seed(0)
    n = [16, 32, 64, 128]                                      # 4 padding units per level
    tokens = [torch.randint(0, 4096, (1, 3 * k), generator=g) for k in n]
    whole = codec.decode(tokens)
    a = [t[:, :k] for t, k in zip(tokens, n, strict=True)]
    b = [t[:, k: 2 * k] for t, k in zip(tokens, n, strict=True)]
    c = [t[:, 2 * k:] for t, k in zip(tokens, n, strict=True)]
    part = codec.decode(b, context=a, right_context=c, first_frame=n[0] * 8)
    per = 8 * 384 * n[0]
    assert torch.allclose(part, whole[:, per: 2 * per], atol=1e-5)
    assert torch.equal(codec.decode(b, seed=0), codec.decode(b, seed=5))   # no noise


@pytest.mark.parametrize("gl_init", ["advance", "random"])
def test_griffin_lim_decoding_in_the_servers_windows_matches_the_whole_decode(gl_init):
    """Griffin-Lim couples every frame to its neighbours a little more each iteration, but it
    starts from phases that repeat on the codec's padding grid, and its reach fades fast: the
    server's windows (two padding units before, one after) decode what a decode of the whole
    sequence gives there."""
    spec = dict(ISTFT_DEBUG["decoder"], phase="griffin_lim", gl_iters=32, gl_init=gl_init)
    codec = Codec.load(dict(ISTFT_DEBUG, decoder=spec), seed=1)
    g = torch.Generator().manual_seed(0)
    n = [4, 8, 16, 32]                                          # one padding unit per level
    tokens = [torch.randint(0, 4096, (1, 6 * k), generator=g) for k in n]
    whole = codec.decode(tokens)
    window = [t[:, 1 * k: 5 * k] for t, k in zip(tokens, n, strict=True)]
    part = codec.decode(window, first_frame=n[0] * 8)           # units 1-4 decoded alone
    unit = 8 * 384 * n[0]
    a, b = part[:, 2 * unit: 3 * unit], whole[:, 3 * unit: 4 * unit]   # unit 3: 2 before, 1 after
    assert (a - b).norm() / b.norm() < 1e-3
    # the first unit of the window, with no context before it, is not the whole decode's
    assert (part[:, :unit] - whole[:, unit: 2 * unit]).norm() / whole[:, unit: 2 * unit].norm() \
        > 1e-2


def smeared_partial(d: ISTFTDecoder, f0: float, frames: int) -> torch.Tensor:
    """(1, F, frames) log magnitude of one steady partial at f0, smeared over ~5 bins (what a
    decoder that half-knows where the partial is predicts)."""
    k = torch.arange(d.n_bins).float()
    return (-(k - f0 / SR * d.cfg.n_fft) ** 2 / 2.0).view(1, -1, 1).expand(1, -1, frames)


def spectrum_peak_hz(y: np.ndarray) -> float:
    y = y[4000:-4000] * np.hanning(len(y) - 8000)
    spec = np.abs(np.fft.rfft(y, 8 * len(y)))
    return float(np.fft.rfftfreq(8 * len(y), 1 / SR)[spec.argmax()])


def test_the_frequency_decoder_plays_a_smeared_partial_at_its_own_frequency():
    """Phase integrated from each bin's instantaneous frequency renders a partial smeared over
    several bins as one steady tone at that frequency, between bin centres, with no dips where
    the integration restarts; Griffin-Lim on the same magnitudes cannot say where it lies."""
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1, phase="frequency"))
    frames, f0 = 384, 441.3                                  # bins are 20.8 Hz apart
    log_mag = smeared_partial(d, f0, frames)
    y = d.render(log_mag, torch.full((1, d.n_bins, frames), 2 * math.pi * f0 / SR))[0, 0]
    grid = SR / (d.cfg.frequency_period * d.cfg.hop)          # 0.65 Hz: the rounding it costs
    assert abs(spectrum_peak_hz(y.numpy()) - f0) <= grid / 2 + 0.1
    env = y[3840:-3840].view(-1, 384).abs().amax(1)           # per-hop peak: no restart dips
    assert env.min() > 0.97 * env.max(), (env.min(), env.max())
    # the instantaneous frequency is what places it: the bins' own centres put it elsewhere
    centres = 2 * math.pi * torch.arange(d.n_bins).float() / d.cfg.n_fft
    y_centres = d.render(log_mag, centres.view(1, -1, 1).expand(1, -1, frames))[0, 0]
    peak, bin_hz = spectrum_peak_hz(y_centres.numpy()), SR / d.cfg.n_fft
    assert abs(peak - round(peak / bin_hz) * bin_hz) < 0.5 and abs(peak - f0) > 3
    with pytest.raises(ValueError, match="frequency_period"):
        ISTFTDecoderConfig(phase="frequency", frequency_period=33)


def test_the_frequency_term_knows_the_true_frequency_and_its_aliases():
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1, phase="frequency"))
    t = np.arange(int(1.152 * SR)) / SR
    x = torch.from_numpy((0.3 * np.sin(2 * np.pi * 441.3 * t)).astype(np.float32)).view(1, 1, -1)
    S = d.analysis(x)
    log_mag = S.abs().clamp(min=1e-5).log()
    frames = log_mag.shape[-1]

    def term(hz: float) -> float:
        omega = torch.full((1, d.n_bins, frames), 2 * math.pi * hz / SR)
        return float(spectral_decoder_losses(d, log_mag, omega, x)["frequency"])

    right = term(441.3)
    assert right < 0.05 and term(441.3 + 10.0) > 10 * right and term(430.0) > 10 * right
    # a phase advance is only known modulo 2 pi: one hop's worth of frequency is an alias
    assert abs(term(441.3 + SR / d.cfg.hop) - right) < 0.01


def test_the_bass_frequency_term_weighs_a_bass_semitone_more_than_the_whole_term():
    """A2 (110 Hz) under a louder A5: playing the bass bins a semitone flat (A-flat 2) moves the
    bass term over three times as far as the whole term, in which the upper voice's bins dilute
    it (the more partials above, the more so)."""
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1, phase="frequency"))
    t = np.arange(int(1.152 * SR)) / SR
    x = torch.from_numpy((0.5 * np.sin(2 * np.pi * 880.0 * t) + 0.2 * np.sin(2 * np.pi * 110.0 * t))
                         .astype(np.float32)).view(1, 1, -1)
    log_mag = d.analysis(x).abs().clamp(min=1e-5).log()
    f = torch.arange(d.n_bins).float() * SR / d.cfg.n_fft

    def terms(bass_hz: float) -> dict:
        hz = torch.where(f < 500.0, bass_hz, 880.0)     # each bin plays its partial's frequency
        omega = (2 * math.pi * hz / SR)[None, :, None].expand(1, -1, log_mag.shape[-1])
        return spectral_decoder_losses(d, log_mag, omega.contiguous(), x)

    right, flat = terms(110.0), terms(103.83)
    assert right["frequency_bass"] < 0.05 and flat["frequency_bass"] > 0.2
    assert flat["frequency"] - right["frequency"] < 0.3 * (flat["frequency_bass"]
                                                         - right["frequency_bass"])


@pytest.mark.parametrize("period", [32, 64])
def test_frequency_decoding_in_the_servers_windows_matches_the_whole_decode(period):
    """The integration restarts on the whole sequence's grid (Codec.decode passes the window's
    first frame), so a window that starts `decode_left_pads` units before the samples it keeps
    decodes them as the whole sequence does; one unit less does not."""
    spec = dict(ISTFT_DEBUG["decoder"], phase="frequency", frequency_period=period)
    codec = Codec.load(dict(ISTFT_DEBUG, decoder=spec), seed=1)
    with torch.no_grad():                 # a trained head's frequencies, not bin centres
        codec.snac.decoder.head.weight[codec.snac.decoder.n_bins:].normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    n = [4, 8, 16, 32]                                          # one padding unit per level
    units = 10
    tokens = [torch.randint(0, 4096, (1, units * k), generator=g) for k in n]
    whole = codec.decode(tokens)
    unit, keep = 8 * 384 * n[0], units - 2                      # keep unit 8, 1 after it
    left = codec.decode_left_pads
    assert left == -(-(period + codec.snac.decoder.receptive_frames + 4) // 32)
    for pads, exact in ((left, True), (left - 1, False)):
        lo = keep - pads
        window = [t[:, lo * k: (keep + 2) * k] for t, k in zip(tokens, n, strict=True)]
        part = codec.decode(window, first_frame=lo * n[0] * 8)
        a, b = part[:, pads * unit: (pads + 1) * unit], whole[:, keep * unit: (keep + 1) * unit]
        err = float((a - b).norm() / b.norm())
        assert (err < 1e-4) is exact, (pads, err)


def test_griffin_lim_from_random_phases_renders_no_bin_grid():
    """A smooth spectrum (what a decoder that has not heard the partials predicts) rendered by
    Griffin-Lim from each bin's own advance comes out as steady tones on the 20.8 Hz bin grid;
    started from random phases, it does not."""
    combs = {}
    for gl_init in ("advance", "random"):
        d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1,
                                            phase="griffin_lim", gl_init=gl_init))
        frames = 256
        freqs = torch.arange(d.n_bins).float() * SR / 1536
        log_mag = (2.0 - freqs / 4000.0)[None, :, None].expand(1, -1, frames).contiguous()
        y = d.render(log_mag, d.advance(frames)[None])[0, 0].numpy()
        combs[gl_init] = pitch.frame_rate_comb(y, SR, SR / 1536, 48)
    assert combs["advance"] > 6 and abs(combs["random"]) < 2, combs
    with pytest.raises(ValueError, match="gl_init must be"):
        ISTFTDecoderConfig(gl_init="zero")


def test_chroma_head_target_finds_the_pitch_class():
    from training.codec.pitch_head import ChromaHead

    head = ChromaHead(latent_dim=16, sample_rate=SR, hop=384, pool=8)
    t = np.arange(int(1.152 * SR)) / SR
    a4 = torch.from_numpy((0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32))
    p, mask = head.target(a4.view(1, 1, -1), frames=12)
    assert p.shape == (1, 1, 12, 12) and mask.all()
    assert (p[0, 0].argmax(dim=0) == 9).all()                   # librosa's classes: C = 0, A = 9
    assert torch.allclose(p.sum(dim=2), torch.ones(1, 1, 12))
    levels = [torch.randn(1, 16, 96, requires_grad=True) for _ in range(4)]
    loss = head.loss(levels, a4.view(1, 1, -1))
    loss.backward()
    assert loss > 0 and levels[0].grad.abs().sum() > 0 and levels[2].grad is None
    # the KL is 0 for the exact chroma; against the chord progression's mean chroma (what a
    # head that learned nothing predicts, validation's `chroma_kl_prior`) it is well above 0
    chords = torch.from_numpy(chord_progression().astype(np.float32)).view(1, 1, -1)
    p, mask = head.target(chords, frames=64)
    assert head.kl(p, p.log(), mask) < 1e-6
    assert head.kl(p, head.prior([(p, mask)]).expand_as(p), mask) > 0.3


def test_chroma_head_split_by_register_hears_the_bass_line():
    """The unsplit target barely moves when a bass line under a loud upper voice goes a
    semitone down (librosa's octave weighting and the upper voice's power swamp it); the split
    target's bass register follows the bass note exactly, its upper register the upper voice."""
    from training.codec.pitch_head import ChromaHead

    t = np.arange(int(1.152 * SR)) / SR

    def mix(bass_hz):   # C5 loud above a bass note with three partials
        bass = sum(0.1 / k * np.sin(2 * np.pi * k * bass_hz * t) for k in (1, 2, 3))
        return torch.from_numpy((0.4 * np.sin(2 * np.pi * 523.25 * t) + bass)
                                .astype(np.float32)).view(1, 1, -1)

    c2, b1 = mix(65.41), mix(61.74)                             # C2, then B1 a semitone down
    whole = ChromaHead(latent_dim=16, sample_rate=SR, hop=384, pool=8)
    split = ChromaHead(latent_dim=16, sample_rate=SR, hop=384, pool=8, split_hz=254.0)
    (pw_c, mw), (pw_b, _) = whole.target(c2, 12), whole.target(b1, 12)
    (ps_c, ms), (ps_b, _) = split.target(c2, 12), split.target(b1, 12)
    assert ps_c.shape == (1, 2, 12, 12) and ms.shape == (1, 2, 12) and ms.all()
    assert pw_c.shape == (1, 1, 12, 12) and mw.all()
    assert (ps_c[0, 0].argmax(0) == 0).all() and (ps_b[0, 0].argmax(0) == 11).all()  # C, B
    assert (ps_c[0, 1].argmax(0) == 0).all() and (ps_b[0, 1].argmax(0) == 0).all()   # C5 above
    moved_whole = (pw_c - pw_b).abs().sum(dim=2).mean()
    moved_bass = (ps_c[:, 0] - ps_b[:, 0]).abs().sum(dim=1).mean()
    assert moved_bass > 0.8 and moved_whole < 0.1 * moved_bass, (moved_whole, moved_bass)
    log_q = split([torch.randn(1, 16, 96, requires_grad=True) for _ in range(2)])
    assert log_q.shape == (1, 2, 12, 12)
    assert torch.allclose(log_q.exp().sum(dim=2), torch.ones(1, 2, 12))
    assert split.kl(ps_c, ps_c.log(), ms) < 1e-6


def test_spectrum_head_target_sees_the_partial_and_teaches_the_encoder():
    from training.codec.pitch_head import SpectrumHead

    head = SpectrumHead(latent_dim=16, sample_rate=SR, hop=384)
    t = np.arange(int(1.152 * SR)) / SR
    a4 = torch.from_numpy((0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32))
    target = head.target(a4.view(1, 1, -1), frames=96)
    assert target.shape == (1, head.bins, 96) and head.bins == 257   # 0-4 kHz
    assert (target[0, :, 2:-2].argmax(dim=0) == round(440 * 2048 / SR)).all()
    z = torch.randn(1, 16, 96, requires_grad=True)
    loss = head.loss(z, a4.view(1, 1, -1))
    loss.backward()
    assert loss > 0 and z.grad.abs().sum() > 0


# ---------------------------------------------------------------- training
FAST = ["--preset", "debug", "--curriculum", "[[0, 0.384, 2]]", "--val_seconds", "0.384",
        "--val_files", "1", "--num_workers", "0", "--threads", "1", "--progress", "false",
        "--gan", "false", "--model.noise", "false",
        "--decoder", '{kind = "istft", dim = 32, layers = 2}',
        "--loss_weights.amp", "4", "--loss_weights.phase", "1",
        "--loss_weights.consistency", "1", "--loss_weights.chroma", "2",
        "--loss_weights.encoder_spectrum", "1",
        "--loss_weights.l1", "0"]


@pytest.fixture(scope="module")
def chord_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chords")
    x = chord_progression()
    for i in range(3):
        sf.write(d / f"c{i}.wav", np.roll(x, i * 9000)[: int(1.5 * SR)], SR)
    return d


def test_the_istft_codec_trains_resumes_exactly_and_exports(tmp_path, chord_dir, capsys):
    common = FAST + ["--train", str(chord_dir), "--steps", "6", "--log_every", "1",
                     "--val_every", "6", "--ckpt_every", "100", "--resume", "never"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--out_dir", str(straight)]) == 0
    assert main(common + ["--out_dir", str(split), "--steps", "3"]) == 0
    assert main([a for a in common if a not in ("--resume", "never")]
                + ["--out_dir", str(split)]) == 0
    a = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1][1])
    b = load_checkpoint(list_checkpoints(split / "checkpoints")[-1][1])
    for part in ("model", "aux", "aux_spectrum"):          # the training heads are checkpointed too
        assert a["weights"][part].keys() == b["weights"][part].keys()
        for name, tensor in a["weights"][part].items():
            assert torch.equal(tensor, b["weights"][part][name]), (part, name)

    rows = [json.loads(r) for r in (straight / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss/total" in r]
    for term in ("amp", "phase", "consistency", "chroma", "encoder_spectrum", "mel"):
        assert all(math.isfinite(r[f"loss/{term}"]) for r in train), term
    assert train[-1]["loss/total"] < train[0]["loss/total"]
    val = [r for r in rows if "val/mel" in r][-1]
    assert -1 <= val["val/chroma"] <= 1 and math.isfinite(val["val/comb_db"])
    assert val["val/chroma_kl"] >= 0 and val["val/chroma_kl_prior"] > 0

    export = Codec.load(str(straight / "export"))
    assert export.decoder_name == "istft"
    y = export.decode(export.encode(torch.randn(1, 12288) * 0.1))
    assert y.shape == (1, 12288) and torch.isfinite(y).all()

    # A fresh machine warm-starts from the export with the recipe's own command line (its
    # `decoder` table is ignored: the export's decoder is kept).
    warm = tmp_path / "warm"
    assert main(common + ["--out_dir", str(warm), "--init", str(straight / "export"),
                          "--steps", "1", "--val_every", "0"]) == 0
    again = Codec.load(str(warm / "export"))
    assert again.decoder_name == "istft" and again.fingerprint != export.fingerprint
    x = torch.randn(1, 12288) * 0.1
    assert [c.shape for c in again.encode(x)] == [c.shape for c in export.encode(x)]

    # The chroma head split by register (chroma_split_hz): a new head on a warm start, which
    # validation reports by register; a resumed run keeps the head it was built with.
    bass = tmp_path / "bass"
    assert main(common + ["--out_dir", str(bass), "--init", str(straight / "export"),
                          "--steps", "1", "--val_every", "1", "--chroma_split_hz", "254"]) == 0
    val = [json.loads(r) for r in (bass / "log.jsonl").read_text().splitlines()
           if "val/mel" in r][-1]
    assert -1 <= val["val/chroma_upper"] <= 1 and val["val/chroma_kl_prior"] > 0
    with pytest.raises(ValueError, match="chroma_split_hz changed"):
        main([a for a in common if a not in ("--resume", "never")]
             + ["--out_dir", str(split), "--steps", "7", "--chroma_split_hz", "254"])

    # ...but its render options may change: the same weights, Griffin-Lim phase from then on,
    # kept by the checkpoint (a resume) and the export; a shape field still cannot change.
    gl = tmp_path / "gl"
    args = [a for a in common if a != '{kind = "istft", dim = 32, layers = 2}']
    at = args.index("--decoder") + 1
    args.insert(at, '{kind = "istft", dim = 32, layers = 3, phase = "griffin_lim", gl_iters = 4}')
    capsys.readouterr()
    assert main(args + ["--out_dir", str(gl), "--init", str(straight / "export"),
                        "--steps", "1", "--val_every", "0"]) == 0
    assert "decoder.layers ignored" in capsys.readouterr().err
    spec = Codec.load(str(gl / "export")).snac.decoder.cfg
    assert (spec.phase, spec.gl_iters, spec.layers) == ("griffin_lim", 4, 2)
    ck = load_checkpoint(list_checkpoints(gl / "checkpoints")[-1][1])
    assert ck["config"]["model"]["decoder"]["phase"] == "griffin_lim"
    with pytest.raises(ValueError, match="phase must be"):     # checked as at construction
        set_render_options(Codec.load(str(gl / "export")).snac.decoder, {"phase": "minimum"})


def test_a_frequency_decoder_trains_through_the_cli_and_serves_with_a_longer_window(
        tmp_path, chord_dir):
    args = [a if a != '{kind = "istft", dim = 32, layers = 2}' else
            '{kind = "istft", dim = 32, layers = 2, phase = "frequency"}' for a in FAST]
    run = tmp_path / "run"
    assert main(args + ["--train", str(chord_dir), "--steps", "3", "--log_every", "1",
                        "--val_every", "3", "--loss_weights.frequency", "1",
                        "--out_dir", str(run), "--resume", "never"]) == 0
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss/total" in r]
    assert len(train) == 3 and all(0 <= r["loss/frequency"] <= math.pi for r in train)
    assert any("val/chroma" in r for r in rows)
    codec = Codec.load(str(run / "export"))
    assert codec.snac.decoder.cfg.phase == "frequency"
    assert codec.decode_left_pads == 5   # 128 frames + the net's reach + 4, in 32-frame units
    y = codec.decode(codec.encode(torch.randn(1, 12288) * 0.1))
    assert y.shape == (1, 12288) and torch.isfinite(y).all()
    with pytest.raises(SystemExit):
        main(FAST + ["--train", str(chord_dir), "--loss_weights.frequencies", "1"])


def test_encoder_warmup_trains_the_encoder_alone_then_the_codec_resumably(tmp_path, chord_dir):
    """encoder_warmup_steps: the first steps move only the encoder and its spectrum head; the
    codebooks are then initialised from the warmed-up encoder; a run stopped inside the
    warm-up resumes exactly."""
    common = FAST + ["--train", str(chord_dir), "--steps", "4", "--encoder_warmup_steps", "2",
                     "--log_every", "1", "--val_every", "2", "--ckpt_every", "100",
                     "--resume", "never"]
    straight, split, warm_only = tmp_path / "straight", tmp_path / "split", tmp_path / "warm"
    assert main(common + ["--out_dir", str(straight)]) == 0
    assert main(common + ["--out_dir", str(split), "--steps", "1"]) == 0
    assert main([a for a in common if a not in ("--resume", "never")]
                + ["--out_dir", str(split)]) == 0
    a = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1][1])["weights"]
    b = load_checkpoint(list_checkpoints(split / "checkpoints")[-1][1])["weights"]
    for part in ("model", "aux", "aux_spectrum"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)

    # the warm-up moves the encoder only: its two checkpoints differ there and nowhere else
    assert main(common + ["--out_dir", str(warm_only), "--steps", "2", "--ckpt_every", "1"]) == 0
    one, two = (load_checkpoint(p)["weights"]["model"]
                for _, p in list_checkpoints(warm_only / "checkpoints")[-2:])
    moved = {k for k in one if not torch.equal(one[k], two[k])}
    assert moved and all(k.startswith("encoder.") for k in moved)
    rows = [json.loads(r) for r in (warm_only / "log.jsonl").read_text().splitlines()]
    assert [sorted(k for k in r if k.startswith("loss/")) for r in rows if "it_per_s" in r] \
        == [["loss/encoder_spectrum", "loss/total"]] * 2
    assert any("val/encoder_spectrum" in r and "val/mel" not in r for r in rows)
    # after the warm-up the codec trains whole: every loss term, codebooks from the data
    rows = [json.loads(r) for r in (straight / "log.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss/mel" in r]
    assert [r["step"] for r in last] == [3, 4] and "loss/encoder_spectrum" in last[-1]
    assert any("val/mel" in r and "val/encoder_spectrum" in r for r in rows)
    codebook = "quantizer.quantizers.0.codebook.weight"
    assert not torch.equal(two[codebook], a["model"][codebook])
    record = json.loads((straight / "config.json").read_text())["train"]   # the card says so
    assert "first 2 steps trained the encoder" in warmup_text(record)
    assert "instantaneous frequency" in warmup_text({"decoder": {"phase": "frequency"}})
    split = {"loss_weights": {"chroma": 20.0}, "chroma_split_hz": 254.0}
    assert "bass register's chroma (30 to 254 Hz" in warmup_text(split)
    assert "bass register" not in warmup_text(dict(split, chroma_split_hz=0.0))
    bass = {"loss_weights": {"frequency_bass": 40.0}}
    assert "bins below 254.2 Hz alone" in warmup_text(bass)
    assert "bins below 520 Hz alone (`frequency_bass`, top `frequency_bass_hz`)" in warmup_text(
        dict(bass, frequency_bass_hz=520.0))
    assert "frequency term is also" not in warmup_text({"loss_weights": {}})
    assert origin_text({"init": "weights/next/codec"}).startswith("Warm-started from")
    assert origin_text({"init": ""}) == "From scratch"
    assert "8192 STFT" in bass_text({"bass_n_fft": 8192, "bass_min_hz": 30.0,
                                     "bass_max_hz": 520.0}) and bass_text({}) == ""
    assert "Griffin-Lim" in warmup_text({"decoder": {"phase": "griffin_lim"}})


def test_eval_and_card_of_a_pitch_codec(tmp_path, chord_dir):
    """bench/eval_codec.py on a folder of audio (--audio) with every reference row, and the
    card that reads it: the decoder named, the pitch table beside its floor and ceiling."""
    import importlib.util

    from training.codec.card import main as card_main

    run = tmp_path / "run"
    assert main(FAST + ["--train", str(chord_dir), "--steps", "2", "--val_every", "2",
                        "--out_dir", str(run), "--resume", "never"]) == 0
    spec = importlib.util.spec_from_file_location(
        "eval_codec", Path(__file__).resolve().parents[1] / "bench" / "eval_codec.py")
    eval_codec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_codec)
    out = tmp_path / "eval.json"
    assert eval_codec.main(["--codec", str(run / "export"), "--audio", str(chord_dir),
                            "--seconds", "1.152", "--segments", "1", "--repeats", "1",
                            "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["segments"] == 3 and result["decoder"] == "istft"
    assert result["segment_seconds"] == pytest.approx(1.152)
    table = result["table"]
    assert table["original"]["chroma"] == pytest.approx(1.0)
    assert table["original"]["frame_f1"] == 1.0
    # two steps of training keep no notes: the codec sits with the noise floor, far under
    # Griffin-Lim of the true magnitudes
    assert table["codec"]["chroma"] < table["griffin_lim"]["chroma"] - 0.3

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.jsonl").write_text(json.dumps(
        {"status": "kept", "output_path": "audio/c0.wav", "package": "synthetic",
         "licence": "CC0-1.0"}) + "\n")
    (corpus / "summary.json").write_text(json.dumps({"total_hours": 0.01, "kept": 1, "packages": {
        "synthetic": {"kept": 1, "hours": 0.01, "licences": {"CC0-1.0": 1}}}}))
    assert card_main(["--run", str(run), "--codec", str(run / "export"), "--eval", str(out),
                      "--eval-independent", str(out), "--corpus", str(corpus)]) == 0
    text = (run / "export" / "MODEL_CARD.md").read_text()
    assert "Decoder: **istft**" in text and "untrained placeholder" in text
    assert "chroma correlation ≥ 0.75: **not met**" in text
    assert "envelope-shaped noise (floor)" in text and "Griffin-Lim" in text
    assert "Pitch on independent music" in text
    assert "bin comb dB" in text and "bin_comb_db" in table["codec"]   # an inverse-STFT decoder
    assert "chroma C1-B3" in text and "chroma_upper" in table["codec"]
    assert "chroma head KL / prior" in text
    assert "training/configs/codec_pitch.toml" not in text      # a debug run names its config


def test_a_still_decoder_does_not_buzz_at_the_frame_rate():
    """Latents that do not change from frame to frame: with each bin's phase advance built in,
    the output is a steady tone mix; predicting absolute phase, it is a pulse train at the
    frame rate (the buzz of the first demo decoder)."""
    torch.manual_seed(0)
    z = torch.randn(1, 16, 1).expand(1, 16, 250).contiguous()
    combs, outputs = {}, {}
    for advance in (True, False):
        torch.manual_seed(0)
        d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1,
                                            phase_advance=advance))
        with torch.no_grad():
            y = d(z)[0, 0, 384 * 8: -384 * 8].numpy()
        combs[advance], outputs[advance] = pitch.frame_rate_comb(y, SR, FRAME_RATE), y
    assert combs[False] > 20 and abs(combs[True]) < 3
    # the advance repeats every 4 frames: a window starting on the 32-frame grid sees the
    # same phases as the whole sequence
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1))
    assert torch.allclose(d.advance(64)[:, 32:].cos(), d.advance(32).cos(), atol=1e-5)
    # ...but that tone mix is a drone of bin-centre tones (every sr / n_fft = 20.8 Hz), which
    # the bin comb sees and the frame-rate comb does not; real notes show neither
    drone = pitch.frame_rate_comb(outputs[True], SR, SR / 1536, 96)
    notes = pitch.frame_rate_comb(chord_progression(), SR, SR / 1536, 96)
    assert drone > 10 and abs(notes) < 3, (drone, notes)


@pytest.mark.parametrize("phase", ["learned", "frequency"])
def test_the_server_decodes_a_dits_codes_with_the_istft_decoder(tmp_path, debug_codec, phase):
    """A DiT trained on some codes is served by a codec with the same codes and the inverse-
    STFT decoder: the codes match, /info names the decoder and how it makes its phase,
    /continue answers a chunk (a frequency decoder's longer decode window included)."""
    import io

    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings
    from tests.test_server_entry import _dit_trained_on, _wav

    spec = dict(ISTFT_DEBUG, decoder=dict(ISTFT_DEBUG["decoder"], phase=phase))
    istft = Codec.load(spec, seed=0)                 # same seed: the debug codec's encoder
    assert istft.codes_fingerprint == debug_codec.codes_fingerprint
    codec_dir = str(istft.save(tmp_path / "istft"))
    weights = _dit_trained_on(tmp_path, "dit", {"fingerprint": debug_codec.fingerprint,
                                                 "codes_fingerprint": debug_codec.codes_fingerprint})
    with TestClient(create_app(Settings(weights=weights, codec=codec_dir, device="cpu",
                                        warmup=False))) as c:
        info = c.get("/info").json()["codec"]
        assert info["decoder"] == "istft" and info["codes_match"] is True
        assert info["decoder_phase"] == phase
        r = c.post("/continue?steps=1", files={"audio": ("a.wav", _wav(7.0), "audio/wav")})
        assert r.status_code == 200, r.text
    audio, sr = sf.read(io.BytesIO(r.content))
    assert sr == SR and len(audio) == 196_608 and np.abs(audio).max() > 0


def test_codes_pitch_probe_runs_through_its_entry_point(tmp_path, chord_dir, debug_codec_dir):
    """bench/codes_pitch_probe.py on a codec: its controls must see pitch (or it is blind),
    and the music probe reads the encoder's continuous output beside the codes."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "codes_pitch_probe.py"
    spec = importlib.util.spec_from_file_location("codes_pitch_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "probe.json"
    assert probe.main(["--codec", debug_codec_dir, "--corpus", str(chord_dir), "--val-files",
                       "1", "--per-track", "1", "--phase-sets", "3", "--threads", "1",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    control = result["synthetic"]["features"]["logmel128 (control)"]
    assert control["pitch_class_linear"] > 0.9
    probes = result["music"]["probes"]
    assert set(probes) == {"sum", "encoder", "env16", "mel128", "bass8192"}
    assert all(math.isfinite(p["chroma_r2"]) for p in probes.values())


def test_decoder_ceiling_runs_through_its_entry_point(tmp_path, chord_dir):
    """bench/decoder_ceiling.py: the real magnitudes with Griffin-Lim keep the chord (the
    probe's ceiling sees pitch), an untrained decoder's own decode does not."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "decoder_ceiling.py"
    spec = importlib.util.spec_from_file_location("decoder_ceiling", path)
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)
    codec_dir = tmp_path / "codec"
    Codec.load(dict(ISTFT_DEBUG, decoder=dict(ISTFT_DEBUG["decoder"], phase="frequency")),
               seed=1).save(codec_dir)
    out = tmp_path / "ceiling.json"
    assert ceiling.main(["--codec", str(codec_dir), "--audio", str(chord_dir), "--segments", "1",
                         "--gl-iters", "32", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    chroma = result["chroma"]
    assert set(chroma) == {"true_mag_gl32", "pred_mag_gl32", "pred_mag_true_phase",
                           "pred_mag_true_frequency", "codec"}
    assert chroma["true_mag_gl32"] > 0.8 and chroma["codec"] < chroma["true_mag_gl32"] - 0.3
    assert set(result["chroma_bass"]) == set(result["chroma_upper"]) == set(chroma)  # registers
    assert result["chroma_upper"]["true_mag_gl32"] > result["chroma_upper"]["codec"]
    Codec.load(DEBUG_CODEC_CONFIG, seed=1).save(tmp_path / "snac")      # SNAC's own decoder
    with pytest.raises(SystemExit, match="inverse-STFT"):
        ceiling.main(["--codec", str(tmp_path / "snac"), "--audio", str(chord_dir)])


def test_the_bass_frequency_terms_top_is_configurable():
    """A middle-register note (E4, 329.6 Hz) played a semitone flat: under the default top
    (254 Hz) the bass term does not see it; with the top raised to 520 Hz it does. A top out
    of range is refused before training starts."""
    d = ISTFTDecoder(ISTFTDecoderConfig(latent_dim=16, dim=16, layers=1, phase="frequency"))
    t = np.arange(int(1.152 * SR)) / SR
    x = torch.from_numpy((0.3 * np.sin(2 * np.pi * 329.63 * t) + 0.2 * np.sin(2 * np.pi * 110.0 * t))
                         .astype(np.float32)).view(1, 1, -1)
    log_mag = d.analysis(x).abs().clamp(min=1e-5).log()
    f = torch.arange(d.n_bins).float() * SR / d.cfg.n_fft

    def bass_term(mid_hz: float, top: float) -> float:
        hz = torch.where(f < 220.0, 110.0, mid_hz)
        omega = (2 * math.pi * hz / SR)[None, :, None].expand(1, -1, log_mag.shape[-1])
        return float(spectral_decoder_losses(d, log_mag, omega.contiguous(), x,
                                             bass_top_hz=top)["frequency_bass"])

    assert abs(bass_term(311.13, 254.2) - bass_term(329.63, 254.2)) < 0.02
    assert bass_term(311.13, 520.0) > bass_term(329.63, 520.0) + 0.1
    with pytest.raises(ValueError, match="frequency_bass_hz"):
        CodecTrainConfig(frequency_bass_hz=5000.0).validate()
