"""Held-out quality of a codec, judged by pitch first, beside its floor and ceiling: the
numbers of the codec's targets (docs/codec-training.md, MODEL_CARD.md).

    python bench/eval_codec.py --codec weights/demo/codec --corpus data/corpus/manifest.jsonl \
        --out bench/results/codec_demo_eval.json --samples docs/samples/codec
    python bench/eval_codec.py --codec DIR --audio INDEPENDENT_DIR --seconds 18.432 --segments 1

Pitch (training/codec/pitch.py; needs the eval extra): centred-chroma correlation (of every
octave, and of the bass register C1-B3 and the rest C4-B7 apart), basic-pitch
multi-pitch frame F1, chroma F1 and note-onset F1 against the original's own transcription,
and the frame-rate comb (dB at multiples of the codec's frame rate minus between them). Every
figure is printed for the codec and for the references computed from the same segments:
envelope-shaped noise (40 mel bands, random phase: what a mel target alone can be met by), Opus
at its lowest bitrate, Griffin-Lim of the true STFT magnitudes, and the original. The mel
distance is a guardrail beside them, not the judge. `--audio` evaluates any folder of audio
instead of the trainer's held-out split (e.g. music no codec here was trained on).

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
from training.codec.data import find_audio_files, split_train_val  # noqa: E402
from training.codec.eval import codebook_stats  # noqa: E402
from training.codec.losses import MelLoss, si_sdr  # noqa: E402

SYSTEMS = ("codec", "envelope_noise", "opus", "griffin_lim", "original")
PITCH_KEYS = ("chroma", "chroma_bass", "chroma_upper", "frame_f1", "chroma_f1", "onset_f1",
              "comb_db", "bin_comb_db")


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


def held_out_segments(corpus: list[str], n_val: int, n_seg: int, n_samples: int, sr: int,
                      every_file: bool = False):
    files = probe(find_audio_files(corpus))
    val = files if every_file else split_train_val(files, n_val)[1]
    if not val:
        raise SystemExit("error: no held-out tracks (need at least 2 files, or --audio)")
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


def format_table(table: dict) -> str:
    """The systems as rows, pitch first and mel last (markdown)."""
    keys = [k for k in (*PITCH_KEYS, "mel", "si_sdr") if any(k in m for m in table.values())]
    lines = ["| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for system, m in table.items():
        lines.append(f"| {system} | " + " | ".join(
            f"{m[k]:.3f}" if k in m else "—" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", required=True, help="codec directory (config.json + weights)")
    p.add_argument("--corpus", nargs="+", default=["data/corpus/manifest.jsonl"])
    p.add_argument("--audio", nargs="+", help="evaluate every file here instead of the "
                                              "corpus's held-out split")
    p.add_argument("--seconds", type=float, default=None,
                   help="segment length (default: one chunk, 6.144 s), rounded to the "
                        "codec's padding grid")
    p.add_argument("--no-pitch", action="store_true",
                   help="skip the pitch metrics and their references (no eval extra needed)")
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
    sr = codec.sample_rate
    n = codec.samples_per_chunk if a.seconds is None else codec.padded_length(int(a.seconds * sr))
    segments = held_out_segments(a.audio or a.corpus, a.val_files, a.segments, n, sr,
                                 every_file=bool(a.audio))
    pitch = None
    if not a.no_pitch:
        from training.codec import pitch
    mel = MelLoss(sr)
    frame_rate = sr / codec.hop_length
    n_fft = getattr(getattr(codec.snac.decoder, "cfg", None), "n_fft", None)
    bin_spacing = sr / n_fft if n_fft else None       # an inverse-STFT decoder's bin comb
    rows, codes, recon = [], [[] for _ in range(codec.n_levels)], []
    for i, (name, start, x) in enumerate(segments):
        print(f"segment {i + 1}/{len(segments)}: {name} @ {start:.1f} s", file=sys.stderr)
        xt = torch.from_numpy(x)[None]
        tok = codec.encode(xt)
        y = codec.decode(tok, seed=0)[0, :n]
        for level, t in enumerate(tok):
            codes[level].append(t)
        row = {"track": name, "start_s": round(start, 2)}
        o = None
        if not a.no_opus:
            o, kbps = opus_roundtrip(x, sr)
            row["opus_kbps"] = kbps
        systems = {"codec": y.numpy(), "opus": o, "original": x}
        if pitch is not None:
            systems["envelope_noise"] = pitch.envelope_noise(x, sr, seed=i)
            systems["griffin_lim"] = pitch.griffin_lim(x, sr)
            ref_events = pitch.transcribe(x, sr)
        for system, out in systems.items():
            if out is None:
                continue
            ot = torch.from_numpy(np.asarray(out, np.float32))
            m = {"mel": float(mel(ot.view(1, 1, -1), xt.view(1, 1, -1))),
                 "si_sdr": float(si_sdr(ot.view(1, -1), xt))}
            if pitch is not None:
                m.update(pitch.pitch_metrics(x, out, sr, frame_rate, ref_events, bin_spacing))
            row.update({f"{system}_{k}": v for k, v in m.items()})
        rows.append(row)
        recon.append((f"{name}@{start:.0f}s", x, y.numpy(), o))

    def mean(key):
        vals = [r[key] for r in rows if key in r and r[key] == r[key]]   # NaN: silent segment
        return float(np.mean(vals)) if vals else None

    table = {system: {k: mean(f"{system}_{k}") for k in ("mel", "si_sdr", *PITCH_KEYS)}
             for system in SYSTEMS}
    table = {s_: {k: v for k, v in m.items() if v is not None} for s_, m in table.items()}

    stats = codebook_stats(codes, codec.codebook_size)
    bits = sum(np.log2(codec.codebook_size) * k for k in codec.frames_per_chunk)
    result = {
        "codec": a.codec, "fingerprint": codec.fingerprint,
        "codes_fingerprint": codec.codes_fingerprint,
        "params": sum(p.numel() for p in codec.snac.parameters()),
        "held_out_tracks": sorted({r["track"] for r in rows}), "segments": len(rows),
        "segment_seconds": n / sr, "decoder": codec.decoder_name,
        "table": {k: v for k, v in table.items() if v},
        "codec_mel": mean("codec_mel"), "codec_si_sdr": mean("codec_si_sdr"),
        "codec_kbps": bits / (n / sr) / 1000,
        "opus_mel": mean("opus_mel"), "opus_si_sdr": mean("opus_si_sdr"),
        "opus_kbps": mean("opus_kbps"),
        "unique": [stats[f"unique_{lv}"] for lv in range(codec.n_levels)],
        "perplexity": [round(stats[f"perplexity_{lv}"], 1) for lv in range(codec.n_levels)],
        # what serving pays per chunk (model/engine.py decodes codec.decode_left_pads units of context) ...
        "decode_chunk_with_context_s": decode_seconds(codec, a.repeats,
                                                      codec.decode_left_pads),
        # ... and with the whole 12.288 s context, for reference
        "decode_chunk_with_full_context_s": decode_seconds(codec, a.repeats, None),
        "threads": a.threads, "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "per_segment": rows,
    }
    if result["opus_mel"]:
        result["mel_ratio_to_opus"] = result["codec_mel"] / result["opus_mel"]
    summary = {k: v for k, v in result.items() if k not in ("per_segment", "table")}
    print(json.dumps(summary, indent=2))
    print(format_table(result["table"]))
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
            sheet = [(name, {"original": x, "codec": y, "Opus ~7 kbps": o})
                     for name, x, y, o in picks]
            spectrogram_sheet(out / "spectrograms.png", sheet, sr)
            # where partials show: 0-2 kHz at 7.8 Hz resolution
            spectrogram_sheet(out / "spectrograms_0-2kHz.png", sheet, sr, fmax=2000, nfft=4096)
    return 0


if __name__ == "__main__":
    sys.exit(main())
