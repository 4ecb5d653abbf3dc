"""A spectral front end for SNAC's quantiser: a fixed log-magnitude STFT, then ConvNeXt blocks
at the hop rate, in place of SNAC's waveform encoder.

Why: SNAC's encoder learns its own filterbank from the waveform through strided depthwise
convolutions. On this project's CPU budget the demo's and the pitch recipe's encoders never got
there: after ~1,000 steps a linear map read *less* of the fine 0-4 kHz spectrum from their
output than from a 16-band loudness envelope (docs/codec-training.md §8), so their codes could
not carry notes whatever the decoder did. Here the partials are in the input from step 0: bins
below `linear_max_hz` are kept one by one (15.6 Hz apart at n_fft 2048, so harmonics of notes
from ~60 Hz up are resolved), and the rest of the spectrum is pooled into `high_bands` bands
evenly spaced on the mel scale (brightness, noise, transients). The learned part only has to
choose what the quantiser keeps, at the frame rate, which is also ~5x cheaper a step than
convolutions at the sample rate.

    audio (B, 1, T) -> |STFT| ("same" framing: T / hop frames) -> log(bins + bands)
      -> Conv1d(k7) -> LayerNorm -> N x ConvNeXt block -> LayerNorm -> Linear -> (B, D, T / hop)

Framing is the inverse-STFT decoder's (model/vocoder.py): frame t's window is centred on hop
block t, zero-padded at the ends, so T samples give exactly T / hop frames, as SNAC's encoder
does for the same input. Configured by a plain dict (`ENCODER_KINDS`), stored as encoder.json
beside the SNAC files (model/weights.py), which then hold a placeholder SNAC encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.vocoder import ConvNeXtBlock, build_part, part_spec


@dataclass
class SpectralEncoderConfig:
    latent_dim: int = 384          # the quantiser's input width (SNAC: encoder_dim x 2^rates)
    hop: int = 384                 # one latent frame per hop (SNAC: prod(encoder_rates))
    sample_rate: int = 32000
    n_fft: int = 2048              # 15.6 Hz bins, a 64 ms window
    linear_max_hz: float = 3000.0  # bins below this are features one by one
    high_bands: int = 32           # mel-spaced triangular bands from there to Nyquist
    # A second, longer STFT for the bass (0 = none): its bins from bass_min_hz to bass_max_hz
    # one by one (3.9 Hz apart at 8192, a 0.256 s window). At n_fft 2048 a semitone below
    # ~250 Hz is under a bin, and a linear probe read the bass register's chroma from the
    # trained encoder's output at 0.23, from such an STFT at 0.61 (docs/codec-training.md §10).
    bass_n_fft: int = 0
    bass_min_hz: float = 30.0
    bass_max_hz: float = 520.0
    floor: float = 1e-3            # log(|X| + floor): ~-110 dB re a full-scale sine's peak
    dim: int = 384
    layers: int = 4
    mult: int = 3
    kernel: int = 7

    def __post_init__(self):
        if self.n_fft < self.hop or (self.n_fft - self.hop) % 2:
            raise ValueError("n_fft must be >= hop and n_fft - hop even ('same' framing)")
        if not 0 < self.linear_max_hz < self.sample_rate / 2:
            raise ValueError(f"linear_max_hz must lie in (0, {self.sample_rate / 2}) Hz")
        if self.bass_n_fft and (self.bass_n_fft < self.hop or (self.bass_n_fft - self.hop) % 2):
            raise ValueError("bass_n_fft must be 0, or >= hop with bass_n_fft - hop even")
        if self.bass_n_fft and not 0 <= self.bass_min_hz < self.bass_max_hz < self.sample_rate / 2:
            raise ValueError("need 0 <= bass_min_hz < bass_max_hz < Nyquist")

    @property
    def kind(self) -> str:
        return "stft"

    @property
    def n_linear(self) -> int:
        return int(self.linear_max_hz * self.n_fft / self.sample_rate)

    @property
    def bass_bins(self) -> tuple[int, int]:
        """[first, last) bins of the bass STFT that are features (empty without one)."""
        if not self.bass_n_fft:
            return 0, 0
        per_hz = self.bass_n_fft / self.sample_rate
        return int(self.bass_min_hz * per_hz), int(self.bass_max_hz * per_hz) + 1

    @property
    def n_features(self) -> int:
        lo, hi = self.bass_bins
        return self.n_linear + self.high_bands + hi - lo


def _mel(hz):
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def high_band_filters(cfg: SpectralEncoderConfig) -> torch.Tensor:
    """(high_bands, n_fft/2 + 1) triangular filters, mel-spaced from bin `n_linear` to Nyquist,
    each normalised to unit sum (a band is its bins' mean magnitude)."""
    n_bins = cfg.n_fft // 2 + 1
    freqs = torch.arange(n_bins, dtype=torch.float64) * cfg.sample_rate / cfg.n_fft
    lo = torch.tensor(cfg.n_linear * cfg.sample_rate / cfg.n_fft, dtype=torch.float64)
    edges_mel = torch.linspace(float(_mel(lo)), float(_mel(torch.tensor(cfg.sample_rate / 2.0))),
                               cfg.high_bands + 2, dtype=torch.float64)
    edges = 700.0 * (10 ** (edges_mel / 2595.0) - 1.0)
    m = _mel(freqs)[None, :]
    left, centre, right = (edges_mel[:-2, None], edges_mel[1:-1, None], edges_mel[2:, None])
    tri = torch.clamp(torch.minimum((m - left) / (centre - left), (right - m) / (right - centre)),
                      min=0.0)
    # a band narrower than a bin still takes its nearest bin
    empty = tri.sum(dim=1) == 0
    if empty.any():
        nearest = (freqs[None, :] - edges[1:-1, None]).abs().argmin(dim=1)
        tri[empty, nearest[empty]] = 1.0
    return (tri / tri.sum(dim=1, keepdim=True)).float()


class SpectralEncoder(nn.Module):
    def __init__(self, cfg: SpectralEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("bass_window", torch.hann_window(cfg.bass_n_fft or 1),
                             persistent=False)
        self.register_buffer("bands", high_band_filters(cfg), persistent=False)
        self.embed = nn.Conv1d(cfg.n_features, cfg.dim, cfg.kernel, padding=cfg.kernel // 2)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(cfg.dim, cfg.mult, cfg.kernel,
                                                  1.0 / max(cfg.layers, 1))
                                    for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.out = nn.Linear(cfg.dim, cfg.latent_dim)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) -> (B, n_features, T / hop) log magnitudes, fp32."""
        cfg = self.cfg
        if audio.shape[-1] % cfg.hop:
            raise ValueError(f"audio length {audio.shape[-1]} is not a multiple of hop {cfg.hop}")
        mag = self._magnitude(audio, cfg.n_fft, self.window)             # (B, F, frames)
        high = torch.einsum("nf,bft->bnt", self.bands, mag)
        parts = [mag[:, : cfg.n_linear], high]
        if cfg.bass_n_fft:
            lo, hi = cfg.bass_bins
            parts.append(self._magnitude(audio, cfg.bass_n_fft, self.bass_window)[:, lo:hi])
        return torch.log(torch.cat(parts, dim=1) + cfg.floor)

    def _magnitude(self, audio: torch.Tensor, n_fft: int, window: torch.Tensor) -> torch.Tensor:
        """|STFT| in the "same" framing: frame t's window centred on hop block t."""
        pad = (n_fft - self.cfg.hop) // 2
        x = F.pad(audio.reshape(audio.shape[0], -1).float(), (pad, pad))
        return torch.stft(x, n_fft, self.cfg.hop, window=window, center=False,
                          return_complex=True).abs()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(self.features(audio).to(self.embed.weight.dtype))
                      .transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        return self.out(self.final_norm(h.transpose(1, 2))).transpose(1, 2)


ENCODER_KINDS = {"stft": (SpectralEncoderConfig, SpectralEncoder)}


def build_encoder(spec: dict) -> nn.Module:
    """An encoder from its encoder.json dict ({"kind": "stft", ...fields})."""
    return build_part(spec, ENCODER_KINDS, "encoder")


encoder_spec = part_spec
