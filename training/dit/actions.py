"""What each learned style action means, measured: `python -m training.dit.actions`.

    python -m training.dit.actions --weights weights/next/dit --codec weights/next/codec \
        --tokens data/tokens_next [--audio data/corpus] [--chunks 400]

A DiT trained with style actions (docs/model.md, "Style actions") mixes K learned styles per
chunk; nothing names them. This reads up to `--chunks` whole chunks of a token directory (a
fixed random draw over all its files), asks the DiT which actions each selects
(`DiT.style_weights`, top-k as served), and measures each chunk's audio: loudness (RMS dBFS),
brightness (spectral centroid), onset density, tempo (audio/analysis.py; chunks without a
steady beat count as such) and register (the CQT-weighted mean pitch). The audio is the
original where `--audio` has the token directory's files, else the codec's decode of the tokens.

Each action is then described by the chunks whose strongest action it is: their share, their
medians, and words for the properties that set them apart from all chunks (z-scores of the
medians against the spread of every chunk), e.g. "loud, busy, low (-13 dBFS, 1.4 kHz, 4.2
onsets/s, 126 BPM, around G2; 18 % of chunks)". It writes, beside the DiT's weights:

- `style_actions.json`: per action its description, share, medians and z-scores, the chunk
  chosen as its example, and how it was measured; the engine reads it into `/info`;
- `actions/action-K.ogg`: that example, the chunk that selects the action most strongly,
  decoded by the codec (what the model hears as that style), rendered once.

Re-running replaces both. An action no chunk selects is reported as unused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from model.style import ACTIONS_FILE, EXAMPLES_DIR, example_file, weights_digest

# property: (words for above / below the whole set, unit formatter)
PROPERTIES = {
    "loudness_db": ("loud", "quiet"),
    "brightness_hz": ("bright", "dark"),
    "onsets_per_s": ("busy", "sparse"),
    "tempo_bpm": ("fast", "slow"),
    "register_midi": ("high", "low"),
}
DISTINCT_Z = 0.5         # a property this many spreads off the set's median gets a word
MAX_WORDS = 3
_NOTES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def note_name(midi: float) -> str:
    m = int(round(midi))
    return f"{_NOTES[m % 12]}{m // 12 - 1}"


def chunk_features(x: np.ndarray, sr: int) -> dict[str, float]:
    """Loudness, brightness, onset density, tempo (NaN without a steady beat) and register of
    one chunk of mono audio."""
    import librosa

    from audio.analysis import NoSteadyBeat, analyze

    x = np.asarray(x, np.float32)
    rms = float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0
    mag = np.abs(librosa.stft(x, n_fft=2048, hop_length=512))
    energy = np.square(mag).sum(0)
    centroid = librosa.feature.spectral_centroid(S=mag, sr=sr)[0]
    onsets = librosa.onset.onset_detect(y=x, sr=sr, hop_length=512, units="time")
    try:
        tempo = float(analyze(x, sr).tempo)
    except NoSteadyBeat:
        tempo = math.nan
    fmin = librosa.note_to_hz("C1")
    cqt = np.abs(librosa.cqt(x, sr=sr, hop_length=1024, fmin=fmin, n_bins=84))
    weight = cqt.sum(1)
    midi = 24 + np.arange(len(weight))
    return dict(
        loudness_db=20 * math.log10(max(rms, 1e-6)),
        brightness_hz=float(np.average(centroid, weights=energy + 1e-12)),
        onsets_per_s=len(onsets) / (len(x) / sr),
        tempo_bpm=tempo,
        register_midi=float(np.average(midi, weights=weight + 1e-12)),
    )


def _spread(values: np.ndarray) -> float:
    """A robust standard deviation (interquartile range / 1.349), never 0."""
    q1, q3 = np.nanpercentile(values, [25, 75])
    return max(float(q3 - q1) / 1.349, 1e-6)


def describe_actions(weights: np.ndarray, features: list[dict]) -> list[dict]:
    """weights (N, K): each chunk's mix over the actions; features: N chunks' properties.
    Each action is described by the chunks whose strongest action it is."""
    n, k = weights.shape
    table = {p: np.array([f[p] for f in features], float) for p in PROPERTIES}
    centre = {p: float(np.nanmedian(v)) if np.isfinite(v).any() else math.nan
              for p, v in table.items()}
    spread = {p: _spread(v) if np.isfinite(v).any() else math.nan for p, v in table.items()}
    dominant = weights.argmax(1)
    out = []
    for a in range(k):
        mine = dominant == a
        entry = dict(action=a, share=round(float(mine.mean()), 4), chunks=int(mine.sum()),
                     mean_weight=round(float(weights[:, a].mean()), 4))
        if not mine.any():
            entry.update(description="unused: no chunk of the measured set selects it",
                         medians=None, z=None, beat_share=None)
            out.append(entry)
            continue
        medians, z = {}, {}
        for p, v in table.items():
            vals = v[mine]
            finite = vals[np.isfinite(vals)]
            medians[p] = round(float(np.median(finite)), 3) if len(finite) else None
            z[p] = (round((medians[p] - centre[p]) / spread[p], 3)
                    if medians[p] is not None and np.isfinite(spread[p]) else None)
        beat_share = float(np.isfinite(table["tempo_bpm"][mine]).mean())
        words = [PROPERTIES[p][0 if z[p] > 0 else 1]
                 for p in sorted((p for p in z if z[p] is not None and abs(z[p]) >= DISTINCT_Z),
                                 key=lambda p: -abs(z[p]))][:MAX_WORDS]
        entry.update(description=_text(words, medians, beat_share, entry["share"]),
                     medians=medians, z=z, beat_share=round(beat_share, 3))
        out.append(entry)
    return out


def _text(words: list[str], m: dict, beat_share: float, share: float) -> str:
    parts = [f"{m['loudness_db']:.0f} dBFS", f"{m['brightness_hz'] / 1000:.1f} kHz",
             f"{m['onsets_per_s']:.1f} onsets/s"]
    if m["tempo_bpm"] is not None and beat_share >= 0.5:
        parts.append(f"{m['tempo_bpm']:.0f} BPM")
    else:
        parts.append("mostly no steady beat")
    parts.append(f"around {note_name(m['register_midi'])}")
    head = ", ".join(words) if words else "like the set as a whole"
    return f"{head} ({', '.join(parts)}; {100 * share:.0f} % of chunks)"


def read_chunks(token_dir: Path, max_chunks: int, seed: int = 0):
    """Up to max_chunks whole chunks (path, index, per-level arrays) of every file, train and
    val alike, drawn at random with a fixed seed, in file order."""
    from training.tokens import shards

    manifest = shards.read_manifest(token_dir)
    fpc = manifest["codec"]["geometry"]["frames_per_chunk"]
    found = []
    for e in manifest["files"]:
        levels = shards.file_tokens(token_dir, manifest, e)
        n = min(len(t) // f for t, f in zip(levels, fpc, strict=True))
        found += [(e["path"], c, levels) for c in range(n)]
    if not found:
        raise SystemExit(f"error: {token_dir} holds no whole chunk")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(found), size=min(max_chunks, len(found)), replace=False))
    out = []
    for i in pick:
        path, c, levels = found[i]
        out.append((path, c, [np.asarray(t[c * f:(c + 1) * f], np.int64)
                              for t, f in zip(levels, fpc, strict=True)]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.dit.actions",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="an exported DiT with style actions")
    p.add_argument("--codec", required=True, help="the codec its tokens come from")
    p.add_argument("--tokens", required=True, help="a token directory of that codec")
    p.add_argument("--audio", help="where the token directory's audio files are (else decoded)")
    p.add_argument("--chunks", type=int, default=400, help="chunks to measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.chunks < 1:
        p.error("--chunks must be >= 1")
    import soundfile as sf
    import torch

    from audio.files import read_audio
    from model.codec import Codec
    from model.weights import load_dit

    torch.set_num_threads(a.threads)
    dit = load_dit(a.weights)
    if not dit.config.style_actions:
        raise SystemExit(f"error: {a.weights} has no style actions (trained without them): "
                         "nothing to describe")
    from model.weights import CodecLoadError
    from training.tokens.shards import ManifestError, read_manifest, same_codes

    try:
        codec = Codec.load(a.codec)
        made_by = read_manifest(a.tokens)["codec"]
    except (CodecLoadError, ManifestError) as e:
        raise SystemExit(f"error: {e}") from None
    if not same_codes(made_by, codec.fingerprint, codec.codes_fingerprint):
        raise SystemExit(f"error: {a.tokens} holds the codes of codec {made_by['fingerprint']} "
                         f"({made_by.get('source')}), not of {a.codec}: describe the actions "
                         "with the codec the DiT was trained on")
    sr, n = codec.sample_rate, codec.samples_per_chunk
    rows, weights, audios = [], [], {}
    chunks = read_chunks(Path(a.tokens), a.chunks, a.seed)
    for i, (path, c, levels) in enumerate(chunks):
        tokens = [torch.from_numpy(t)[None] for t in levels]
        with torch.no_grad():
            w = dit.style_weights(tokens).float()[0].numpy()
        source = "decoded"
        x = None
        if a.audio and (Path(a.audio) / path).is_file():
            if path not in audios:
                audios = {path: read_audio(Path(a.audio) / path, sr)}   # one file at a time
            seg = audios[path][c * n:(c + 1) * n]
            if len(seg) == n:
                x, source = seg, "original"
        if x is None:
            with torch.no_grad():
                x = codec.decode(tokens)[0].numpy()
        rows.append(dict(path=path, chunk=c, audio=source, **chunk_features(x, sr)))
        weights.append(w)
        if (i + 1) % 25 == 0 or i + 1 == len(chunks):
            print(f"measured {i + 1}/{len(chunks)} chunks", file=sys.stderr, flush=True)
    weights = np.stack(weights)
    actions = describe_actions(weights, rows)
    out_dir = Path(a.weights)
    (out_dir / EXAMPLES_DIR).mkdir(exist_ok=True)
    for entry in actions:
        target = example_file(out_dir, entry["action"])
        target.unlink(missing_ok=True)
        mine = np.flatnonzero(weights.argmax(1) == entry["action"])
        if not len(mine):
            entry["example"] = None
            continue
        best = int(mine[weights[mine, entry["action"]].argmax()])
        path, c, levels = chunks[best]
        with torch.no_grad():
            y = codec.decode([torch.from_numpy(t)[None] for t in levels])[0].numpy()
        peak = float(np.abs(y).max())
        sf.write(target, y / max(peak / 0.9, 1.0), sr, format="OGG", subtype="VORBIS")
        entry["example"] = dict(file=f"{EXAMPLES_DIR}/{target.name}", path=path, chunk=c,
                                weight=round(float(weights[best, entry["action"]]), 4))
    result = dict(
        weights=str(a.weights), weights_sha256=weights_digest(a.weights), codec=str(a.codec),
        codec_fingerprint=codec.fingerprint,
        tokens=str(a.tokens), chunks=len(rows),
        audio=dict(original=sum(r["audio"] == "original" for r in rows),
                   decoded=sum(r["audio"] == "decoded" for r in rows)),
        method=("each action described by the chunks whose strongest action it is (top-k "
                "weights as served); medians against all measured chunks, z in robust spreads "
                f"(IQR / 1.349), words for |z| >= {DISTINCT_Z}"),
        actions=actions)
    (out_dir / ACTIONS_FILE).write_text(json.dumps(result, indent=1))
    for entry in actions:
        print(f"action {entry['action']}: {entry['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
