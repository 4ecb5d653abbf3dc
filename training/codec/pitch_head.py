"""Distilling pitch into the coarse codes: a small head that predicts each coarse frame's
chroma (the 12 pitch classes' share of the energy) from the quantised latents of levels A and B
only, trained with the codec. Its gradient flows through the straight-through estimator into
the encoder and those levels' codebooks, so A and B are pushed to carry melody and harmony —
what the DiT's first stage models — as Mimi distils a semantic model into its first codebook.
The head itself is not exported: only the codes it shaped are.

Target: the power spectrum (n_fft 4096: 7.8 Hz bins at 32 kHz) folded onto the 12 pitch
classes by librosa's chroma filterbank, pooled to the coarsest level's frames and normalised
to a distribution; frames 40 dB under the batch's loudest are left out. Loss: KL(target ||
predicted), 0 when the head reproduces the chroma exactly.

Split by register (`split_hz`, the recipe's `chroma_split_hz`): that one chroma is dominated by
the loud partials above middle C (librosa's filterbank also weights octaves around C5 most), so
a bass line a semitone off barely moves it, and the codes never had to carry bass pitch
(measured: C1-B3 chroma 0.13 from the quantised latents, 0.61 from a fine STFT; §10 of
docs/codec-training.md). Split, the head predicts two chromas: the bass register's, from
30 Hz to `split_hz` out of an n_fft 8192 spectrum (3.9 Hz bins, which tell bass semitones
apart) with every octave weighted alike, and the rest's as before; each with its own loudness
mask, the loss the mean of the two KLs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_FFT = 4096
BASS_N_FFT = 8192
BASS_LO_HZ = 30.0
FLOOR_DB = 40.0


def standardise(z: torch.Tensor) -> torch.Tensor:
    """(B, C, T) -> each channel at zero mean and unit variance over the batch and time. The
    encoder's output carries per-channel offsets several times its variation (measured: median
    |mean| 500, std 127), which a per-example norm keeps and a small head then learns around."""
    z = z.float()
    return (z - z.mean(dim=(0, 2), keepdim=True)) / (z.std(dim=(0, 2), keepdim=True) + 1e-5)


class ChromaHead(nn.Module):
    def __init__(self, latent_dim: int, sample_rate: int, hop: int, pool: int,
                 levels: int = 2, hidden: int = 128, split_hz: float = 0.0):
        super().__init__()
        try:
            import librosa
        except ImportError as e:
            raise ImportError("the chroma head's target needs librosa (the eval extra: "
                              "pip install -e '.[eval]')") from e
        self.hop, self.pool, self.levels = hop, pool, levels
        # One (n_fft, lowest Hz, highest Hz, octave weighting) per register; a filterbank row is
        # a bin's share of a class. The bass register weights every octave alike (octwidth None).
        bands = ([(N_FFT, 0.0, np.inf, 2.0)] if not split_hz else           # 2: librosa's own
                 [(BASS_N_FFT, BASS_LO_HZ, split_hz, None), (N_FFT, split_hz, np.inf, 2.0)])
        self.n_ffts = [n_fft for n_fft, *_ in bands]
        for r, (n_fft, lo, hi, octwidth) in enumerate(bands):
            f = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
            fb = librosa.filters.chroma(sr=sample_rate, n_fft=n_fft, norm=None, octwidth=octwidth)
            fb = fb * ((f >= lo) & (f < hi))
            self.register_buffer(f"filters{r}", torch.from_numpy(fb).float(), persistent=False)
            self.register_buffer(f"window{r}", torch.hann_window(n_fft), persistent=False)
        self.registers = len(self.n_ffts)
        self.net = nn.Sequential(nn.Conv1d(latent_dim, hidden, 3, padding=1), nn.GELU(),
                                 nn.Conv1d(hidden, 12 * self.registers, 1))

    @torch.no_grad()
    def target(self, audio: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, T) -> chroma distributions (B, R, 12, frames) and loudness masks (B, R, frames),
        R the number of registers (1, or 2 when split: the bass first)."""
        x = audio.reshape(audio.shape[0], -1).float()
        dists, masks = [], []
        for r, n_fft in enumerate(self.n_ffts):
            window = getattr(self, f"window{r}")
            power = torch.stft(x, n_fft, self.hop, window=window, center=True,
                               return_complex=True).abs().square()        # (B, F, T/hop + 1)
            chroma = getattr(self, f"filters{r}") @ power                  # (B, 12, frames')
            n = frames * self.pool
            chroma = F.pad(chroma, (0, max(0, n - chroma.shape[-1])))[..., :n]
            chroma = F.avg_pool1d(chroma, self.pool)                       # (B, 12, frames)
            energy = chroma.sum(dim=1)
            db = 10 * torch.log10(energy.clamp(min=1e-10))
            masks.append(db > db.max() - FLOOR_DB)
            dists.append(chroma / energy.clamp(min=1e-10).unsqueeze(1))
        return torch.stack(dists, 1), torch.stack(masks, 1)

    def forward(self, level_z_q: list[torch.Tensor]) -> torch.Tensor:
        """Per-level (B, D, T) shares of the decoder input -> (B, R, 12, T / pool) log-probs."""
        coarse = F.avg_pool1d(sum(level_z_q[: self.levels]), self.pool)
        # Standardised: the codes' gains are learned from the decoder, and a head fed their raw
        # scale turned their growth into runaway logits (measured: KL 0.25 -> 20 over 60 steps,
        # dragging the encoder with it).
        logits = self.net(standardise(coarse))
        return F.log_softmax(logits.unflatten(1, (self.registers, 12)), dim=2)

    @staticmethod
    def kl(p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """KL(p || q) averaged over each register's loud frames, then over the registers;
        p, log_q (B, R, 12, frames), mask (B, R, frames)."""
        kl = (p * (p.clamp(min=1e-8).log() - log_q)).sum(dim=2)           # (B, R, frames)
        per_register = (kl * mask).sum(dim=(0, 2)) / mask.sum(dim=(0, 2)).clamp(min=1)
        return per_register.mean()

    @staticmethod
    def prior(targets: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The targets' mean chroma over their loud frames, per register, as log-probs shaped
        (1, R, 12, 1): what a head that learned nothing from the codes predicts."""
        registers = targets[0][0].shape[1]
        means = [torch.cat([p[:, r].transpose(1, 2)[m[:, r]] for p, m in targets]).mean(0)
                 for r in range(registers)]
        return torch.stack(means).clamp(min=1e-8).log()[None, :, :, None]

    def loss(self, level_z_q: list[torch.Tensor], audio: torch.Tensor) -> torch.Tensor:
        log_q = self(level_z_q)
        p, mask = self.target(audio, log_q.shape[-1])
        return self.kl(p, log_q, mask)


class SpectrumHead(nn.Module):
    """Teaching the encoder to hear partials: a linear map from the encoder's continuous output
    (standardised), before quantisation, to each frame's fine log spectrum (n_fft 2048: 15.6 Hz
    bins, 0-4 kHz, where notes' partials lie), both taken relative to the batch's mean. The
    decoder asks the same of the quantised latents, but its gradient reaches the encoder only
    through eight ConvNeXt blocks and the straight-through estimator, and while the decoder
    cannot yet render partials it asks for envelopes. Measured on the run's step-940 encoder
    (held-out, MSE of the centred target, whose variance is 1.33): a ridge probe from the
    encoder's output 1.20 (without centring), this head after 300 updates 1.15, a 16-band
    envelope of the audio 0.70, a 128-band log mel 0.37: the encoder knows less of the
    spectrum than an envelope does. This gradient is direct and linear, so what it teaches is
    also what the quantiser's linear projections can pick up. Not exported."""

    N_FFT, MAX_HZ, FLOOR = 2048, 4000.0, 1e-4

    def __init__(self, latent_dim: int, sample_rate: int, hop: int):
        super().__init__()
        self.hop = hop
        self.bins = int(self.MAX_HZ * self.N_FFT / sample_rate) + 1
        self.register_buffer("window", torch.hann_window(self.N_FFT), persistent=False)
        self.net = nn.Conv1d(latent_dim, self.bins, 1)

    @torch.no_grad()
    def target(self, audio: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, 1, T) -> (B, bins, frames) log magnitude, the floor 80 dB under full scale."""
        x = audio.reshape(audio.shape[0], -1).float()
        mag = torch.stft(x, self.N_FFT, self.hop, window=self.window, center=True,
                         return_complex=True).abs()[:, : self.bins] / self.window.sum()
        mag = F.pad(mag, (0, max(0, frames - mag.shape[-1])))[..., :frames]
        return mag.clamp(min=self.FLOOR).log()

    def loss(self, z: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """z (B, D, frames): the encoder's output for `audio` (B, 1, T). Both sides relative to
        the batch's mean spectrum, so the head need not first learn the level of every bin (an
        Adam step moves a bias by ~lr: hundreds of steps to reach a log magnitude of -7)."""
        target = self.target(audio, z.shape[-1])
        return F.mse_loss(self.net(standardise(z)), target - target.mean(dim=(0, 2), keepdim=True))
