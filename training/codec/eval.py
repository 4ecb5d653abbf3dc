"""Validation for codec training: reconstruction distances on held-out audio + codebook usage.

Metrics (per held-out segment, averaged):
- val/mel      multi-scale mel distance (the training term, lower is better)
- val/stft     multi-resolution STFT distance (lower is better)
- val/si_sdr   scale-invariant SDR in dB (higher is better)
- val/usage_l  fraction of level l's codebook used over the whole validation set
- val/unique_l number of distinct level-l codes over the whole validation set
- val/perplexity_l  exp(entropy) of level l's code histogram: the effective codebook size

Decoding injects noise (SNAC's NoiseBlocks), so validation runs under a forked, fixed-seed RNG:
the numbers are comparable between evaluations and training's RNG stream is left untouched
(a resumed run stays bit-identical whether or not it validated).
"""

from __future__ import annotations

import torch

from training.codec.losses import ReconstructionLosses, si_sdr
from training.codec.model import codec_forward


def codebook_stats(codes: list[list[torch.Tensor]], codebook_size: int) -> dict[str, float]:
    """codes: per level, a list of (B, n) LongTensors -> usage fraction and perplexity per level."""
    out = {}
    for level, chunks in enumerate(codes):
        counts = torch.bincount(torch.cat([c.reshape(-1).cpu() for c in chunks]),
                                minlength=codebook_size).double()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        out[f"usage_{level}"] = float((counts > 0).sum() / codebook_size)
        out[f"unique_{level}"] = int((counts > 0).sum())
        out[f"perplexity_{level}"] = float(entropy.exp())
    return out


@torch.no_grad()
def evaluate(model, segments: list[torch.Tensor], recon: ReconstructionLosses,
             codebook_size: int, device: torch.device, seed: int = 0) -> dict[str, float]:
    """segments: (1, 1, T) tensors. Returns {'val/mel': ..., 'val/usage_0': ..., ...}."""
    if not segments:
        return {}
    was_training = model.training
    model.eval()
    sums = {"mel": 0.0, "stft": 0.0, "si_sdr": 0.0}
    codes: list[list[torch.Tensor]] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for seg in segments:
            x = seg.to(device)
            out = codec_forward(model, x)
            y = out.audio.float()
            terms = recon(y, x)
            sums["mel"] += float(terms["mel"])
            sums["stft"] += float(terms["stft"])
            sums["si_sdr"] += float(si_sdr(y, x).mean())
            if not codes:
                codes = [[] for _ in out.codes]
            for level, c in enumerate(out.codes):
                codes[level].append(c)
    model.train(was_training)
    metrics = {f"val/{k}": v / len(segments) for k, v in sums.items()}
    metrics.update({f"val/{k}": v for k, v in codebook_stats(codes, codebook_size).items()})
    return metrics


def collapsed_levels(metrics: dict, threshold: float) -> list[int]:
    """Levels whose validation perplexity is below `threshold` (e.g. stuck on a few codes)."""
    return [int(k.rsplit("_", 1)[1]) for k, v in metrics.items()
            if k.startswith("val/perplexity_") and v < threshold]
