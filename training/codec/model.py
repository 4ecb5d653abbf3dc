"""The SNAC forward pass training needs, loading for fine-tuning, and export.

The released `snac` code returns only (audio, codes): its `VectorQuantize.forward` drops the
commitment and codebook losses (DAC's 0.25 / 1.0 terms) that keep the encoder and codebooks
together. `quantize` re-runs the residual loop with the snac submodules' own projections and
codebooks and returns those losses too; a test checks its codes equal `SNAC.encode`'s, so the
reimplementation cannot drift from the codec it trains.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from snac import SNAC
from snac.vq import ResidualVectorQuantize

from model import weights


@dataclass
class CodecOutput:
    audio: torch.Tensor           # (B, 1, T) reconstruction, cropped to the input length
    codes: list[torch.Tensor]     # per level (B, n_l), coarse -> fine
    commitment: torch.Tensor      # scalar: pulls encoder outputs toward their codes
    codebook: torch.Tensor        # scalar: pulls codes toward encoder outputs
    latents: list[torch.Tensor]   # per level (B, codebook_dim, n_l), detached: what the lookup
    #                               saw (data init and dead-code restart sample from these)
    input_means: list[torch.Tensor]  # per level (D,): batch mean of the quantiser input before
    #                                  centring (detached)
    level_z_q: list[torch.Tensor] | None = None  # per level (B, D, T): its share of the decoder
    #                                  input (straight-through), at the hop rate
    spectrum: tuple[torch.Tensor, torch.Tensor] | None = None  # a spectral decoder's
    #                                  (log magnitude, phase), each (B, F, frames)
    z: torch.Tensor | None = None      # (B, D, frames) the encoder's output, before quantising


def quantize(rvq: ResidualVectorQuantize, z: torch.Tensor,
             centre: str | list[torch.Tensor] | None = None, gradients: str = "raw",
             level_z_q: list | None = None):
    """snac's residual VQ loop, plus DAC's per-level losses summed over levels.

    z: (B, D, T) encoder output. centre="batch" subtracts each level's detached batch mean from
    its quantiser input before the projection (training); a list of (D,) vectors subtracts
    those. `fold_input_means` turns a fixed centre into a plain snac model (codec_vq.py).
    Returns (z_q (B, D, T), codes, commitment, codebook, latents, input_means): input_means
    are the batch means of each level's input before centring. A list passed as `level_z_q`
    receives each level's own (B, D, T) share of z_q (an auxiliary head reads the coarse ones).

    gradients="raw" is DAC's: both VQ losses on the raw vectors, straight-through z_e -> code.
    The lookup only compares directions, so there nothing opposes the radial part of the
    decoder's gradient, which the straight-through pours into |z_e| with no effect on the
    forward pass; measured on real music, |z_e| spread grew until the raw commitment loss went
    0.1 -> 68 and dominated the total (steps 500-1400 of the demo run). gradients="direction"
    splits each code into gain x direction: both VQ losses compare unit vectors (ViT-VQGAN's
    l2-normalised codes), the straight-through passes only the direction to the encoder, and
    the code's gain is learned from the decoder's gradient. The forward pass, the codes and the
    exported model are exactly those of "raw" (a plain snac model).
    """
    if gradients not in ("raw", "direction"):
        raise ValueError(f"gradients must be 'raw' or 'direction', not {gradients!r}")
    z_q_sum = 0.0
    residual = z
    codes, latents, means, commitment, codebook = [], [], [], 0.0, 0.0
    for level, vq in enumerate(rvq.quantizers):
        x = F.avg_pool1d(residual, vq.stride, vq.stride) if vq.stride > 1 else residual
        means.append(x.detach().mean(dim=(0, 2)))
        if centre == "batch":
            x = x - means[-1].view(1, -1, 1)
        elif centre is not None:
            x = x - centre[level].to(x).view(1, -1, 1)
        z_e = vq.in_proj(x)                     # (B, d, T / stride): factorised low-dim space
        z_q, idx = vq.decode_latents(z_e)       # nearest code by cosine, raw code vectors
        if gradients == "raw":
            # DAC: both terms on the raw vectors, mean over (d, t), mean over batch.
            commitment = commitment + F.mse_loss(z_e.float(), z_q.detach().float())
            codebook = codebook + F.mse_loss(z_q.float(), z_e.detach().float())
            z_q = z_e + (z_q - z_e).detach()    # straight-through estimator
        else:
            unit = F.normalize(z_e.float(), dim=1)
            gain = z_q.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
            code_dir = z_q.float() / gain
            commitment = commitment + F.mse_loss(unit, code_dir.detach())
            codebook = codebook + F.mse_loss(code_dir, unit.detach())
            # forward: gain * code_dir = the raw code; backward: direction -> encoder, gain -> code
            z_q = gain * (unit + (code_dir - unit).detach())
        z_q = vq.out_proj(z_q)
        if vq.stride > 1:
            z_q = z_q.repeat_interleave(vq.stride, dim=-1)
        z_q_sum = z_q_sum + z_q
        if level_z_q is not None:
            level_z_q.append(z_q)
        residual = residual - z_q
        codes.append(idx)
        latents.append(z_e.detach())
    return z_q_sum, codes, commitment, codebook, latents, means


def codec_forward(model: SNAC, audio: torch.Tensor, freeze_encoder: bool = False,
                  centre: str | list[torch.Tensor] | None = None,
                  gradients: str = "raw") -> CodecOutput:
    """audio (B, 1, T) -> reconstruction + codes + VQ losses (SNAC.forward with the losses)."""
    length = audio.shape[-1]
    x = model.preprocess(audio)                 # right-pad to hop * lcm(stride0, window)
    # Encoder and quantiser are fixed under freeze_encoder: no graph, VQ losses are constants.
    level_z_q: list[torch.Tensor] = []
    with torch.no_grad() if freeze_encoder else nullcontext():
        z = model.encoder(x)
        # The quantiser runs in fp32 even under bf16 autocast: a nearest-code search in bf16
        # picks different codes than fp32 inference will, and the quantiser is tiny.
        with torch.autocast(x.device.type, enabled=False):
            z_q, codes, commitment, codebook, latents, means = quantize(
                model.quantizer, z.float(), None if freeze_encoder else centre, gradients,
                level_z_q)
    spectrum = None
    if hasattr(model.decoder, "spectrum"):      # a spectral decoder (model/vocoder.py)
        spectrum = model.decoder.spectrum(z_q)
        log_mag, second = spectrum
        if getattr(model.decoder.cfg, "phase", None) == "frequency":
            # Only the frequency term teaches the frequencies: the waveform terms' gradient
            # through the integrated phase sums over up to a period of frames and swamps it
            # (measured: with it, after 900 steps the head was further from the real
            # frequencies than the bins' own centres).
            second = second.detach()
        audio_hat = model.decoder.render(log_mag, second)[..., :length]
    else:
        audio_hat = model.decoder(z_q)[..., :length]
    return CodecOutput(audio_hat, codes, commitment, codebook, latents, means, level_z_q,
                       spectrum, z)


def load_for_training(source: str | dict) -> tuple[SNAC, dict]:
    """A trainable SNAC and its constructor config from a training checkpoint (either format of
    training/run/checkpoint.py), or anything `model.weights.load_snac` takes: a config dict
    (random init), an export directory, a hub id."""
    from training.run import checkpoint as ckpt_io

    path = Path(source) if not isinstance(source, dict) else None
    if path is not None and ckpt_io.is_complete(path):
        ck = ckpt_io.load_checkpoint(path)
        if "model" not in ck["weights"] or not isinstance(ck["config"].get("model"), dict):
            raise ValueError(f"{path} is not a codec training checkpoint (no codec weights)")
        config = dict(ck["config"]["model"])
        model = weights.build_snac(config)
        model.load_state_dict(ck["weights"]["model"])
        means = ck["trainer"].get("vq_input_means")
        if means is not None:  # trained with centring: fold it in
            fold_input_means(model, means)
        return model, config
    model, config = weights.load_snac(source)
    return model.train(), config


@torch.no_grad()
def fold_input_means(model: SNAC, means: list[torch.Tensor]) -> SNAC:
    """In place: in_proj(x - m) == in_proj'(x) with in_proj'.bias = bias - W m. Turns a model
    trained with centre="batch" into a plain snac model that `SNAC.encode` runs as trained."""
    for vq, m in zip(model.quantizer.quantizers, means, strict=True):
        w = vq.in_proj.weight.squeeze(-1)                    # (d, D): kernel size 1
        vq.in_proj.bias.sub_((w.float() @ m.float().to(w.device)).to(vq.in_proj.bias))
    return model


def freeze_encoder_and_quantizer(model: SNAC) -> None:
    model.encoder.requires_grad_(False)
    model.quantizer.requires_grad_(False)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
