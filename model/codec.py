"""The one place that knows SNAC: loading, chunk geometry, batched encode / seam-free decode.

Geometry (DESIGN §1) is derived from the codec config, never hard-coded:

    hop_length        = prod(encoder_rates)                         384 for snac_32khz
    strides           = vq_strides, coarse -> fine                  (8, 4, 2, 1)
    frames_per_chunk  = CHUNK_A_FRAMES * strides[0] // strides[l]   (64, 128, 256, 512)
    samples_per_chunk = CHUNK_A_FRAMES * strides[0] * hop_length    196,608 (6.144 s)
    pad_samples       = hop_length * lcm(strides[0], attn_window)   12,288: SNAC pads to this

The decoder is non-causal and injects noise even in eval mode, so `decode` takes the preceding
tokens as `context` (and, optionally, the following ones as `right_context`), decodes everything
together and cuts the contexts off. Its noise is keyed to absolute positions
(`positional_noise`): with the same seed, every sample of a decoded window equals the same sample
of a one-pass decode of the whole token sequence, wherever the window starts (within fp
tolerance, given enough context on both sides). That is what makes chained chunks seam-exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import types
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from snac import SNAC
from snac.layers import DecoderBlock, NoiseBlock

from model.weights import CodecLoadError, load_snac, save_snac

# A chunk is 64 frames of the coarsest level: 6.144 s at 32 kHz. A project-wide decision, not a
# codec property, so it lives here as the one constant the geometry is built from.
CHUNK_A_FRAMES = 64

# The released 32 kHz model (DESIGN §1). SNAC()'s own defaults match no released model.
SNAC_32KHZ_CONFIG = dict(
    sampling_rate=32000,
    encoder_dim=64,
    encoder_rates=[2, 3, 8, 8],
    decoder_dim=1536,
    decoder_rates=[8, 8, 3, 2],
    attn_window_size=32,
    codebook_size=4096,
    codebook_dim=8,
    vq_strides=[8, 4, 2, 1],
    noise=True,
    depthwise=True,
)
SNAC_32KHZ_HUB_ID = "hubertsiuzdak/snac_32khz"

# Same geometry as the real codec, tiny widths: tests run the real code path in well under a second.
DEBUG_CODEC_CONFIG = dict(SNAC_32KHZ_CONFIG, encoder_dim=8, decoder_dim=64)


# Decoder noise is drawn per span of this many decoder-input frames (hop_length samples each);
# any span boundary may fall inside a decoded window, so the value only trades draws for size.
NOISE_SPAN_FRAMES = 32


def _noise_span(seed: int, row: int, block: int, span: int, length: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """One span's noise, drawn on `device` (no host-to-device copy per NoiseBlock). CPU and CUDA
    generators differ, so a seed gives other noise on a GPU than on a CPU, the same on each."""
    key = hashlib.blake2b(f"{seed}/{row}/{block}/{span}".encode(), digest_size=8).digest()
    g = torch.Generator(device).manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
    return torch.randn(length, generator=g, device=device)


@contextmanager
def positional_noise(snac: SNAC, seed: int | Sequence[int], first_frame: int = 0):
    """Inside the block, the decoder's NoiseBlocks draw noise keyed to (seed, batch row, block,
    absolute position) instead of from the global RNG: the decode's first input frame is frame
    `first_frame` of the whole sequence. snac's NoiseBlock draws `randn(B, 1, T)` fresh per call,
    so the same position gets different noise in differently placed windows, and no two windows
    of a chain could agree where they overlap. `seed` may be one seed per batch row: then each
    row draws the noise it would draw decoded alone (row 0 of its own seed), so independent
    requests decode together with the same output as one at a time."""
    noise_blocks, upsample = [], 1
    for layer in snac.decoder.model:
        if isinstance(layer, DecoderBlock):
            upsample *= next(m for m in layer.block
                             if isinstance(m, torch.nn.ConvTranspose1d)).stride[0]
            noise_blocks += [(m, upsample) for m in layer.block if isinstance(m, NoiseBlock)]
    per_row = isinstance(seed, (list, tuple))  # else one seed for the batch (any int type)

    def forward_for(index: int, factor: int):
        def forward(self, x):
            B, _, T = x.shape
            if per_row and len(seed) != B:
                raise ValueError(f"{len(seed)} seeds for a batch of {B}")
            span = NOISE_SPAN_FRAMES * factor
            start = first_frame * factor
            first, last = start // span, (start + T - 1) // span
            rows = []
            for b in range(B):
                s_b, r_b = (seed[b], 0) if per_row else (seed, b)
                spans = [_noise_span(s_b, r_b, index, s, span, x.device)
                         for s in range(first, last + 1)]
                rows.append(torch.cat(spans)[start - first * span: start - first * span + T])
            noise = torch.stack(rows)[:, None].to(dtype=x.dtype)
            return x + noise * self.linear(x)
        return forward

    saved = []
    try:
        for index, (block, factor) in enumerate(noise_blocks):
            saved.append((block, block.__dict__.get("forward")))
            block.forward = types.MethodType(forward_for(index, factor), block)
        yield
    finally:
        for block, old in saved:
            if old is None:
                del block.forward
            else:
                block.forward = old


# codec config keys that shape only the decoder: changing them (or the decoder's weights) keeps
# the codes (`Codec.codes_fingerprint`). "decoder" is the spec of a decoder that replaces SNAC's
# own (model/vocoder.py), stored as decoder.json beside the SNAC files.
DECODER_ONLY_KEYS = ("decoder_dim", "decoder_rates", "noise", "decoder")


def pad_samples(config: dict) -> int:
    """SNAC's padding grid in samples: hop * lcm(coarsest stride, attention window)."""
    hop = math.prod(config["encoder_rates"])
    return hop * math.lcm(config["vq_strides"][0], config.get("attn_window_size") or 1)


class Codec:
    def __init__(self, snac: SNAC, config: dict, device: str | torch.device = "cpu"):
        self.config = dict(config)
        self.device = torch.device(device)
        self.snac = snac.to(self.device).eval()
        self.snac.requires_grad_(False)

        self.sample_rate = int(config["sampling_rate"])
        self.hop_length = int(math.prod(config["encoder_rates"]))
        self.strides = tuple(int(s) for s in config["vq_strides"])
        self.n_levels = len(self.strides)
        self.codebook_size = int(config["codebook_size"])
        if any(self.strides[0] % s for s in self.strides):
            raise CodecLoadError(f"vq_strides {self.strides} must all divide the coarsest stride")
        self.frames_per_chunk = tuple(CHUNK_A_FRAMES * self.strides[0] // s for s in self.strides)
        self.samples_per_chunk = CHUNK_A_FRAMES * self.strides[0] * self.hop_length
        self.pad_samples = pad_samples(config)
        if self.samples_per_chunk % self.pad_samples:
            raise CodecLoadError(
                f"a chunk ({self.samples_per_chunk} samples) is not a multiple of the codec's "
                f"padding grid ({self.pad_samples} samples)"
            )
        # Coarse frames per padding unit: token lengths must be multiples of this per level.
        self.pad_frames = tuple(self.pad_samples // (self.hop_length * s) for s in self.strides)
        self._fingerprint: str | None = None
        self._codes_fingerprint: str | None = None
        self._reach: int | None = None  # encoder_reach, measured on first use

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls, source: str | dict | os.PathLike, device: str | torch.device = "cpu", seed: int = 0
    ) -> Codec:
        """Build from a config dict (random init, seeded), a local directory, or a hub id."""
        snac, config = load_snac(source, seed=seed)
        return cls(snac, config, device)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write a directory that both `Codec.load` and `snac.SNAC.from_pretrained` accept."""
        return save_snac(self.snac, self.config, out_dir)

    @property
    def fingerprint(self) -> str:
        """Hash of config + weights: which codec this is, decoder included."""
        if self._fingerprint is None:
            self._fingerprint = self._hash(self.config, self.snac.state_dict())
        return self._fingerprint

    @property
    def codes_fingerprint(self) -> str:
        """Hash of what decides the codes: the config without its decoder-only keys, and the
        encoder's and quantiser's weights. Tokens are interchangeable between codecs that share
        it, so a decoder-only fine-tune (`freeze_encoder`) keeps every tokenised dataset and
        trained DiT valid while `fingerprint` changes."""
        if self._codes_fingerprint is None:
            config = {k: v for k, v in self.config.items() if k not in DECODER_ONLY_KEYS}
            state = {k: v for k, v in self.snac.state_dict().items()
                     if k.startswith(("encoder.", "quantizer."))}
            self._codes_fingerprint = self._hash(config, state)
        return self._codes_fingerprint

    @staticmethod
    def _hash(config: dict, state: dict) -> str:
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for name, tensor in sorted(state.items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def decoder_name(self) -> str:
        """Which decoder turns codes into audio: "snac" (SNAC's own, with its noise injection)
        or the kind of a replacement decoder ("istft": model/vocoder.py)."""
        return (self.config.get("decoder") or {}).get("kind", "snac")

    @property
    def encoder_name(self) -> str:
        """Which encoder makes the codes: "snac" (SNAC's waveform encoder) or the kind of a
        replacement ("stft": model/spectral_encoder.py)."""
        return (self.config.get("encoder") or {}).get("kind", "snac")

    def geometry(self) -> dict:
        return dict(
            sample_rate=self.sample_rate,
            hop_length=self.hop_length,
            strides=list(self.strides),
            n_levels=self.n_levels,
            codebook_size=self.codebook_size,
            frames_per_chunk=list(self.frames_per_chunk),
            samples_per_chunk=self.samples_per_chunk,
            chunk_seconds=self.samples_per_chunk / self.sample_rate,
            pad_samples=self.pad_samples,
        )

    # ---------------------------------------------------------------- encode / decode
    def padded_length(self, n_samples: int) -> int:
        return math.ceil(n_samples / self.pad_samples) * self.pad_samples

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> list[torch.Tensor]:
        """(B, T) float audio at `sample_rate` -> per-level (B, n_l) int64 codes.

        T is right-padded with zeros to a multiple of `pad_samples`. Runs in fp32 even on GPU:
        nearest-codeword choices flip under bf16, and encoding is a small share of the cost.
        """
        if audio.ndim != 2:
            raise ValueError(f"encode expects audio of shape (B, T), got {tuple(audio.shape)}")
        if audio.shape[-1] == 0:
            raise ValueError("encode got empty audio")
        if not torch.isfinite(audio).all():
            raise ValueError("encode got NaN or infinite samples")
        x = audio.to(self.device, torch.float32)
        pad = self.padded_length(x.shape[-1]) - x.shape[-1]
        x = torch.nn.functional.pad(x, (0, pad))[:, None, :]  # (B, 1, T)
        return [c.long() for c in self.snac.encode(x)]

    def encoder_reach(self) -> int:
        """How far (samples) a change in the audio can move a token, on either side: the
        encoder's receptive field (found by back-propagating from one latent frame to the
        input, so it follows the architecture, not a guess) plus one coarsest token, whose
        residual every finer level subtracts. Convolutions and windowed attention are local,
        so audio further away than this cannot change a token. Measured once per codec."""
        if self._reach is None:
            self._reach = self._measure_reach()
        return self._reach

    def _measure_reach(self) -> int:
        n_units = 8
        while True:
            x = torch.zeros(1, 1, n_units * self.pad_samples, device=self.device)
            x.normal_(generator=torch.Generator(self.device).manual_seed(0)).mul_(0.1)
            x.requires_grad_(True)
            with torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
                z = self.snac.encoder(x)
                centre = z.shape[-1] // 2
                z[0, :, centre].sum().backward()
            touched = (x.grad[0, 0] != 0).nonzero()
            at = centre * self.hop_length
            reach = max(at - int(touched[0]), int(touched[-1]) - at) + self.hop_length
            if int(touched[0]) > 0 and int(touched[-1]) < x.shape[-1] - 1:
                return reach + self.strides[0] * self.hop_length
            n_units *= 2                     # the field reached the probe's ends: widen it
            if n_units > 1024:
                raise RuntimeError("the encoder's receptive field exceeds 6 minutes")

    @property
    def decode_left_pads(self) -> int:
        """Padding units of tokens a decode window needs before the samples it keeps, so they
        equal a decode of the whole sequence: 2 for SNAC's decoder and for Griffin-Lim (both
        reach under 2 units); for a decoder that integrates frequencies into phase
        (model/vocoder.py, phase = "frequency"), its restart period plus its net's reach."""
        frames = getattr(self.snac.decoder, "left_reach_frames", None)
        if frames is None:
            return 2
        return max(2, -(-frames // (self.pad_frames[0] * self.strides[0])))

    @property
    def border_samples(self) -> int:
        """`encoder_reach` rounded up to the padding grid: how much of a
        stretch's ends an encode of that stretch alone gets wrong, in whole padding units.
        24,576 samples (0.768 s) for every snac_32khz-geometry codec."""
        return -(-self.encoder_reach() // self.pad_samples) * self.pad_samples

    def validate_tokens(self, tokens: list[torch.Tensor], name: str = "tokens") -> None:
        if len(tokens) != self.n_levels:
            raise ValueError(f"{name}: expected {self.n_levels} levels, got {len(tokens)}")
        batch, n0 = None, None
        for level, t in enumerate(tokens):
            if t.ndim != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(
                    f"{name}[{level}]: expected an integer (B, n) tensor, got {t.dtype} {tuple(t.shape)}"
                )
            if batch is None:
                batch, n0 = t.shape
            elif t.shape[0] != batch:
                raise ValueError(f"{name}[{level}]: batch {t.shape[0]} != {batch} of level 0")
            want = n0 * self.strides[0] // self.strides[level]
            if t.shape[1] != want:
                raise ValueError(
                    f"{name}[{level}]: length {t.shape[1]} is off the grid; level 0 has "
                    f"{n0} frames so level {level} needs {want}"
                )
            if t.numel() and (t.min() < 0 or t.max() >= self.codebook_size):
                raise ValueError(f"{name}[{level}]: ids must lie in [0, {self.codebook_size})")
        if n0 % self.pad_frames[0]:
            raise ValueError(
                f"{name}: level-0 length {n0} is not a multiple of {self.pad_frames[0]} "
                f"frames ({self.pad_samples} samples, the codec's padding grid)"
            )

    @torch.inference_mode()
    def decode(
        self,
        tokens: list[torch.Tensor],
        context: list[torch.Tensor] | None = None,
        seed: int | None = 0,
        right_context: list[torch.Tensor] | None = None,
        first_frame: int = 0,
    ) -> torch.Tensor:
        """Per-level codes -> (B, samples) float32 audio; the contexts are decoded along and cut.

        `seed` keys the decoder's noise to absolute positions (None: snac's own global-RNG
        noise). `first_frame`: where the first decoded token (context included) sits in the
        whole sequence, in hop frames (`strides[0]` per level-0 token). Then
        decode(b, context=a, right_context=c, first_frame=len(x)) equals
        decode(x + a + b + c)[the samples of b], up to fp error and to how far the decoder sees:
        with context and right context longer than its receptive field, exactly.
        """
        self.validate_tokens(tokens)
        before = after = 0
        parts = [tokens]
        for name, extra in (("context", context), ("right_context", right_context)):
            if extra is None:
                continue
            self.validate_tokens(extra, name)
            if extra[0].shape[0] != tokens[0].shape[0]:
                raise ValueError(f"{name} and tokens have different batch sizes")
            if name == "context":
                parts.insert(0, extra)
                before = extra[0].shape[1]
            else:
                parts.append(extra)
                after = extra[0].shape[1]
        if first_frame < 0 or first_frame % (self.pad_frames[0] * self.strides[0]):
            raise ValueError(f"first_frame must be a non-negative multiple of "
                             f"{self.pad_frames[0] * self.strides[0]} (the padding grid)")
        codes = [torch.cat([p[level].to(self.device) for p in parts], dim=1)
                 for level in range(self.n_levels)]
        if hasattr(self.snac.decoder, "first_frame"):   # a decoder keyed to positions
            self.snac.decoder.first_frame = first_frame
        # Only SNAC's own decoder injects noise; a replacement decoder is deterministic.
        noise = (positional_noise(self.snac, seed, first_frame)
                 if seed is not None and self.decoder_name == "snac" else None)
        with noise if noise is not None else nullcontext():
            with torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
            ):
                audio = self.snac.decode(codes)  # (B, 1, T)
        frame = self.strides[0] * self.hop_length                 # samples per level-0 token
        end = audio.shape[-1] - after * frame
        return audio[:, 0, before * frame: end].float()
