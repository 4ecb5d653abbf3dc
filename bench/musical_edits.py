"""Edits in musical units against the same edits in seconds, on held-out tracks with a beat.

    python bench/musical_edits.py --weights weights/demo/dit --codec weights/demo/codec \\
        --only loop|vary [--tracks 3] [--steps 4,2,2,2]

- loop: `/loop` as it comes (the clip, then a 6.144 s bridge) against `/loop?bars=N` (from the
  first downbeat, whole bars). Across the wrap-around join (the loop's end into its start):
  the seam (eval_continuation's: spectral flux over the 64 ms around the join over the loop's
  median flux), the tempo change between the 8 s before and the 8 s after it, and the beat
  phase error: how far the beats after the join fall from the grid of the beats before it,
  carried on at their tempo (0 = on the grid, 0.5 = on the off-beat). A bar loop joins on a
  downbeat, whose attack the seam measure counts too: the same measure at that downbeat inside
  the input is printed as its reference.
- vary: `/vary?keep=A` against `/vary?keep=beats` on the same chunk: onset alignment F1 (±70 ms,
  mir_eval) of the varied chunk's onsets against the input's beats there, beside the input's
  own onsets (the ceiling).
The held-out tracks are those the demo DiT's card names (never trained on); a track is used if
`audio.analysis` finds a steady beat in the 20 s from 30 s in. Needs the eval extra.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from audio import read_audio
from audio.analysis import NoSteadyBeat, analyze, beat_holds, loop_span
from model.engine import ContinuationEngine, EditRequest

HELD_OUT = ("Crystan-LooseGame-5956bf36e4", "Marine01-211cb02474", "Orbital_Elevator-158008c45d",
            "PsymongO4-4349dd60a5", "beast-of-insanity-158dfdf2cc",
            "breaking_the_chains-85c2a9952e", "brokenlight-953f6ad61b", "music001-5d8a268ff5")
SR = 32000


def flux(x: np.ndarray, hop: int = 512) -> np.ndarray:
    """Positive spectral flux per 16 ms (1024-sample Hann frames), as eval_continuation's."""
    s = torch.stft(torch.as_tensor(x), 1024, hop, window=torch.hann_window(1024),
                   return_complex=True).abs()
    return torch.clamp(s.diff(dim=1), min=0).sum(0).numpy()


def wrap_metrics(loop: np.ndarray) -> tuple[float, float, float]:
    """(seam, tempo change %, beat phase error) across the join from the loop's end to its start."""
    n = 8 * SR
    around = np.concatenate([loop[-SR:], loop[:SR]])
    fl = flux(around)
    at = SR // 512
    seam = float(fl[at - 2: at + 3].max() / (np.median(flux(loop)) + 1e-9))
    try:
        before, after = analyze(loop[-n:], SR), analyze(loop[:n], SR)
    except NoSteadyBeat:
        return seam, float("nan"), float("nan")
    dtempo = abs(after.tempo - before.tempo) / before.tempo * 100
    b = np.asarray(before.beats)
    period = before.period
    grid0 = b[-1] - n / SR                               # last beat before the join, join = 0
    errs = [abs(((t - grid0) / period + 0.5) % 1 - 0.5) for t in after.beats[:4]]
    return seam, dtempo, float(np.median(errs))


def onset_scores(y: np.ndarray, start: int, n: int, beats: np.ndarray) -> tuple[float, float]:
    """(F1, recall) of y's onsets in [start, start + n) against `beats` (seconds), +-70 ms."""
    import librosa
    import mir_eval

    on = librosa.onset.onset_detect(y=y[start: start + n], sr=SR, units="time") + start / SR
    f1, _, recall = mir_eval.onset.f_measure(beats, on, window=0.07)
    return f1, recall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="weights/demo/dit")
    ap.add_argument("--codec", default="weights/demo/codec")
    ap.add_argument("--audio", default="data/corpus/audio")
    ap.add_argument("--only", choices=["loop", "vary"], required=True)
    ap.add_argument("--tracks", type=int, default=3)
    ap.add_argument("--steps", default="4,2,2,2")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    t0 = time.perf_counter()
    engine = ContinuationEngine.load(a.weights, a.codec)
    params = replace(engine.default_params, steps=tuple(int(s) for s in a.steps.split(",")))
    chunk = engine.chunk_samples
    clips = []
    for name in HELD_OUT:
        path = next(Path(a.audio).glob(f"**/{name}.flac"), None)
        if path is None:
            continue
        x = read_audio(path, SR)[30 * SR: 50 * SR]
        try:
            clips.append((name, x, analyze(x, SR)))
        except NoSteadyBeat:
            continue
        if len(clips) == a.tracks:
            break
    print(f"{len(clips)} held-out tracks with a beat: "
          + ", ".join(f"{n} ({an.tempo:.0f} BPM {an.time_signature})" for n, _, an in clips))
    rows: dict[str, list] = {}
    for i, (_, x, an) in enumerate(clips):
        p = replace(params, seed=a.seed + i)
        if a.only == "loop":
            bar = an.beats_per_bar * an.period
            bars = int(np.floor((len(x) / SR - an.downbeats[0] + chunk / SR) / bar))
            s, e = loop_span(an, bars, chunk / SR, chunk / SR)
            clip = x[round(s * SR): round(s * SR) + round((e - s) * SR)]
            for label, audio in (("seconds (as it comes)", x), ("bars (bars=N)", clip)):
                out = engine.loop_batch([torch.from_numpy(audio)], [p])[0].numpy()
                rows.setdefault(label, []).append(wrap_metrics(out))
            # The same measure at that downbeat inside the input: the attack a bar join lands on.
            d = round(s * SR)
            lo = max(0, d - SR)
            fl, at = flux(x[lo: d + SR]), (d - lo) // 512
            rows.setdefault("input at that downbeat", []).append(
                (float(fl[max(0, at - 2): at + 3].max() / (np.median(flux(x)) + 1e-9)),
                 float("nan"), float("nan")))
        else:
            start = 6 * chunk // 4 // engine.codec.pad_samples * engine.codec.pad_samples
            ref = np.array([t for t in an.beats if start / SR <= t < (start + chunk) / SR])
            hold = tuple((round(u * SR), round(v * SR))
                         for u, v in beat_holds(an, start / SR, (start + chunk) / SR))
            rows.setdefault("input (ceiling)", []).append(onset_scores(x, start, chunk, ref))
            for label, keep, held in (("keep=A", 1, ()), ("keep=beats", 0, hold)):
                out = engine.edit_batch([EditRequest(torch.from_numpy(x), start, start + chunk,
                                                     keep, p, hold=held)])[0].numpy()
                rows.setdefault(label, []).append(onset_scores(out, start, chunk, ref))
    if a.only == "loop":
        print(f"{'loop':24s} {'seam (median)':>14s} {'tempo change %':>15s} "
              f"{'beat phase error':>17s}")
        for label, r in rows.items():
            r = np.array(r, dtype=float)
            print(f"{label:24s} {np.nanmedian(r[:, 0]):14.2f} {np.nanmean(r[:, 1]):15.2f} "
                  f"{np.nanmean(r[:, 2]):17.3f}   per track: "
                  + "  ".join(f"{s:.2f}/{d:.1f}/{ph:.2f}" for s, d, ph in r))
    else:
        print(f"{'vary':18s} {'onset F1 vs the input beats':>28s} {'beats with an onset':>20s}")
        for label, r in rows.items():
            r = np.array(r, dtype=float)
            print(f"{label:18s} {r[:, 0].mean():28.3f} {r[:, 1].mean():20.3f}   per track F1: "
                  + " ".join(f"{v:.2f}" for v in r[:, 0]))
    print(f"steps {a.steps}, seeds from {a.seed}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
