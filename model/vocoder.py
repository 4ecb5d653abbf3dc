"""A frame-rate decoder for SNAC codes: ConvNeXt blocks at the hop rate, then an inverse-STFT
head that predicts each frame's log magnitude and phase (the Vocos / APNet design).

SNAC's own decoder upsamples 384x through transposed convolutions and injects noise; trained
on mel and STFT distances on a CPU budget, the demo's learned to meet them with envelope-shaped
noise plus a buzz at its 83.3 Hz frame rate, and no notes. Here every partial is a bin of an
explicit spectrum (n_fft 1536 at 32 kHz: 20.8 Hz bins, 4x overlap), rendered by an overlap-add
that has no frame-rate periodicity of its own when the phases are consistent, and there is no
noise injection.

    z (B, D, T) summed quantised latents at the hop rate (what SNAC's decoder takes)
      -> Conv1d(k7) -> N x ConvNeXt block (depthwise k7, LayerNorm, C -> 3C -> C, layer scale)
      -> LayerNorm -> Linear(C -> 2 x (n_fft/2 + 1)): log magnitude, phase
      -> iSTFT ("same" framing: T frames -> exactly T x hop samples)

Framing: frame t's window spans samples [t*hop - pad, t*hop - pad + n_fft), pad = (n_fft -
hop) / 2, so the output of T frames is exactly T * hop samples, the length SNAC's decoder gives
for the same latents. `analysis` computes the STFT of a waveform in the same framing, which the
phase and consistency losses compare against.

Configured by a plain dict (`DECODER_KINDS`), stored as decoder.json beside the SNAC files
(model/weights.py); `Codec` swaps it in for SNAC's decoder.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

PHASES = ("learned", "griffin_lim", "frequency")


@dataclass
class ISTFTDecoderConfig:
    latent_dim: int = 256      # SNAC's latent width: encoder_dim x 2^len(encoder_rates)
    hop: int = 384             # = prod(encoder_rates): one latent frame per hop
    n_fft: int = 1536          # 4 x hop: 20.8 Hz bins at 32 kHz resolve partials from ~80 Hz
    dim: int = 384             # ConvNeXt width
    layers: int = 8
    mult: int = 3              # ConvNeXt MLP expansion (Vocos: 3)
    kernel: int = 7
    max_log_mag: float = 6.0   # exp() overflow guard; |X| of full-scale audio is ~ n_fft / 4
    # "learned": the head's phase is rendered. "griffin_lim": only its magnitudes are, with the
    # phase rebuilt by `gl_iters` Griffin-Lim iterations from the head's (the bake-off's control
    # for whether learning phase is the bottleneck; decoding windows then differ at their seams)
    # "frequency": the head's second half is each bin's instantaneous frequency (within
    # `frequency_range` bins of the bin's centre), integrated into phase (`integrate`), with no
    # Griffin-Lim: a partial smeared over neighbouring bins still sounds at one frequency, which
    # Griffin-Lim cannot recover from smeared magnitudes (measured on the spectral codec at step
    # 6185, 16 held-out segments: its magnitudes with Griffin-Lim, chroma 0.44; with phases
    # integrated from the true instantaneous frequency, 0.75; docs/codec-training.md §10).
    phase: str = "learned"
    frequency_range: float = 2.0   # bins; = n_fft / (2 hop), the range a frame-to-frame phase
    #                                difference can tell apart (further is aliased)
    # Where "frequency" restarts its integration (`integrate`): every P frames of the whole
    # sequence. A steady partial's phase then repeats every P frames, so its frequency lands on
    # a grid of sample_rate / (P hop) (0.65 Hz at P 128: 10 cents at 55 Hz), and a decode window
    # must start P + the net's reach before the samples it keeps (Codec.decode_left_units).
    frequency_period: int = 128
    gl_iters: int = 32
    # Where Griffin-Lim starts: "advance", the head's phases (each bin's own advance, so a
    # smooth spectrum renders as steady tones on the 20.8 Hz bin grid: a +7.7 dB bin comb on 6
    # independent clips with the spectral codec at step 1800), or "random": fixed random phases
    # that repeat every `gl_init_period` frames (same clips: bin comb +0.8 dB, chroma 0.31 ->
    # 0.40, frame F1 0.19 -> 0.24). Either way the start depends only on a frame's position
    # modulo the period, which must divide the codec's padding grid (32 frames: every decode
    # window starts on it), so a window decodes what the whole sequence decodes there.
    gl_init: str = "advance"
    gl_init_period: int = 32
    # The head predicts phase relative to each bin's own advance (2 pi k hop / n_fft a frame):
    # a stationary partial then needs a constant output, which a convolutional net can give.
    # Predicting absolute phase instead, a net fed the same latents frame after frame gives the
    # same phase every frame: a pulse train at the frame rate, the 83.3 Hz buzz (measured: a
    # +37.5 dB comb at step 250 of the first run). The advance repeats every n_fft / gcd(n_fft,
    # hop) frames (4 here), and every decode window starts on the codec's 32-frame grid, so a
    # window's relative frame index gives the same phases as the absolute one: seams stay exact.
    phase_advance: bool = True

    def __post_init__(self):   # also checks what `replace` (set_render_options) gives
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, not {self.phase!r}")
        if self.gl_init not in ("advance", "random"):
            raise ValueError(f"gl_init must be 'advance' or 'random', not {self.gl_init!r}")
        if self.gl_init_period < 1:
            raise ValueError("gl_init_period must be >= 1")
        if self.frequency_period < 2 or self.frequency_period % 2:
            raise ValueError("frequency_period must be even and >= 2")

    @property
    def kind(self) -> str:
        return "istft"


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, mult: int, kernel: int, layer_scale: float):
        super().__init__()
        self.dw = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.up = nn.Linear(dim, mult * dim)
        self.down = nn.Linear(mult * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # (B, C, T)
        h = self.dw(x).transpose(1, 2)                             # (B, T, C)
        h = self.down(F.gelu(self.up(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ISTFTDecoder(nn.Module):
    def __init__(self, cfg: ISTFTDecoderConfig):
        super().__init__()
        if cfg.n_fft < cfg.hop or (cfg.n_fft - cfg.hop) % 2:
            raise ValueError("n_fft must be >= hop and n_fft - hop even ('same' framing)")
        self.cfg = cfg
        self.embed = nn.Conv1d(cfg.latent_dim, cfg.dim, cfg.kernel, padding=cfg.kernel // 2)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(cfg.dim, cfg.mult, cfg.kernel,
                                                  1.0 / cfg.layers) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.n_bins = cfg.n_fft // 2 + 1
        self.head = nn.Linear(cfg.dim, 2 * self.n_bins)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.first_frame = 0    # where the next decode's frame 0 sits (set by Codec.decode)
        self.initialize_weights()

    def initialize_weights(self):
        # Vocos: truncated normal 0.02 everywhere. The head starts near silence with random
        # phase structure, so the first steps learn loudness before anything else.
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.bias[: self.n_bins].fill_(-4.0)

    @property
    def receptive_frames(self) -> int:
        """Latent frames on each side that can change one output frame's spectrum."""
        return (self.cfg.kernel // 2) * (len(self.blocks) + 1)

    @property
    def left_reach_frames(self) -> int | None:
        """Frames before an output sample that can change it, where that is further than
        SNAC's decoder reaches (None otherwise): with phase = "frequency", a restart period
        of integrated frequencies, the net's reach and the overlap-add's."""
        if self.cfg.phase != "frequency":
            return None
        return self.cfg.frequency_period + self.receptive_frames + self.cfg.n_fft // self.cfg.hop

    def spectrum(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, D, T) -> log magnitude and phase, each (B, n_fft/2 + 1, T), fp32. With
        phase = "frequency" the second is each bin's instantaneous frequency (rad / sample)."""
        h = self.norm(self.embed(z).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        out = self.head(self.final_norm(h.transpose(1, 2))).float()   # (B, T, 2F)
        log_mag, phase = out.transpose(1, 2).chunk(2, dim=1)
        if self.cfg.phase == "frequency":
            k = torch.arange(self.n_bins, device=phase.device)[:, None]
            bins = k + self.cfg.frequency_range * torch.tanh(phase)
            return log_mag.clamp(max=self.cfg.max_log_mag), (2 * torch.pi / self.cfg.n_fft) * bins
        if self.cfg.phase_advance:
            phase = phase + self.advance(phase.shape[-1], phase.device)
        return log_mag.clamp(max=self.cfg.max_log_mag), phase

    def advance(self, frames: int, device=None) -> torch.Tensor:
        """(F, frames) phase of each bin's centre frequency at each frame, wrapped: frame t of
        bin k is at 2 pi k hop t / n_fft (mod 2 pi, computed exactly in integers)."""
        cfg = self.cfg
        k = torch.arange(self.n_bins, device=device)[:, None]
        t = torch.arange(frames, device=device)[None, :]
        return (2 * torch.pi / cfg.n_fft) * ((k * t * cfg.hop) % cfg.n_fft).float()

    def random_phases(self, frames: int, device=None) -> torch.Tensor:
        """(F, frames): fixed uniform phases (seed 0), repeating every `gl_init_period` frames."""
        period = self.cfg.gl_init_period
        table = torch.rand(self.n_bins, period, generator=torch.Generator().manual_seed(0))
        table = (2 * torch.pi * table).to(device)
        return table.repeat(1, -(-frames // period))[:, :frames]

    def integrate(self, omega: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """(B, F, T) instantaneous frequency (rad / sample) -> phases, for `synthesize`.

        Each bin's phase at its frame's centre advances by hop x the mean frequency of two
        frames (a partial smeared over several bins then has one frequency in all of them, and
        their phases differ by pi a bin, as a real partial's do under a Hann window). The
        integration restarts on two grids, at frames 0 and P/2 modulo P (frequency_period) of
        the whole sequence (`first_frame`: where frame 0 sits in it), and at the window's first
        frame; the phase slides from one grid's to the other's, reaching each restart with
        weight 0, so no phase jumps anywhere. A frame's phase depends only on the frequencies
        since the restart before it, so every frame more than P frames (plus the net's reach)
        after a decode window's start gets the phase a whole-sequence decode gives it; the price
        is that a steady partial's phase repeats every P frames: its frequency is rounded to a
        multiple of 1 / (P hop) cycles a sample."""
        cfg, period = self.cfg, self.cfg.frequency_period
        T = omega.shape[-1]
        two_pi = 2 * torch.pi
        w = omega.double()
        start = torch.remainder(cfg.hop * 0.5 * w, two_pi)           # centre phase at a restart
        step = torch.remainder(cfg.hop * 0.5 * (w[..., 1:] + w[..., :-1]), two_pi)
        step = torch.cat([start[..., :1], step], dim=-1)
        t = torch.arange(T, device=omega.device)
        t_abs = t + first_frame

        def run(offset: int) -> torch.Tensor:
            restart = ((t_abs - offset) % period == 0) | (t == 0)
            steps = torch.where(restart, start, step)
            total = steps.cumsum(-1)
            last = torch.cummax(torch.where(restart, t, -1), dim=0).values      # (T,)
            before = (total - steps).index_select(-1, last)
            return total - before

        a, b = run(0), run(period // 2)
        slide = (1 - 2 * (t_abs % period).double() / period).abs()  # 1 at a's restarts, 0 at b's
        centre = a + slide * (torch.remainder(b - a + torch.pi, two_pi) - torch.pi)
        k = torch.arange(self.n_bins, device=omega.device)[:, None]
        return (centre - torch.pi * (k % 2)).float()

    def synthesize(self, log_mag: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """(B, F, T) log magnitude + phase -> (B, 1, T * hop) audio by windowed overlap-add."""
        cfg = self.cfg
        spec = torch.polar(log_mag.exp(), phase)                       # (B, F, T) complex64
        frames = torch.fft.irfft(spec, n=cfg.n_fft, dim=1) * self.window[:, None]  # (B, N, T)
        T = frames.shape[-1]
        length = (T - 1) * cfg.hop + cfg.n_fft
        audio = F.fold(frames, (1, length), (1, cfg.n_fft), stride=(1, cfg.hop))[:, 0, 0]
        norm = F.fold(self.window.square()[None, :, None].expand(1, -1, T), (1, length),
                      (1, cfg.n_fft), stride=(1, cfg.hop))[:, 0, 0]
        pad = (cfg.n_fft - cfg.hop) // 2
        audio = audio[:, pad: length - pad] / norm[:, pad: length - pad].clamp(min=1e-8)
        return audio[:, None]                                           # (B, 1, T * hop)

    def analysis(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, 1, T * hop) -> complex STFT (B, F, T) in the decoder's own framing."""
        cfg = self.cfg
        pad = (cfg.n_fft - cfg.hop) // 2
        x = F.pad(audio.reshape(audio.shape[0], -1).float(), (pad, pad))
        return torch.stft(x, cfg.n_fft, cfg.hop, window=self.window, center=False,
                          return_complex=True)

    def render(self, log_mag: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """The audio of a predicted spectrum: its own phase, the integral of its frequencies,
        or Griffin-Lim's from it."""
        if self.cfg.phase == "frequency":
            return self.synthesize(log_mag, self.integrate(phase, self.first_frame))
        if self.cfg.phase == "griffin_lim":
            if self.cfg.gl_init == "random":
                phase = self.random_phases(phase.shape[-1], phase.device).expand_as(phase)
            # fast Griffin-Lim (momentum 0.99, Perraudin et al. 2013), as librosa's
            with torch.no_grad():
                previous = None
                for _ in range(self.cfg.gl_iters):
                    rebuilt = self.analysis(self.synthesize(log_mag, phase))
                    step = rebuilt if previous is None else rebuilt - 0.99 / 1.99 * previous
                    phase, previous = step.angle(), rebuilt
            phase = phase.detach()
        return self.synthesize(log_mag, phase)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.render(*self.spectrum(z))


DECODER_KINDS = {"istft": (ISTFTDecoderConfig, ISTFTDecoder)}


def build_part(spec: dict, kinds: dict, part: str) -> nn.Module:
    """A replaced SNAC part (encoder or decoder) from its PART.json dict ({"kind": ..., fields})
    and the kinds its module knows ({kind: (config class, module class)})."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in kinds:
        raise ValueError(f"unknown {part} kind {kind!r}; known: {sorted(kinds)}")
    config_cls, module_cls = kinds[kind]
    return module_cls(config_cls(**spec))


def part_spec(module: nn.Module) -> dict:
    """The PART.json dict of a replaced part: its kind and every config field."""
    return {"kind": module.cfg.kind, **asdict(module.cfg)}


def build_decoder(spec: dict) -> nn.Module:
    """A decoder from its decoder.json dict ({"kind": "istft", ...fields})."""
    return build_part(spec, DECODER_KINDS, "decoder")


decoder_spec = part_spec


# Fields that change how a decoder renders its spectrum, not what its weights are: a trained
# decoder can take new values for them (a warm start switching to Griffin-Lim phase, say).
RENDER_OPTIONS = ("phase", "gl_iters", "gl_init", "gl_init_period", "frequency_period")


@contextmanager
def render_options(decoder: nn.Module, **options):
    """Within the block, `decoder` renders with these render options; its own after."""
    own = decoder.cfg
    decoder.cfg = replace(own, **options)
    try:
        yield decoder
    finally:
        decoder.cfg = own


def set_render_options(decoder: nn.Module, spec: dict) -> dict:
    """In place: apply `spec`'s render options to `decoder` (its config validates them).
    Returns the rest of `spec` that differs from the decoder's own, which cannot be applied."""
    own = decoder_spec(decoder)
    options = {k: v for k, v in spec.items() if k in RENDER_OPTIONS}
    decoder.cfg = replace(decoder.cfg, **options)
    return {k: v for k, v in spec.items() if k not in RENDER_OPTIONS and own.get(k) != v}
