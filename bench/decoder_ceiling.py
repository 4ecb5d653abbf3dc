"""Where does a spectral codec lose the notes: in its magnitudes or in its phase? Renders the
held-out segments of `bench/eval_codec.py` several ways and scores each by chroma, of all
octaves and of the bass (C1-B3) and upper (C4-B7) registers apart (docs/codec-training.md §10):

    python bench/decoder_ceiling.py --codec weights/next/codec --segments 2 \
        --out bench/results/decoder_ceiling.json

- `true_mag_gl{N}`: the real STFT magnitudes (the decoder's framing), phase by the decoder's
  Griffin-Lim from random phases, N iterations: the ceiling of a magnitude-only decoder;
- `pred_mag_gl{N}`: the codec's predicted magnitudes, the same Griffin-Lim: what it serves now
  (for a Griffin-Lim decoder);
- `pred_mag_true_phase`: the predicted magnitudes with the real phase (an oracle);
- `pred_mag_true_frequency`: the predicted magnitudes with phase integrated (as a decoder with
  phase = "frequency" does) from the real instantaneous frequency of every bin (an oracle:
  what a perfect frequency head would give those magnitudes);
- `codec`: the codec's own decode.
Needs the eval extra (librosa). A codec of any phase mode works; the decoder must be an
inverse-STFT one (model/vocoder.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from model.codec import Codec
from model.vocoder import render_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_codec import held_out_segments  # noqa: E402


def true_frequency(spectrum: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(B, F, T) complex STFT -> each bin's instantaneous frequency (rad / sample) from the
    phase advance between consecutive frames, taken nearest the bin's own centre."""
    k = torch.arange(spectrum.shape[1], device=spectrum.device).view(1, -1, 1).float()
    centre = 2 * math.pi * k / n_fft
    advance = spectrum.angle().diff(dim=2) - hop * centre
    advance = torch.remainder(advance + math.pi, 2 * math.pi) - math.pi
    omega = advance / hop + centre
    return torch.cat([omega[..., :1], omega], dim=-1)


def render(decoder, log_mag: torch.Tensor, second: torch.Tensor, **options) -> torch.Tensor:
    """decoder.render with some render options changed for this call only."""
    with render_options(decoder, **options):
        return decoder.render(log_mag, second)


@torch.no_grad()
def renderings(codec: Codec, x: np.ndarray, gl_iters: list[int]) -> dict[str, np.ndarray]:
    snac, dec = codec.snac, codec.snac.decoder
    n = len(x)
    xt = torch.from_numpy(np.asarray(x, np.float32)).view(1, 1, -1)
    real = dec.analysis(xt)
    codes = codec.encode(xt[:, 0])
    log_mag, second = dec.spectrum(snac.quantizer.from_codes(codes))
    frames = min(log_mag.shape[-1], real.shape[-1])
    real, log_mag, second = real[..., :frames], log_mag[..., :frames], second[..., :frames]
    true_log = real.abs().clamp(min=1e-7).log()
    out = {}
    for it in gl_iters:
        gl = dict(phase="griffin_lim", gl_init="random", gl_iters=it)
        out[f"true_mag_gl{it}"] = render(dec, true_log, real.angle(), **gl)
        out[f"pred_mag_gl{it}"] = render(dec, log_mag, real.angle(), **gl)
    out["pred_mag_true_phase"] = dec.synthesize(log_mag, real.angle())
    omega = true_frequency(real, dec.cfg.n_fft, dec.cfg.hop)
    out["pred_mag_true_frequency"] = render(dec, log_mag, omega, phase="frequency")
    out["codec"] = codec.decode(codes)[None]
    return {k: v.reshape(-1)[:n].numpy() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", required=True, help="codec directory with an inverse-STFT decoder")
    p.add_argument("--corpus", nargs="+", default=["data/corpus/manifest.jsonl"])
    p.add_argument("--audio", nargs="+", help="every file here instead of the held-out split")
    p.add_argument("--val-files", type=int, default=8, help="the trainer's val_files")
    p.add_argument("--segments", type=int, default=2, help="segments per held-out track")
    p.add_argument("--gl-iters", type=int, nargs="+", default=[16, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the JSON result here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from training.codec import pitch

    codec = Codec.load(a.codec)
    if not hasattr(codec.snac.decoder, "spectrum"):
        raise SystemExit(f"error: {a.codec}'s decoder is not an inverse-STFT decoder "
                         f"({codec.decoder_name}); this probe needs its spectrum")
    sr, n = codec.sample_rate, codec.samples_per_chunk
    segments = held_out_segments(a.audio or a.corpus, a.val_files, a.segments, n, sr,
                                 every_file=bool(a.audio))
    rows = []
    for i, (name, start, x) in enumerate(segments):
        scores = {}
        for k, y in renderings(codec, x, a.gl_iters).items():
            scores[k] = pitch.chroma_correlation(x, y, sr)
            for reg, register in pitch.REGISTERS.items():     # the bass and upper registers
                scores[f"{k}:{reg}"] = pitch.chroma_correlation(x, y, sr, register)
        rows.append({"track": name, "start_s": round(start, 2), **scores})
        print(f"segment {i + 1}/{len(segments)} {name}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if ":" not in k),
              file=sys.stderr)
    keys = [k for k in rows[0] if k not in ("track", "start_s")]
    # a register a segment has no loud frames in scores NaN there: averaged over the rest
    mean = {k: round(float(np.nanmean([r[k] for r in rows])), 4) for k in keys}
    chroma = {k: v for k, v in mean.items() if ":" not in k}
    result = {"codec": a.codec, "segments": len(rows), "chroma": chroma,
              **{reg: {k: mean[f"{k}:{reg}"] for k in chroma} for reg in pitch.REGISTERS},
              "rows": rows}
    regs = list(pitch.REGISTERS)
    print(f"{'rendering':26s} chroma  " + "  ".join(regs))
    print("\n".join(f"{k:26s} {v:.3f}   " + "  ".join(f"{mean[f'{k}:{r}']:.3f}".ljust(len(r))
                                                      for r in regs)
                    for k, v in chroma.items()))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
