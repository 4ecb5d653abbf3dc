"""Codec losses and metrics: named terms, each a distance that is exactly 0 for identical signals.

- multi-scale mel (DAC): L1 of log10 mel magnitudes at 7 window sizes, summed over scales;
- multi-resolution STFT (Parallel WaveGAN): spectral convergence + L1 log magnitude;
- L1 waveform;
- least-squares GAN terms and feature matching (HiFi-GAN / DAC);
- SI-SDR, a validation metric (dB, higher is better).

Spectra are always computed in fp32: under bf16 autocast the STFT of a quiet signal loses the
low bits that the log-magnitude terms care about.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.codec.pitch import BASS_TOP_HZ


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    # Slaney's scale (librosa's default, which DAC uses): linear below 1 kHz, log above.
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    logstep = math.log(6.4) / 27.0
    lin = f / f_sp
    log = min_log_hz / f_sp + torch.log(f.clamp(min=min_log_hz) / min_log_hz) / logstep
    return torch.where(f >= min_log_hz, log, lin)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)),
                       f_sp * m)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, Slaney area-normalised (= librosa.filters.mel)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_pts = torch.linspace(_hz_to_mel(torch.tensor(fmin, dtype=torch.float64)).item(),
                             _hz_to_mel(torch.tensor(fmax, dtype=torch.float64)).item(),
                             n_mels + 2, dtype=torch.float64)
    hz = _mel_to_hz(mel_pts)
    fdiff = hz.diff()
    ramps = hz[:, None] - fft_freqs[None, :]                    # (n_mels + 2, F)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0)
    weights *= (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return weights.float()


def stft_magnitude(x: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """x (B, 1, T) or (B, T) -> |STFT| (B, F, frames), fp32."""
    x = x.reshape(-1, x.shape[-1]).float()
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=window.numel(), window=window,
                      center=True, pad_mode="reflect", return_complex=True)
    return spec.abs()


class MelLoss(nn.Module):
    """DAC's MelSpectrogramLoss: sum over scales of L1(log10(mel clamped at 1e-5))."""

    def __init__(self, sample_rate: int, windows=(32, 64, 128, 256, 512, 1024, 2048),
                 n_mels=(5, 10, 20, 40, 80, 160, 320), clamp_eps: float = 1e-5):
        super().__init__()
        self.windows, self.clamp_eps = list(windows), clamp_eps
        for w, m in zip(windows, n_mels, strict=True):
            self.register_buffer(f"fb_{w}", mel_filterbank(sample_rate, w, m), persistent=False)
            self.register_buffer(f"win_{w}", torch.hann_window(w), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros((), dtype=torch.float32)
        for w in self.windows:
            fb, win = getattr(self, f"fb_{w}"), getattr(self, f"win_{w}")
            mx = fb @ stft_magnitude(x, w, w // 4, win)           # (B, n_mels, frames)
            my = fb @ stft_magnitude(y, w, w // 4, win)
            loss = loss + F.l1_loss(mx.clamp(min=self.clamp_eps).log10(),
                                    my.clamp(min=self.clamp_eps).log10())
        return loss


class MultiResolutionSTFTLoss(nn.Module):
    """Mean over resolutions of spectral convergence + L1 log magnitude (hop = n_fft / 4)."""

    def __init__(self, n_ffts=(1024, 2048, 4096), eps: float = 1e-7):
        super().__init__()
        self.n_ffts, self.eps = list(n_ffts), eps
        for n in n_ffts:
            self.register_buffer(f"win_{n}", torch.hann_window(n), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros((), dtype=torch.float32)
        for n in self.n_ffts:
            win = getattr(self, f"win_{n}")
            mx = stft_magnitude(x, n, n // 4, win).clamp(min=self.eps)
            my = stft_magnitude(y, n, n // 4, win).clamp(min=self.eps)
            sc = torch.linalg.norm(my - mx) / torch.linalg.norm(my).clamp(min=self.eps)
            loss = loss + sc + F.l1_loss(mx.log(), my.log())
        return loss / len(self.n_ffts)


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB per item: (B, ..., T) -> (B,). Higher is better."""
    est = estimate.reshape(estimate.shape[0], -1).double()
    ref = reference.reshape(reference.shape[0], -1).double()
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * ref
    noise = est - target
    ratio = (target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps)
    return (10 * torch.log10(ratio)).float()


# ---------------------------------------------------------------- GAN terms
# A discriminator output is a list (one per sub-discriminator) of feature-map lists whose last
# entry is the logit map.


def discriminator_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Least-squares GAN: real -> 1, fake -> 0, summed over sub-discriminators."""
    loss = 0.0
    for r, f in zip(real, fake, strict=True):
        loss = loss + (1 - r[-1].float()).pow(2).mean() + f[-1].float().pow(2).mean()
    return loss


def generator_adv_loss(fake: list[list[torch.Tensor]]) -> torch.Tensor:
    return sum((1 - f[-1].float()).pow(2).mean() for f in fake)


def feature_matching_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between the discriminator's hidden features of real and generated audio (real detached)."""
    loss = 0.0
    for r, f in zip(real, fake, strict=True):
        for fr, ff in zip(r[:-1], f[:-1], strict=True):
            loss = loss + F.l1_loss(ff.float(), fr.detach().float())
    return loss


class ReconstructionLosses(nn.Module):
    """The non-adversarial terms as a dict: {'mel', 'stft', 'l1'}."""

    def __init__(self, sample_rate: int, mel_windows, mel_bins, stft_ffts):
        super().__init__()
        self.mel = MelLoss(sample_rate, mel_windows, mel_bins)
        self.stft = MultiResolutionSTFTLoss(stft_ffts)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x, y = x.float(), y.float()
        return {"mel": self.mel(x, y), "stft": self.stft(x, y), "l1": F.l1_loss(x, y)}


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Sum of weight * term over the terms present (a term without a weight counts 0)."""
    total = next(iter(losses.values())).new_zeros((), dtype=torch.float32)
    for k, v in losses.items():
        if weights.get(k, 0.0):
            total = total + weights[k] * v
    return total


# ---------------------------------------------------------------- spectral decoders
def anti_wrap(x: torch.Tensor) -> torch.Tensor:
    """|x| after wrapping into [-pi, pi]: the distance between two phases (APNet)."""
    return (x - 2 * math.pi * torch.round(x / (2 * math.pi))).abs()


def chroma_filterbank(n_fft: int, sample_rate: int, n_bins: int, lo_hz: float = 250.0,
                      hi_hz: float = 4000.0) -> torch.Tensor:
    """(12, n_bins): each bin's share of each pitch class, a raised cosine of its distance in
    semitones to the class (circular, half-width one semitone), bins outside [lo_hz, hi_hz]
    zero."""
    f = torch.arange(n_bins, dtype=torch.float64) * sample_rate / n_fft
    keep = (f >= lo_hz) & (f <= hi_hz)
    pitch = 12 * torch.log2(f.clamp(min=1.0) / 440.0) + 69          # MIDI number
    d = (pitch[None, :] - torch.arange(12, dtype=torch.float64)[:, None]) % 12
    d = torch.minimum(d, 12 - d)                                     # circular distance
    w = torch.where(d < 1, 0.5 + 0.5 * torch.cos(torch.pi * d), torch.zeros_like(d))
    return (w * keep[None, :]).float()


def centred_chroma_cos(fb: torch.Tensor, pred_mag: torch.Tensor, true_mag: torch.Tensor,
                       eps: float = 1e-8) -> torch.Tensor:
    """Loudness-weighted mean over frames of the cosine between the two spectra's chroma
    vectors, each centred over the 12 classes (a flat frame scores 0, as the metric's does)."""
    cp = torch.einsum("cf,bft->btc", fb, pred_mag)
    ct = torch.einsum("cf,bft->btc", fb, true_mag)
    cp, ct = cp - cp.mean(-1, keepdim=True), ct - ct.mean(-1, keepdim=True)
    cos = (cp * ct).sum(-1) / (cp.norm(dim=-1) * ct.norm(dim=-1)).clamp(min=eps)
    w = true_mag.square().sum(1).detach()                            # (B, T) frame energy
    return (cos * w).sum() / w.sum().clamp(min=eps)


def spectral_decoder_losses(decoder: nn.Module, log_mag: torch.Tensor, phase: torch.Tensor,
                            audio: torch.Tensor,
                            sample_rate: int = 32000,
                            bass_top_hz: float = BASS_TOP_HZ) -> dict[str, torch.Tensor]:
    """Terms on a spectral decoder's own frames (model/vocoder.py), against the STFT of the
    real audio in the same framing (APNet's recipe, phase terms weighted by magnitude):

    - amp: MSE of log magnitudes. Every bin counts alike, so the many bins of the noise floor
      (whose log magnitude scatters by ~0.6 nats whatever their level) outweigh the few that
      hold partials: a smooth spectrum under the right envelope scores nearly as well;
    - partials: MSE of square-root magnitudes, relative to the real spectrum's energy: weighted
      toward the strong bins, so a partial smeared or in the wrong bin costs more than a
      scattered noise floor (spectral convergence, |X|^1, ignores quieter partials; |X|^0.3
      ranks the two alike);
    - output_chroma: 1 - the centred chroma correlation of the predicted and the real
      magnitudes (bins from 250 Hz, where 20.8 Hz bins are narrower than a semitone, to 4 kHz;
      frames weighted by the real loudness): what the pitch judge measures, on the decoder's
      own frames, so that a wrong pitch class costs whatever the envelope does;
    - phase: anti-wrapped distances of the instantaneous phase, the group delay (phase
      difference across frequency) and the instantaneous frequency (phase difference across
      frames), each averaged with the real magnitude as weight: the phase of a partial is
      learnable (its frequency is the pitch), the phase of a silent bin is noise;
    - consistency: how far the predicted spectrum is from the STFT of the audio it synthesises
      (an overlap-add cannot realise every spectrum), relative to the real spectrum's energy;
    - frequency (a decoder with phase = "frequency", whose second output is each bin's
      instantaneous frequency): the anti-wrapped distance between the hop's phase advance at
      the predicted and at the real instantaneous frequency, weighted by the real magnitude (the
      real one is read from the phase difference of consecutive frames, so it is only known
      modulo 2 pi / hop; its `phase` is then the integrated one);
    - frequency_bass: the same, over the bins below `bass_top_hz` only (their own
      magnitude-weighted mean). There a 20.8 Hz bin holds several semitones, so the bass note
      is the frequency the head plays, and a semitone off costs only ~0.3 rad of advance a hop:
      within the whole term it is drowned by the upper bins' larger errors.
    """
    target = decoder.analysis(audio)                       # (B, F, T) complex
    frames = min(target.shape[-1], log_mag.shape[-1])
    target, log_mag, phase = target[..., :frames], log_mag[..., :frames], phase[..., :frames]
    mag = target.abs()
    t_phase = target.angle()
    weight = (mag / mag.sum(dim=(1, 2), keepdim=True).clamp(min=1e-8)).detach()

    def weighted(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (d * w).sum(dim=(1, 2)).div(w.sum(dim=(1, 2)).clamp(min=1e-8)).mean()

    extra = {}
    if getattr(decoder.cfg, "phase", None) == "frequency":
        omega, hop = phase, decoder.cfg.hop
        # real advance from frame t-1 to t, against the predicted mean frequency of the two
        advance = hop * 0.5 * (omega[..., 1:] + omega[..., :-1])
        error = anti_wrap(advance - t_phase.diff(dim=2))
        extra["frequency"] = weighted(error, weight[..., 1:])
        bass = int(bass_top_hz * decoder.cfg.n_fft / sample_rate) + 1   # bins 0..bass-1
        extra["frequency_bass"] = weighted(error[:, :bass], weight[:, :bass, 1:])
        phase = decoder.integrate(omega)

    ip = weighted(anti_wrap(phase - t_phase), weight)
    gd = weighted(anti_wrap(phase.diff(dim=1) - t_phase.diff(dim=1)), weight[:, 1:])
    iaf = weighted(anti_wrap(phase.diff(dim=2) - t_phase.diff(dim=2)), weight[..., 1:])
    predicted = torch.polar(log_mag.exp(), phase)
    resynth = decoder.analysis(decoder.synthesize(log_mag, phase))[..., :frames]
    consistency = (predicted - resynth).abs().square().mean() / \
        mag.square().mean().clamp(min=1e-8)
    pred_c, true_c = log_mag.mul(0.5).exp(), mag.clamp(min=1e-5).sqrt()
    partials = ((pred_c - true_c).square().sum(dim=(1, 2))
                / true_c.square().sum(dim=(1, 2)).clamp(min=1e-8)).mean()
    fb = chroma_filterbank(decoder.cfg.n_fft, sample_rate, log_mag.shape[1]).to(mag)
    return {"amp": F.mse_loss(log_mag, mag.clamp(min=1e-5).log()),
            "partials": partials,
            "output_chroma": 1.0 - centred_chroma_cos(fb, log_mag.exp(), mag),
            "phase": ip + gd + iaf,
            "consistency": consistency, **extra}
