"""The SNAC forward pass training needs, loading for fine-tuning, and export.

The released `snac` code returns only (audio, codes): its `VectorQuantize.forward` drops the
commitment and codebook losses (DAC's 0.25 / 1.0 terms) that keep the encoder and codebooks
together. `quantize` re-runs the residual loop with the snac submodules' own projections and
codebooks and returns those losses too; a test checks its codes equal `SNAC.encode`'s, so the
reimplementation cannot drift from the codec it trains.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from snac import SNAC
from snac.vq import ResidualVectorQuantize


@dataclass
class CodecOutput:
    audio: torch.Tensor           # (B, 1, T) reconstruction, cropped to the input length
    codes: list[torch.Tensor]     # per level (B, n_l), coarse -> fine
    commitment: torch.Tensor      # scalar: pulls encoder outputs toward their codes
    codebook: torch.Tensor        # scalar: pulls codes toward encoder outputs


def quantize(rvq: ResidualVectorQuantize, z: torch.Tensor):
    """snac's residual VQ loop, plus DAC's per-level losses summed over levels.

    z: (B, D, T) encoder output. Returns (z_q (B, D, T), codes, commitment, codebook).
    """
    z_q_sum = 0.0
    residual = z
    codes, commitment, codebook = [], 0.0, 0.0
    for vq in rvq.quantizers:
        x = F.avg_pool1d(residual, vq.stride, vq.stride) if vq.stride > 1 else residual
        z_e = vq.in_proj(x)                     # (B, d, T / stride): factorised low-dim space
        z_q, idx = vq.decode_latents(z_e)       # nearest code by cosine, raw code vectors
        # DAC: both terms on the raw (un-normalised) vectors, mean over (d, t), mean over batch.
        commitment = commitment + F.mse_loss(z_e.float(), z_q.detach().float())
        codebook = codebook + F.mse_loss(z_q.float(), z_e.detach().float())
        z_q = z_e + (z_q - z_e).detach()        # straight-through estimator
        z_q = vq.out_proj(z_q)
        if vq.stride > 1:
            z_q = z_q.repeat_interleave(vq.stride, dim=-1)
        z_q_sum = z_q_sum + z_q
        residual = residual - z_q
        codes.append(idx)
    return z_q_sum, codes, commitment, codebook


def codec_forward(model: SNAC, audio: torch.Tensor, freeze_encoder: bool = False) -> CodecOutput:
    """audio (B, 1, T) -> reconstruction + codes + VQ losses (SNAC.forward with the losses)."""
    length = audio.shape[-1]
    x = model.preprocess(audio)                 # right-pad to hop * lcm(stride0, window)
    # Encoder and quantiser are fixed under freeze_encoder: no graph, VQ losses are constants.
    with torch.no_grad() if freeze_encoder else nullcontext():
        z = model.encoder(x)
        # The quantiser runs in fp32 even under bf16 autocast: a nearest-code search in bf16
        # picks different codes than fp32 inference will, and the quantiser is tiny.
        with torch.autocast(x.device.type, enabled=False):
            z_q, codes, commitment, codebook = quantize(model.quantizer, z.float())
    audio_hat = model.decoder(z_q)[..., :length]
    return CodecOutput(audio_hat, codes, commitment, codebook)


def build_snac(config: dict) -> SNAC:
    return SNAC(**config)


def load_snac(source: str | dict) -> tuple[SNAC, dict]:
    """A SNAC and its constructor config from a config dict (random init), an export directory,
    a training checkpoint (*.pt) or a hub id (downloads)."""
    if isinstance(source, dict):
        return build_snac(source), dict(source)
    path = Path(source)
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if "model_config" not in ckpt or "model" not in ckpt:
            raise ValueError(f"{path} is not a codec training checkpoint (no model/model_config)")
        model = build_snac(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
        return model, dict(ckpt["model_config"])
    if path.is_dir():
        if not (path / "config.json").is_file() or not (path / "pytorch_model.bin").is_file():
            raise ValueError(f"{path} must hold config.json and pytorch_model.bin")
        config = json.loads((path / "config.json").read_text())
        return SNAC.from_pretrained(str(path)).train(), config
    text = str(source)
    if text.startswith(("/", ".", "~")) or text.count("/") != 1 or text.endswith(".pt"):
        raise ValueError(f"{source}: no such file or directory (nor an owner/name hub id)")
    from huggingface_hub import hf_hub_download

    config = json.loads(Path(hf_hub_download(repo_id=text, filename="config.json")).read_text())
    return SNAC.from_pretrained(text).train(), config


def freeze_encoder_and_quantizer(model: SNAC) -> None:
    model.encoder.requires_grad_(False)
    model.quantizer.requires_grad_(False)


def export_codec(model: SNAC, config: dict, out_dir: str | os.PathLike) -> Path:
    """config.json + pytorch_model.bin (what `SNAC.from_pretrained(dir)` loads) + model.safetensors.

    Each file is written to a temp name and renamed, so a crash never leaves a half-written
    export that later loads as garbage.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / ".tmp-export"
    tmp.with_suffix(".json").write_text(json.dumps(config, indent=2))
    os.replace(tmp.with_suffix(".json"), out / "config.json")
    torch.save(state, tmp.with_suffix(".bin"))
    os.replace(tmp.with_suffix(".bin"), out / "pytorch_model.bin")
    save_file(state, str(tmp.with_suffix(".safetensors")))
    os.replace(tmp.with_suffix(".safetensors"), out / "model.safetensors")
    return out


def pad_samples(config: dict) -> int:
    """SNAC's padding grid: hop * lcm(coarsest stride, attention window)."""
    hop = math.prod(config["encoder_rates"])
    return hop * math.lcm(config["vq_strides"][0], config.get("attn_window_size") or 1)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
