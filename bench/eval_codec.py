"""Held-out quality of a codec against Opus at its lowest bitrate, plus codebook use and decode
speed: the numbers of the demo codec's targets (docs/codec-training.md, MODEL_CARD.md).

    python bench/eval_codec.py --codec weights/demo/codec --corpus data/corpus/manifest.jsonl \
        --out bench/results/codec_demo_eval.json --samples docs/samples/codec

Held-out tracks are the codec trainer's own split (`split_train_val(files, --val-files)`, a hash
of each path), so a codec trained with `val_files = 8` on the same manifest is evaluated on
exactly the tracks it never saw. From each, `--segments` 6.144 s segments evenly spaced.

Per segment: multi-scale mel distance (DAC's 7 windows 32...2048, L1 of log10 mel, summed:
the training term) and SI-SDR of (a) the codec's reconstruction (encode, then decode with
seed 0) and (b) Opus through libsndfile (OGG/OPUS at 48 kHz, `compression_level=1.0`, its
lowest bitrate; resampled there and back with soxr HQ). Over all segments: each level's
distinct codes and perplexity. Decode speed: one 6.144 s chunk decoded after the 0.768 s of
context tokens serving uses (model/engine.py), and after the whole 12.288 s for reference;
median of `--repeats`, with `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from audio import (
    probe,  # noqa: E402
    read_audio,  # noqa: E402
)
from audio.plots import spectrogram_sheet  # noqa: E402
from model.codec import Codec  # noqa: E402
from model.engine import LEFT_PADS  # noqa: E402
from training.codec.data import find_audio_files, split_train_val  # noqa: E402
from training.codec.eval import codebook_stats  # noqa: E402
from training.codec.losses import MelLoss, si_sdr  # noqa: E402


def opus_roundtrip(x: np.ndarray, sr: int) -> tuple[np.ndarray, float]:
    """(T,) float32 at sr -> (Opus-coded copy at sr, bits per second of the Opus stream)."""
    x48 = soxr.resample(x, sr, 48000, quality="HQ")
    buf = io.BytesIO()
    sf.write(buf, x48, 48000, format="OGG", subtype="OPUS", compression_level=1.0)
    kbps = len(buf.getvalue()) * 8 / (len(x) / sr) / 1000
    buf.seek(0)
    y48, _ = sf.read(buf, dtype="float32")
    y = soxr.resample(y48, 48000, sr, quality="HQ")
    out = np.zeros_like(x)
    out[: min(len(x), len(y))] = y[: len(x)]
    return out, kbps


def track_licences(corpus: list[str]) -> dict[str, str]:
    """file name -> ' (package, licence)' from corpus manifests, where the corpus is one."""
    out = {}
    for src in corpus:
        if src.endswith(".jsonl") and Path(src).is_file():
            for line in Path(src).read_text().splitlines():
                row = json.loads(line)
                if row.get("output_path"):
                    out[Path(row["output_path"]).name] = (
                        f" ({row.get('package', '?')}, {row.get('licence', '?')}; "
                        f"{row.get('licence_file', 'see the corpus manifest')})")
    return out


def held_out_segments(corpus: list[str], n_val: int, n_seg: int, n_samples: int, sr: int):
    files = probe(find_audio_files(corpus))
    _, val = split_train_val(files, n_val)
    if not val:
        raise SystemExit("error: no held-out tracks (need at least 2 files)")
    segments = []
    for f in val:
        audio = read_audio(f.path, sr)
        span = len(audio) - n_samples
        starts = [int(span * (i + 1) / (n_seg + 1)) for i in range(n_seg)] if span > 0 else [0]
        for s in starts:
            seg = np.zeros(n_samples, dtype=np.float32)
            piece = audio[s: s + n_samples]
            seg[: len(piece)] = piece
            segments.append((Path(f.path).name, s / sr, seg))
    return segments


def decode_seconds(codec: Codec, repeats: int, context_pads: int | None) -> float:
    """Median time to decode one chunk after its context: the whole 12.288 s of it
    (context_pads None) or the last `context_pads` padding units, as the engine does."""
    g = torch.Generator().manual_seed(0)
    n = codec.frames_per_chunk
    tok = [torch.randint(0, codec.codebook_size, (1, 3 * k), generator=g) for k in n]
    keep = [2 * k if context_pads is None else context_pads * p
            for k, p in zip(n, codec.pad_frames, strict=True)]
    ctx = [t[:, 2 * k - c: 2 * k] for t, k, c in zip(tok, n, keep, strict=True)]
    target = [t[:, 2 * k:] for t, k in zip(tok, n, strict=True)]
    first = (2 * n[0] - keep[0]) * codec.strides[0]
    times = []
    for _ in range(repeats + 1):                              # the first is a warm-up
        t0 = time.perf_counter()
        codec.decode(target, context=ctx, first_frame=first)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", required=True, help="codec directory (config.json + weights)")
    p.add_argument("--corpus", nargs="+", default=["data/corpus/manifest.jsonl"])
    p.add_argument("--val-files", type=int, default=8, help="the trainer's val_files")
    p.add_argument("--segments", type=int, default=4, help="segments per held-out track")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="decode-speed repeats")
    p.add_argument("--no-opus", action="store_true", help="skip the Opus baseline")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--samples", help="write 3 originals + reconstructions (FLAC) and a "
                                     "spectrogram PNG to this directory")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    codec = Codec.load(a.codec)
    sr, n = codec.sample_rate, codec.samples_per_chunk
    segments = held_out_segments(a.corpus, a.val_files, a.segments, n, sr)
    mel = MelLoss(sr)
    rows, codes, recon = [], [[] for _ in range(codec.n_levels)], []
    for name, start, x in segments:
        xt = torch.from_numpy(x)[None]
        tok = codec.encode(xt)
        y = codec.decode(tok, seed=0)[0, :n]
        for level, t in enumerate(tok):
            codes[level].append(t)
        row = {"track": name, "start_s": round(start, 2),
               "codec_mel": float(mel(y.view(1, 1, -1), xt.view(1, 1, -1))),
               "codec_si_sdr": float(si_sdr(y.view(1, -1), xt))}
        if not a.no_opus:
            o, kbps = opus_roundtrip(x, sr)
            ot = torch.from_numpy(o)
            row.update(opus_mel=float(mel(ot.view(1, 1, -1), xt.view(1, 1, -1))),
                       opus_si_sdr=float(si_sdr(ot.view(1, -1), xt)), opus_kbps=kbps)
        else:
            o = None
        rows.append(row)
        recon.append((f"{name}@{start:.0f}s", x, y.numpy(), o))

    def mean(key):
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else None

    stats = codebook_stats(codes, codec.codebook_size)
    bits = sum(np.log2(codec.codebook_size) * k for k in codec.frames_per_chunk)
    result = {
        "codec": a.codec, "fingerprint": codec.fingerprint,
        "codes_fingerprint": codec.codes_fingerprint,
        "params": sum(p.numel() for p in codec.snac.parameters()),
        "held_out_tracks": sorted({r["track"] for r in rows}), "segments": len(rows),
        "codec_mel": mean("codec_mel"), "codec_si_sdr": mean("codec_si_sdr"),
        "codec_kbps": bits / (n / sr) / 1000,
        "opus_mel": mean("opus_mel"), "opus_si_sdr": mean("opus_si_sdr"),
        "opus_kbps": mean("opus_kbps"),
        "unique": [stats[f"unique_{lv}"] for lv in range(codec.n_levels)],
        "perplexity": [round(stats[f"perplexity_{lv}"], 1) for lv in range(codec.n_levels)],
        # what serving pays per chunk (model/engine.py decodes LEFT_PADS units of context) ...
        "decode_chunk_with_context_s": decode_seconds(codec, a.repeats, LEFT_PADS),
        # ... and with the whole 12.288 s context, for reference
        "decode_chunk_with_full_context_s": decode_seconds(codec, a.repeats, None),
        "threads": a.threads, "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "per_segment": rows,
    }
    if result["opus_mel"]:
        result["mel_ratio_to_opus"] = result["codec_mel"] / result["opus_mel"]
    summary = {k: v for k, v in result.items() if k != "per_segment"}
    print(json.dumps(summary, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    if a.samples:
        out = Path(a.samples)
        out.mkdir(parents=True, exist_ok=True)
        picks = [recon[i] for i in np.linspace(0, len(recon) - 1, 3).round().astype(int)]
        for i, (_name, x, y, _opus) in enumerate(picks):
            sf.write(out / f"{i}_original.flac", x, sr, subtype="PCM_16")
            sf.write(out / f"{i}_codec.flac", np.clip(y, -1, 1), sr, subtype="PCM_16")
        licences = track_licences(a.corpus)
        (out / "README.md").write_text(
            "Held-out 6.144 s segments and their reconstructions by the codec in "
            f"`{a.codec}` (fingerprint `{codec.fingerprint}`), written by `bench/eval_codec.py`. "
            "Excerpts of the corpus tracks named, under those tracks' licences."
            "\n\n" + "\n".join(f"- `{i}_original.flac` / `{i}_codec.flac`: {name}"
                                 + licences.get(name.split("@")[0], "")
                                 for i, (name, *_rest) in enumerate(picks)) + "\n")
        if all(o is not None for *_x, o in picks):
            spectrogram_sheet(out / "spectrograms.png",
                              [(name, {"original": x, "codec": y, "Opus ~7 kbps": o})
                               for name, x, y, o in picks], sr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
