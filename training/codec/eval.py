"""Validation for codec training: reconstruction distances on held-out audio + codebook usage.

Metrics (per held-out segment, averaged):
- val/mel      multi-scale mel distance (the training term, lower is better)
- val/stft     multi-resolution STFT distance (lower is better)
- val/si_sdr   scale-invariant SDR in dB (higher is better)
- val/usage_l  fraction of level l's codebook used over the whole validation set
- val/unique_l number of distinct level-l codes over the whole validation set
- val/perplexity_l  exp(entropy) of level l's code histogram: the effective codebook size
- val/chroma   centred-chroma correlation with the original (training/codec/pitch.py; needs
               librosa, the eval extra): whether the notes survive, which mel cannot tell
- val/chroma_bass, val/chroma_upper  the same of the C1-B3 and C4-B7 registers apart (pitch.REGISTERS)
- val/comb_db  the reconstruction's frame-rate comb (dB; the original's is near 0-2)

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


def _pitch_metrics():
    try:
        import librosa  # noqa: F401
    except ImportError:
        return None
    from training.codec import pitch
    return pitch


@torch.no_grad()
def evaluate(model, segments: list[torch.Tensor], recon: ReconstructionLosses,
             codebook_size: int, device: torch.device, seed: int = 0,
             sample_rate: int | None = None, chroma_head=None,
             spectrum_head=None) -> dict[str, float]:
    """segments: (1, 1, T) tensors. Returns {'val/mel': ..., 'val/usage_0': ..., ...}, and
    'val/chroma', 'val/comb_db' when `sample_rate` is given and librosa is installed.
    With the training's chroma head (pitch_head.py): 'val/chroma_kl', its KL on the held-out
    audio, beside 'val/chroma_kl_prior', the KL of the held-out chroma against its own mean
    (what a head that learned nothing from the codes scores): do levels A and B carry pitch?
    With the encoder's spectrum head: 'val/encoder_spectrum', its loss on held-out audio."""
    if not segments:
        return {}
    pitch = _pitch_metrics() if sample_rate else None
    chroma, comb, head_kl, targets, spectrum = [], [], [], [], []
    registers: dict[str, list[float]] = {}
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
            if pitch is not None:
                xa, ya = x[0, 0].cpu().numpy(), y[0, 0].cpu().numpy()
                c = pitch.chroma_correlation(xa, ya, sample_rate)
                if c == c:                                       # NaN: a silent segment
                    chroma.append(c)
                for name, register in pitch.REGISTERS.items():
                    c = pitch.chroma_correlation(xa, ya, sample_rate, register)
                    if c == c:                                   # NaN: a silent register
                        registers.setdefault(name, []).append(c)
                comb.append(pitch.frame_rate_comb(ya, sample_rate,
                                                  sample_rate / int(model.hop_length)))
            if spectrum_head is not None:
                spectrum.append(float(spectrum_head.loss(out.z, x)))
            if chroma_head is not None:
                log_q = chroma_head(out.level_z_q)
                p, mask = chroma_head.target(x, log_q.shape[-1])
                head_kl.append(chroma_head.kl(p, log_q, mask))
                targets.append((p, mask))
            if not codes:
                codes = [[] for _ in out.codes]
            for level, c in enumerate(out.codes):
                codes[level].append(c)
    model.train(was_training)
    metrics = {f"val/{k}": v / len(segments) for k, v in sums.items()}
    if chroma:
        metrics["val/chroma"] = sum(chroma) / len(chroma)
    for name, values in registers.items():
        metrics[f"val/{name}"] = sum(values) / len(values)
    if comb:
        metrics["val/comb_db"] = sum(comb) / len(comb)
    if spectrum:
        metrics["val/encoder_spectrum"] = sum(spectrum) / len(spectrum)
    if head_kl:
        log_mean = chroma_head.prior(targets)
        prior = [chroma_head.kl(p, log_mean.expand_as(p), m) for p, m in targets]
        metrics["val/chroma_kl"] = float(sum(head_kl) / len(head_kl))
        metrics["val/chroma_kl_prior"] = float(sum(prior) / len(prior))
    metrics.update({f"val/{k}": v for k, v in codebook_stats(codes, codebook_size).items()})
    return metrics


@torch.no_grad()
def encoder_spectrum(model, segments: list[torch.Tensor], head, device: torch.device) -> float:
    """The encoder spectrum head's loss on held-out segments (the warm-up's validation)."""
    total = 0.0
    for seg in segments:
        x = seg.to(device)
        total += float(head.loss(model.encoder(model.preprocess(x)), x))
    return total / len(segments)


def collapsed_levels(metrics: dict, threshold: float) -> list[int]:
    """Levels whose validation perplexity is below `threshold` (e.g. stuck on a few codes)."""
    return [int(k.rsplit("_", 1)[1]) for k, v in metrics.items()
            if k.startswith("val/perplexity_") and v < threshold]
