"""16-bit PCM WAV in and out with the standard library and numpy (no soundfile, no torch)."""

from __future__ import annotations

import io
import wave

import numpy as np


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """float audio (T,) or (T, C) in [-1, 1] -> 16-bit PCM WAV bytes (clipped)."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"audio must be (T,) or (T, channels), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    pcm = np.round(np.clip(x, -1.0, 1.0) * 32767).astype("<i2")  # (T, C) interleaved
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV bytes (what the server sends) -> (float32 (T,) mono or (T, C), rate)."""
    with wave.open(io.BytesIO(data), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"expected 16-bit PCM WAV, got {8 * w.getsampwidth()}-bit")
        channels, rate = w.getnchannels(), w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    x = pcm.astype(np.float32) / 32768.0
    return (x if channels == 1 else x.reshape(-1, channels)), rate
