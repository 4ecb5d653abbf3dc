"""Does a reconstruction keep the notes? Pitch metrics for judging a codec, and the reference
signals that give each figure its floor and ceiling.

A mel distance can be met by envelope-shaped noise (the first demo codec did exactly that), so a
codec is judged by what a listener hears as music:

- `chroma_correlation`: librosa's CQT chroma (hop 1024) of original and reconstruction, each
  frame centred (minus its mean over the 12 bins, so a flat "every class at once" frame scores
  0, not 1), cosine per frame, averaged over the frames within 40 dB of the original's loudest.
- `transcription_scores`: both signals transcribed by basic-pitch (its ICASSP-2022 model runs
  from the ONNX file inside its wheel, on onnxruntime: no TensorFlow, nothing downloaded); the
  original's transcription is the reference. Multi-pitch frame F1 and chroma F1
  (`mir_eval.multipitch`, on a 10 ms grid) and note-onset F1 (`mir_eval.transcription`, 50 ms).
- `frame_rate_comb`: the long-term spectrum (Welch, 1 Hz bins) in dB at k x f0 minus at
  (k + 1/2) x f0 for k = 1..24, averaged; f0 = the codec's frame rate (83.33 Hz for hop 384 at
  32 kHz). A decoder that buzzes at its frame rate shows a positive comb the original lacks.
  The same measure at an inverse-STFT decoder's bin spacing (sr / n_fft, 20.8 Hz for n_fft
  1536; k = 1..96, up to 2 kHz) catches a decoder that renders every bin as a steady tone at
  its centre frequency (a drone the frame-rate comb cannot see): `bin_comb_db`.

References (`envelope_noise`, `griffin_lim`): noise with the original's 40-band mel envelope
and random phase (what a mel target alone can be met by), and Griffin-Lim of the original's true
STFT magnitudes (what magnitudes alone keep).

These need the `eval` extra (librosa, mir_eval, onnxruntime) plus `basic-pitch` installed
without its dependencies (it asks for TensorFlow, which the ONNX path does not need):
`make install` does both. Nothing here runs in serving.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from functools import cache
from pathlib import Path

import numpy as np

CHROMA_HOP = 1024
LOUDNESS_FLOOR_DB = 40.0
COMB_HARMONICS = 24
BIN_COMB_HZ = 2000.0          # the bin comb looks at the partials' range, 0-2 kHz
MULTIPITCH_HOP_S = 0.01


def _librosa():
    import librosa
    return librosa


# ---------------------------------------------------------------------------- chroma
# Registers for the split chroma (first octave's C, octaves): the bass, where a semitone is
# narrower than an STFT bin of the codecs here, and the rest
REGISTERS = {"chroma_bass": ("C1", 3), "chroma_upper": ("C4", 4)}
# where the bass register ends: half a semitone under C4 (MIDI 60), B3's upper edge
BASS_TOP_HZ = 440.0 * 2 ** ((60 - 0.5 - 69) / 12)                     # 254.2 Hz


def chroma(x: np.ndarray, sr: int, register: tuple[str, int] | None = None,
           hop: int = CHROMA_HOP) -> np.ndarray:
    """(T,) audio -> (12, F) CQT chroma at `hop`, of every octave from C1 (librosa's default,
    7 octaves) or of one register (its first C, octaves)."""
    lib = _librosa()
    extra = {} if register is None else dict(fmin=lib.note_to_hz(register[0]),
                                             n_octaves=register[1])
    return lib.feature.chroma_cqt(y=np.asarray(x, np.float32), sr=sr, hop_length=hop, **extra)


def loud_frames(x: np.ndarray, n_frames: int, floor_db: float = LOUDNESS_FLOOR_DB) -> np.ndarray:
    """Boolean (n_frames,): frames of x (hop CHROMA_HOP) within `floor_db` of its loudest."""
    rms = _librosa().feature.rms(y=np.asarray(x, np.float32), frame_length=2 * CHROMA_HOP,
                                 hop_length=CHROMA_HOP)[0]
    rms = np.pad(rms, (0, max(0, n_frames - len(rms))))[:n_frames]
    db = 20 * np.log10(np.maximum(rms, 1e-10))
    return db >= db.max() - floor_db


def chroma_correlation(x: np.ndarray, y: np.ndarray, sr: int,
                       register: tuple[str, int] | None = None) -> float:
    """Mean over the original's loud frames of the cosine between centred chroma vectors.
    1 = the same pitch classes in the same proportions; ~0 = unrelated (or flat). NaN when x is
    silent. `register`: the chroma of one register only (REGISTERS)."""
    n = min(len(x), len(y))
    cx, cy = chroma(x[:n], sr, register), chroma(y[:n], sr, register)
    f = min(cx.shape[1], cy.shape[1])
    cx, cy = cx[:, :f], cy[:, :f]
    cx = cx - cx.mean(axis=0, keepdims=True)
    cy = cy - cy.mean(axis=0, keepdims=True)
    den = np.linalg.norm(cx, axis=0) * np.linalg.norm(cy, axis=0)
    cos = np.where(den > 1e-12, (cx * cy).sum(axis=0) / np.maximum(den, 1e-12), 0.0)
    keep = loud_frames(x[:n], f) & (np.linalg.norm(cx, axis=0) > 1e-12)
    if np.abs(x).max() == 0 or not keep.any():
        return float("nan")
    return float(cos[keep].mean())


# ---------------------------------------------------------------------------- transcription
@cache
def _basic_pitch_model():
    """basic-pitch's ICASSP-2022 model from the ONNX file in its wheel."""
    logging.getLogger().setLevel(logging.ERROR)     # it warns about every missing TF backend
    try:
        from basic_pitch import inference
    except ImportError as e:
        raise ImportError(
            "the transcription metrics need basic-pitch and its light dependencies: "
            "pip install -e '.[eval]' && pip install --no-deps basic-pitch==0.4.0 "
            "(make install does both)") from e
    path = Path(inference.ICASSP_2022_MODEL_PATH)
    onnx = path if path.suffix == ".onnx" else path.with_suffix(".onnx")
    return inference, inference.Model(onnx)


def transcribe(x: np.ndarray, sr: int) -> list[tuple[float, float, int]]:
    """(T,) audio -> note events (start s, end s, MIDI pitch) by basic-pitch, default thresholds."""
    import soundfile as sf

    inference, model = _basic_pitch_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.wav")
        sf.write(path, np.clip(np.asarray(x, np.float32), -1, 1), sr, subtype="FLOAT")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")                  # and its "Predicting MIDI" line
            _, _, events = inference.predict(path, model)
    return [(float(s), float(e), int(p)) for s, e, p, *_ in events]


def _frames(events, duration: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Note events -> mir_eval multipitch format: times on a 10 ms grid, Hz per frame."""
    times = np.arange(0, duration, MULTIPITCH_HOP_S)
    freqs: list[list[float]] = [[] for _ in times]
    for s, e, p in events:
        hz = 440.0 * 2 ** ((p - 69) / 12)
        for i in range(int(np.ceil(s / MULTIPITCH_HOP_S)), min(len(times),
                                                               int(e / MULTIPITCH_HOP_S) + 1)):
            freqs[i].append(hz)
    return times, [np.array(f) for f in freqs]


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def transcription_scores(ref_events, est_events, duration: float) -> dict[str, float] | None:
    """Frame F1, chroma F1 (multi-pitch) and onset F1 of est against ref; None when the
    reference has no notes (nothing to score)."""
    import mir_eval

    if not ref_events:
        return None
    rt, rf = _frames(ref_events, duration)
    et, ef = _frames(est_events, duration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp = mir_eval.multipitch.evaluate(rt, rf, et, ef)
    out = {"frame_f1": _f1(mp["Precision"], mp["Recall"]),
           "chroma_f1": _f1(mp["Chroma Precision"], mp["Chroma Recall"])}
    if est_events:
        ri = np.array([[s, max(e, s + 0.01)] for s, e, _ in ref_events])
        ei = np.array([[s, max(e, s + 0.01)] for s, e, _ in est_events])
        rp = 440.0 * 2 ** ((np.array([p for *_, p in ref_events]) - 69) / 12)
        ep = 440.0 * 2 ** ((np.array([p for *_, p in est_events]) - 69) / 12)
        _, _, f, _ = mir_eval.transcription.precision_recall_f1_overlap(
            ri, rp, ei, ep, offset_ratio=None)
        out["onset_f1"] = float(f)
    else:
        out["onset_f1"] = 0.0
    return {k: float(v) for k, v in out.items()}


# ---------------------------------------------------------------------------- comb
def frame_rate_comb(x: np.ndarray, sr: int, frame_rate: float,
                    harmonics: int = COMB_HARMONICS) -> float:
    """Mean dB of the long-term spectrum at k * frame_rate minus at (k + 1/2) * frame_rate."""
    from scipy.signal import welch

    x = np.asarray(x, np.float64)
    nper = min(len(x), sr)                                    # 1 Hz bins when x is >= 1 s
    f, p = welch(x, fs=sr, nperseg=nper)
    db = 10 * np.log10(np.maximum(p, 1e-20))
    at = lambda hz: db[int(np.argmin(np.abs(f - hz)))]        # noqa: E731
    ks = [k for k in range(1, harmonics + 1) if (k + 0.5) * frame_rate < sr / 2]
    return float(np.mean([at(k * frame_rate) - at((k + 0.5) * frame_rate) for k in ks]))


# ---------------------------------------------------------------------------- references
def envelope_noise(x: np.ndarray, sr: int, n_mels: int = 40, n_fft: int = 2048,
                   hop: int = 512, seed: int = 0) -> np.ndarray:
    """Noise with x's 40-band mel envelope per frame and random phase: what a mel target alone
    can be met by."""
    librosa = _librosa()
    X = librosa.stft(np.asarray(x, np.float32), n_fft=n_fft, hop_length=hop)
    mel = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)       # (M, F)
    band = mel @ (np.abs(X) ** 2) / np.maximum(mel.sum(axis=1, keepdims=True), 1e-12)
    weight = mel / np.maximum(mel.sum(axis=0, keepdims=True), 1e-12)    # bins share their bands
    power = weight.T @ band
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, X.shape)
    y = librosa.istft(np.sqrt(power) * np.exp(1j * phase), hop_length=hop, length=len(x))
    return y.astype(np.float32)


def griffin_lim(x: np.ndarray, sr: int, n_fft: int = 2048, hop: int = 512,
                n_iter: int = 32) -> np.ndarray:
    """x rebuilt from its true STFT magnitudes alone (Griffin-Lim, fixed seed)."""
    librosa = _librosa()
    S = np.abs(librosa.stft(np.asarray(x, np.float32), n_fft=n_fft, hop_length=hop))
    return librosa.griffinlim(S, n_iter=n_iter, hop_length=hop, length=len(x),
                              random_state=0).astype(np.float32)


def pitch_metrics(x: np.ndarray, y: np.ndarray, sr: int, frame_rate: float,
                  ref_events=None, bin_spacing: float | None = None) -> dict[str, float]:
    """Every pitch figure of y against the original x. ref_events: x's transcription, if
    already made (it is shared by every system compared on x). bin_spacing: an inverse-STFT
    decoder's sr / n_fft, for `bin_comb_db`."""
    if ref_events is None:
        ref_events = transcribe(x, sr)
    out = {"chroma": chroma_correlation(x, y, sr),
           **{k: chroma_correlation(x, y, sr, reg) for k, reg in REGISTERS.items()},
           "comb_db": frame_rate_comb(y, sr, frame_rate)}
    if bin_spacing:
        out["bin_comb_db"] = frame_rate_comb(y, sr, bin_spacing,
                                             int(BIN_COMB_HZ // bin_spacing))
    scores = transcription_scores(ref_events, transcribe(y, sr), len(x) / sr)
    if scores is not None:
        out.update(scores)
    return out
