"""GAN discriminators for codec training: multi-period (HiFi-GAN) + multi-scale STFT (EnCodec).

Every discriminator returns a list over its sub-discriminators of feature-map lists; the last
map of each is the logit map. Feature matching uses the rest. Widths are parameters so tests
run a tiny copy of the same architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

LRELU_SLOPE = 0.1  # HiFi-GAN's; EnCodec uses 0.2 for its STFT discriminator (below)


class PeriodDiscriminator(nn.Module):
    """Folds the waveform into (T / p, p) so 2-D convs over time see every p-th sample:
    periodic structure (pitch, harmonics) that a 1-D view of the waveform blurs."""

    def __init__(self, period: int, channels: int = 32):
        super().__init__()
        self.period = period
        # HiFi-GAN widths 32 -> 128 -> 512 -> 1024 -> 1024 at channels = 32.
        widths = [1, channels, 4 * channels, 16 * channels, 32 * channels, 32 * channels]
        self.convs = nn.ModuleList()
        for i in range(5):
            stride = (3, 1) if i < 4 else (1, 1)
            self.convs.append(weight_norm(nn.Conv2d(widths[i], widths[i + 1], (5, 1), stride,
                                                    padding=(2, 0))))
        self.post = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, c, t = x.shape                          # (B, 1, T)
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), mode="reflect")
        x = x.view(b, c, -1, self.period)          # (B, 1, T / p, p)
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            feats.append(x)
        feats.append(self.post(x))
        return feats


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods=(2, 3, 5, 7, 11), channels: int = 32):
        super().__init__()
        self.discs = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        return [d(x) for d in self.discs]


class STFTDiscriminator(nn.Module):
    """EnCodec's DiscriminatorSTFT: 2-D convs over the complex spectrogram (real, imag as
    channels), strided along frequency only, dilated along time."""

    def __init__(self, n_fft: int, channels: int = 32, dilations=(1, 2, 4)):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        convs = [weight_norm(nn.Conv2d(2, channels, (3, 9), padding=(1, 4)))]
        for d in dilations:
            convs.append(weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2),
                                               dilation=(d, 1), padding=(d, 4))))
        convs.append(weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))))
        self.convs = nn.ModuleList(convs)
        self.post = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # STFT in fp32 even under autocast (bf16 has no FFT); the convs then run autocast.
        spec = torch.stft(x.reshape(-1, x.shape[-1]).float(), self.n_fft, self.hop,
                          window=self.window, center=True, return_complex=True)
        z = torch.stack([spec.real, spec.imag], dim=1)   # (B, 2, F, frames)
        z = z.transpose(2, 3)                            # (B, 2, frames, F): stride on F
        feats = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            feats.append(z)
        feats.append(self.post(z))
        return feats


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, n_ffts=(2048, 1024, 512), channels: int = 32):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, channels) for n in n_ffts)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        return [d(x) for d in self.discs]


class CodecDiscriminator(nn.Module):
    """MPD + MS-STFT behind one call: x (B, 1, T) -> list of feature-map lists."""

    def __init__(self, periods=(2, 3, 5, 7, 11), mpd_channels: int = 32,
                 stft_ffts=(2048, 1024, 512), stft_channels: int = 32):
        super().__init__()
        self.mpd = MultiPeriodDiscriminator(periods, mpd_channels)
        self.msd = MultiScaleSTFTDiscriminator(stft_ffts, stft_channels)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        return self.mpd(x) + self.msd(x)
