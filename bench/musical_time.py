"""How well audio.analysis finds tempo, beats and downbeats, beside librosa's own beat tracker.

    python bench/musical_time.py [--audio data/corpus/audio] [--tracks 8] [--plots DIR]

1. Click tracks of known tempo and metre (80-160 BPM, 3/4 and 4/4, and the same under pink
   noise at -6 dB): tempo error, beat F-measure (mir_eval, +-70 ms), downbeats on the accents.
   Rows: librosa.beat.beat_track as it comes (its default onset envelope at 22.05 kHz) and
   audio.analysis (the refined beats and the tempo fitted through them).
2. Real tracks (the first 30 s of a seeded sample of the corpus): tempo, metre, key, pulse
   clarity, or why no steady beat; seconds per track. --plots draws onset envelope, beats and
   downbeats per track, to check by eye.
Needs the eval extra (mir_eval).
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import numpy as np

from audio import read_audio
from audio.analysis import NoSteadyBeat, analyze

SR = 32000


def clicks(bpm: float, per_bar: int, seconds: float = 20.0, offset: float = 0.5):
    y = np.zeros(int(seconds * SR), np.float32)
    t = np.arange(int(0.03 * SR)) / SR
    times = np.arange(offset, seconds - 0.1, 60 / bpm)
    for i, s in enumerate(times):
        down = i % per_bar == 0
        c = (0.9 if down else 0.4) * np.sin(2 * np.pi * (1500 if down else 1000) * t) \
            * np.exp(-t / 0.008)
        a = int(s * SR)
        y[a:a + len(c)] += c[: len(y) - a]
    return y, times, times[::per_bar]


def pink(n: int, rng) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    spec /= np.sqrt(np.maximum(np.arange(len(spec)), 1))
    x = np.fft.irfft(spec, n)
    return (x / np.abs(x).max()).astype(np.float32)


def synthetic() -> None:
    import librosa
    import mir_eval

    rng = np.random.default_rng(0)
    rows = {"librosa beat_track": [], "audio.analysis": []}
    for bpm in (80, 97, 120, 128, 143, 160):
        for per_bar in (3, 4):
            for noisy in (False, True):
                y, beats, downs = clicks(bpm, per_bar)
                if noisy:
                    y = y + 0.45 * pink(len(y), rng) * np.abs(y).max() / 0.9
                y22 = librosa.resample(y, orig_sr=SR, target_sr=22050)
                tempo, frames = librosa.beat.beat_track(y=y22, sr=22050)
                lb = librosa.frames_to_time(frames, sr=22050)
                rows["librosa beat_track"].append(
                    (abs(float(np.atleast_1d(tempo)[0]) - bpm) / bpm,
                     mir_eval.beat.f_measure(beats, lb), np.nan, np.nan))
                try:
                    a = analyze(y, SR)
                    on = np.mean([np.min(np.abs(downs - d)) < 0.07 for d in a.downbeats])
                    rows["audio.analysis"].append(
                        (abs(a.tempo - bpm) / bpm, mir_eval.beat.f_measure(beats, np.array(a.beats)),
                         on, float(a.beats_per_bar == per_bar)))
                except NoSteadyBeat:
                    rows["audio.analysis"].append((np.nan, 0.0, 0.0, 0.0))
    print(f"click tracks: 6 tempi x (3/4, 4/4) x (clean, pink noise -6 dB) = "
          f"{len(rows['audio.analysis'])} tracks")
    print(f"{'tracker':22s} {'tempo err (max)':>16s} {'within 1 %':>10s} {'beat F':>7s} "
          f"{'downbeats on accents':>21s} {'metre right':>12s}")
    for name, r in rows.items():
        r = np.array(r, dtype=float)
        bars = (f"{np.nanmean(r[:, 2]) * 100:20.0f}% {np.nanmean(r[:, 3]) * 100:11.0f}%"
                if np.isfinite(r[:, 2]).any() else f"{'-':>21s} {'-':>12s}")
        print(f"{name:22s} {np.nanmax(r[:, 0]) * 100:15.2f}% {np.mean(r[:, 0] < 0.01) * 100:9.0f}% "
              f"{np.mean(r[:, 1]):7.3f} {bars}")


def real(folder: str, n: int, plots: str | None) -> None:
    files = sorted(glob.glob(f"{folder}/**/*.flac", recursive=True))
    if not files:
        print(f"no FLAC under {folder}: skipping real tracks")
        return
    pick = np.random.default_rng(1).choice(files, min(n, len(files)), replace=False)
    print(f"\nreal tracks: the first 30 s of {len(pick)} of {len(files)} under {folder}")
    found = 0
    for f in pick:
        y = read_audio(f, SR)[: 30 * SR]
        t0 = time.perf_counter()
        name = "/".join(Path(f).parts[-2:])[:48]
        try:
            a = analyze(y, SR)
            found += 1
            print(f"{name:48s} {a.tempo:6.1f} BPM {a.time_signature} {a.key:9s} "
                  f"pulse {a.pulse:.2f}  {time.perf_counter() - t0:.2f} s")
            if plots:
                _plot(y, a, Path(plots) / (Path(f).stem + ".png"))
        except NoSteadyBeat as e:
            print(f"{name:48s} {str(e)[:70]}  {time.perf_counter() - t0:.2f} s")
    print(f"steady beat found in {found} of {len(pick)}")


def _plot(y, a, path: Path) -> None:
    import librosa
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = librosa.onset.onset_strength(y=y, sr=SR, hop_length=320)
    t = np.arange(len(env)) * 0.01
    fig, ax = plt.subplots(figsize=(14, 2.5))
    ax.plot(t, env, lw=0.6, color="#335")
    for b in a.beats:
        ax.axvline(b, color="#e80", lw=0.5, alpha=0.6)
    for d in a.downbeats:
        ax.axvline(d, color="#c00", lw=1.2)
    ax.set_xlim(0, 12)
    ax.set_title(f"{path.stem}: {a.tempo:.1f} BPM {a.time_signature} {a.key}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--audio", default="data/corpus/audio")
    ap.add_argument("--tracks", type=int, default=8)
    ap.add_argument("--plots", help="folder for onset/beat plots of the real tracks")
    args = ap.parse_args()
    synthetic()
    real(args.audio, args.tracks, args.plots)


if __name__ == "__main__":
    main()
