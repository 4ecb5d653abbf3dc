"""Are a codec's codes carrying pitch? Two probes that decide whether its tokens can be kept
when the decoder is rebuilt (docs/codec-training.md, "Do the codes carry pitch?").

    python bench/codes_pitch_probe.py --codec weights/demo/codec --corpus data/corpus/manifest.jsonl \
        --out bench/results/codes_pitch_probe.json

(a) Synthetic tones: harmonic tones at 24 pitches (MIDI 48-71), one amplitude envelope, each
    rendered with several random sets of harmonic phases (and levels). Features per frame: each
    level's quantised latent (its codebook vector through out_proj, held over its stride), their
    sum (what the decoder sees), the encoder's continuous output, and as a control a
    128-band log mel of the tone itself (which must score near 1, or the probe is blind). A linear probe (logistic
    regression) learns pitch class from the frames of some phase sets and is scored on frames of
    other phase sets: chance 1/12. Nearest neighbour of each tone's pooled features (mean + std
    over frames) against another phase set: chance 1/24.
(b) Real music: a ridge probe at the codec's frame rate (83.3 Hz; 5 stacked frames) from the
    summed quantised latents (and from the encoder's continuous output: is pitch lost by the
    encoder or by the quantiser?) to the original's 12-bin chroma and to its fine log magnitude
    (0-4 kHz, 20.8 Hz bins), trained on segments of the training tracks and scored on the
    held-out ones; against the same probe fed only a 16-band envelope of the original (what
    envelope-shaped noise knows) and a 128-band log mel (a ceiling that does see partials).
    Chroma three ways: all octaves (the judge's), the bass register alone (C1-B3) and the rest
    (C4-B7), with a bass control that resolves bass notes (30-520 Hz of an n_fft 8192 STFT).
    Score: R^2 on held-out frames, and for chroma the centred cosine per frame.
The codes carry pitch if the latents beat the 16-band envelope clearly on both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from audio import probe, read_audio
from model.codec import Codec
from training.codec.data import find_audio_files, split_train_val

SR = 32000


@torch.no_grad()
def latents(codec: Codec, x: np.ndarray) -> dict[str, np.ndarray]:
    """(T,) audio -> per-frame features (frames, dim) at the hop rate: 'encoder', 'level_L'
    and 'sum' (the decoder's input)."""
    snac = codec.snac
    t = torch.from_numpy(np.asarray(x, np.float32)).view(1, 1, -1)
    t = snac.preprocess(t)
    z = snac.encoder(t)
    out = {"encoder": z[0].T.numpy()}
    residual, total = z, 0
    for level, vq in enumerate(snac.quantizer.quantizers):
        zq, _ = vq(residual)                     # snac's own residual loop, level by level
        out[f"level_{level}"] = zq[0].T.numpy()
        total = total + zq
        residual = residual - zq
    out["sum"] = total[0].T.numpy()
    return out


def tone(midi: int, phases: np.ndarray, gains: np.ndarray, seconds: float = 2.304) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    x = sum(g * np.sin(2 * np.pi * f0 * (k + 1) * t + ph) / (k + 1)
            for k, (ph, g) in enumerate(zip(phases, gains, strict=True)) if f0 * (k + 1) < 8000)
    env = np.minimum(1, t / 0.05) * np.exp(-0.6 * t)               # one envelope for all
    return (0.25 * x * env / np.abs(x * env).max()).astype(np.float32)


def log_mel(x: np.ndarray, hop: int, n_frames: int, n_mels: int = 128) -> np.ndarray:
    """The probe's control input: a 128-band log mel of the audio itself, which does resolve
    partials. (frames, n_mels) at the codec's hop."""
    import librosa

    m = librosa.feature.melspectrogram(y=x, sr=SR, n_fft=4 * hop, hop_length=hop, n_mels=n_mels)
    m = np.log(m + 1e-8).T
    return np.pad(m, ((0, max(0, n_frames - len(m))), (0, 0)), mode="edge")[:n_frames]


def synthetic_probe(codec: Codec, n_sets: int = 6, seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    pitches = list(range(48, 72))
    feats: dict[str, list] = {}
    labels, sets = [], []
    pooled: dict[str, np.ndarray] = {}
    for s in range(n_sets):
        phases = rng.uniform(0, 2 * np.pi, (len(pitches), 12))
        gains = rng.uniform(0.5, 1.0, (len(pitches), 12))
        for i, m in enumerate(pitches):
            x = tone(m, phases[i], gains[i])
            f = latents(codec, x)
            f["logmel128 (control)"] = log_mel(x, codec.hop_length, f["sum"].shape[0])
            n = f["sum"].shape[0] * 3 // 4                      # the sounding part
            for k, v in f.items():
                feats.setdefault(k, []).append(v[4:n])
                pooled.setdefault(k, np.zeros((n_sets, len(pitches), 2 * v.shape[1])))
                pooled[k][s, i] = np.concatenate([v[4:n].mean(0), v[4:n].std(0)])
            labels.append(np.full(n - 4, m % 12))
            sets.append(np.full(n - 4, s))
    y, g = np.concatenate(labels), np.concatenate(sets)
    test = g >= n_sets - 2                                      # 2 phase sets held out
    out = {}
    for k, parts in feats.items():
        X = StandardScaler().fit(np.concatenate(parts)[~test]).transform(np.concatenate(parts))
        clf = LogisticRegression(max_iter=300, C=1.0).fit(X[~test], y[~test])
        P = pooled[k]
        Pn = (P - P.mean(axis=(0, 1))) / (P.std(axis=(0, 1)) + 1e-8)
        a, b = Pn[0], Pn[1]
        sim = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ \
              (b / np.linalg.norm(b, axis=1, keepdims=True)).T
        out[k] = {"pitch_class_linear": float(clf.score(X[test], y[test])),
                  "pitch_nearest_neighbour": float((sim.argmax(1) == np.arange(len(a))).mean())}
    return {"chance_pitch_class": 1 / 12, "chance_pitch": 1 / 24, "features": out}


def targets(x: np.ndarray, n_frames: int, hop: int) -> dict[str, np.ndarray]:
    """The original's per-frame chroma, fine log magnitude, 16-band and 128-band log mel."""
    import librosa

    S = np.abs(librosa.stft(x, n_fft=4 * hop, hop_length=hop, center=True))[:, :n_frames]
    fine = np.log(S[: int(4000 / (SR / (4 * hop))) + 1] + 1e-5).T
    P = S ** 2
    mel16 = np.log(librosa.feature.melspectrogram(S=P, sr=SR, n_mels=16) + 1e-8).T
    mel128 = np.log(librosa.feature.melspectrogram(S=P, sr=SR, n_mels=128) + 1e-8).T
    from training.codec.pitch import REGISTERS, chroma

    ch = chroma(x, SR, hop=hop)[:, :n_frames].T
    # the same chroma from the bass register alone (C1-B3) and from the rest (C4-B7)
    low = chroma(x, SR, REGISTERS["chroma_bass"], hop)[:, :n_frames].T
    high = chroma(x, SR, REGISTERS["chroma_upper"], hop)[:, :n_frames].T
    # a control that resolves bass notes: log magnitude of a 0.256 s STFT (3.9 Hz bins), 30-520 Hz
    B = np.abs(librosa.stft(x, n_fft=8192, hop_length=hop, center=True))[:, :n_frames]
    bass = np.log(B[int(30 / (SR / 8192)): int(520 / (SR / 8192)) + 1] + 1e-5).T
    n = min(n_frames, fine.shape[0], ch.shape[0], low.shape[0], high.shape[0], bass.shape[0])
    return {"chroma": ch[:n], "chroma_low": low[:n], "chroma_high": high[:n],
            "fine_logmag": fine[:n], "env16": mel16[:n], "mel128": mel128[:n],
            "bass8192": bass[:n]}


CHROMAS = ("chroma", "chroma_low", "chroma_high")


def stack(X: np.ndarray, k: int = 2) -> np.ndarray:
    pad = np.pad(X, ((k, k), (0, 0)), mode="edge")
    return np.concatenate([pad[i: i + len(X)] for i in range(2 * k + 1)], axis=1)


def music_probe(codec: Codec, corpus: list[str], n_val: int, per_track: int, train_tracks: int,
                seconds: float = 6.144) -> dict:
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    files = probe(find_audio_files(corpus))
    train, val = split_train_val(files, n_val)
    step = max(1, len(train) // train_tracks)
    rows = {"train": [], "val": []}
    n = int(seconds * SR)
    for split, chosen in (("train", train[::step][:train_tracks]), ("val", val)):
        for f in chosen:
            audio = read_audio(f.path, SR)
            span = len(audio) - n
            for i in range(per_track):
                s = int(span * (i + 1) / (per_track + 1)) if span > 0 else 0
                x = np.zeros(n, np.float32)
                piece = audio[s: s + n]
                x[: len(piece)] = piece
                feats = latents(codec, x)
                lat = feats["sum"]
                tg = targets(x, lat.shape[0], codec.hop_length)
                m = tg["chroma"].shape[0]
                rms = np.sqrt((x[: m * codec.hop_length].reshape(m, -1) ** 2).mean(1))
                loud = 20 * np.log10(rms + 1e-10) > 20 * np.log10(rms.max() + 1e-10) - 40
                rows[split].append({"sum": lat[:m], "encoder": feats["encoder"][:m], **tg,
                                    "loud": loud})

    def cat(split, key):
        return np.concatenate([r[key] for r in rows[split]])

    def centred_cos(a, b):
        a = a - a.mean(1, keepdims=True)
        b = b - b.mean(1, keepdims=True)
        return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
                                        + 1e-12)).mean())

    out = {}
    loud = cat("val", "loud")
    for inp in ("sum", "encoder", "env16", "mel128", "bass8192"):
        Xtr = np.concatenate([stack(r[inp]) for r in rows["train"]])
        Xva = np.concatenate([stack(r[inp]) for r in rows["val"]])
        sc = StandardScaler().fit(Xtr)
        Xtr, Xva = sc.transform(Xtr), sc.transform(Xva)
        res = {}
        for tgt in CHROMAS + ("fine_logmag",):
            ytr, yva = cat("train", tgt), cat("val", tgt)
            model = Ridge(alpha=10.0).fit(Xtr, ytr)
            pred = model.predict(Xva)
            ss = ((yva - pred) ** 2).sum(0)
            var = ((yva - yva.mean(0)) ** 2).sum(0)
            res[f"{tgt}_r2"] = float(1 - ss.sum() / var.sum())
            if tgt in CHROMAS:
                res[f"{tgt}_centred_cos"] = centred_cos(pred[loud], yva[loud])
        out[inp] = res
    return {"train_segments": len(rows["train"]), "val_segments": len(rows["val"]),
            "inputs": {"sum": "the summed quantised latents (what the decoder sees)",
                       "encoder": "the encoder's continuous output (before quantising)",
                       "env16": "a 16-band log-mel envelope of the original (control)",
                       "mel128": "a 128-band log mel of the original (ceiling)",
                       "bass8192": "30-520 Hz of an n_fft 8192 log STFT of the original "
                                   "(a control that resolves bass notes)"},
            "probes": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", required=True)
    p.add_argument("--corpus", nargs="+", default=["data/corpus/manifest.jsonl"])
    p.add_argument("--val-files", type=int, default=8)
    p.add_argument("--per-track", type=int, default=3)
    p.add_argument("--train-tracks", type=int, default=24)
    p.add_argument("--phase-sets", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-music", action="store_true")
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    codec = Codec.load(a.codec)
    t0 = time.time()
    result = {"codec": a.codec, "codes_fingerprint": codec.codes_fingerprint,
              "synthetic": synthetic_probe(codec, a.phase_sets)}
    if not a.skip_music:
        result["music"] = music_probe(codec, a.corpus, a.val_files, a.per_track, a.train_tracks)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
