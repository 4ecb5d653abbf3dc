"""Audio in and out: any format libsndfile reads -> float32 mono at the codec rate; 16-bit WAV out.

Shared by the server (uploads) and the tokeniser (folders of files). `model/` does no I/O, so it
only ever sees the arrays this module returns.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from model.engine import JOIN_SAMPLES, crossfade


class AudioError(ValueError):
    """Input audio we refuse, with a machine-readable `code` and a message naming the problem."""

    code = "bad_audio"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class EmptyAudioError(AudioError):
    code = "empty_audio"


class UndecodableAudioError(AudioError):
    code = "undecodable_audio"


class NonFiniteAudioError(AudioError):
    code = "non_finite_audio"


def read_audio(source: bytes | str | Path, sample_rate: int) -> np.ndarray:
    """Decode `source` (raw file bytes or a path) to a float32 mono array at `sample_rate`.

    Channels are averaged (a downmix keeps the level of correlated stereo); other rates are
    resampled with soxr (HQ). Raises an `AudioError` subclass for empty, undecodable or
    non-finite input.
    """
    name = "upload" if isinstance(source, bytes | bytearray | memoryview) else str(source)
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise EmptyAudioError("the audio is empty (0 bytes)")
        handle = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise UndecodableAudioError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise EmptyAudioError(f"{path}: the file is empty (0 bytes)")
        handle = path

    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        # libsndfile names the file object ("Error opening <_io.BytesIO ...>: "); keep its reason.
        reason = getattr(e, "error_string", None) or str(e).rsplit(": ", 1)[-1]
        raise UndecodableAudioError(
            f"{name}: could not decode audio ({reason.rstrip('.')}); "
            "send WAV, FLAC, OGG/Vorbis/Opus or MP3"
        ) from e
    if data.shape[0] == 0:
        raise EmptyAudioError(f"{name}: the audio has no samples")
    if not np.isfinite(data).all():
        raise NonFiniteAudioError(f"{name}: the audio contains NaN or infinite samples")

    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def write_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """float audio (T,) in [-1, 1] -> 16-bit PCM mono WAV bytes (values outside are clipped)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"write_wav expects mono audio (T,), got shape {audio.shape}")
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# The join between a user's audio and its continuation (include_input): the continuation was
# decoded from the codec's tokens, so its first sample need not meet the input's last one (a
# click) nor its level (a jump). The output crossfades, over JOIN_SAMPLES (64 ms), from the
# input into the codec's own decoding of the input's end, which the continuation follows
# seamlessly (same decode). JOIN_SAMPLES and the crossfade are the engine's, which splices
# its edits the same way.


def join_input(audio: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """input (T,) + [decoded input end (F,) + continuation] -> one signal: the input unchanged
    up to its last F samples, a raised-cosine crossfade from it into the decoded end there,
    then the continuation. F = min(JOIN_SAMPLES, T)."""
    audio = np.asarray(audio, dtype=np.float32)
    lead = np.asarray(lead, dtype=np.float32)
    f = min(JOIN_SAMPLES, len(audio))
    decoded_end, continuation = lead[JOIN_SAMPLES - f: JOIN_SAMPLES], lead[JOIN_SAMPLES:]
    fade = crossfade(torch.from_numpy(audio[len(audio) - f:]), torch.from_numpy(decoded_end))
    return np.concatenate([audio[: len(audio) - f], fade.numpy(), continuation])
