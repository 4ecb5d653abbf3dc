"""Audio files: whole files in and out, which names to try, lengths, crops at an offset.

`read_audio` turns any format libsndfile reads into float32 mono at a given rate; the server's
uploads, the tokeniser's folders and the evaluations all read through it, so they hear the same
downmix and resampling. `write_wav` writes 16-bit WAV. AUDIO_EXTENSIONS is the one list of
names every reader of folders tries (the tokeniser, the codec trainer, the corpus builder).
Crops are read with soundfile at an offset (no full-file decode per crop) and resampled with
soxr, downmixed like `read_audio`.
"""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# Extensions worth trying. m4a/aac/wma are listed although libsndfile cannot read them, so they
# are reported as failed instead of vanishing silently. Everything else (cover art, .cue, .txt)
# is ignored.
AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .aif .aiff .aifc .au .snd .caf .w64 .rf64 .mat "
    ".m4a .aac .wma".split()
)


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


def is_audio_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


@dataclass(frozen=True)
class AudioFile:
    path: str
    frames: int          # at the file's own rate
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def probe(paths: list[Path]) -> list[AudioFile]:
    """Header-only length/rate of every file; unreadable or empty files are skipped loudly."""
    out = []
    for p in paths:
        try:
            info = sf.info(str(p))
        except (sf.LibsndfileError, RuntimeError) as e:
            print(f"warning: skipping unreadable audio {p}: {e}", file=sys.stderr)
            continue
        if info.frames > 0:
            out.append(AudioFile(str(p), int(info.frames), int(info.samplerate)))
    return out


def read_segment(f: AudioFile, start: int, n_samples: int, sample_rate: int) -> np.ndarray:
    """n_samples at `sample_rate` from native frame `start`; zero-padded past the end. (T,) f32."""
    n_native = math.ceil(n_samples * f.sample_rate / sample_rate)
    data, _ = sf.read(f.path, start=start, frames=n_native, dtype="float32", always_2d=True)
    mono = data.mean(axis=1, dtype=np.float32)                  # (T_native,)
    if f.sample_rate != sample_rate and len(mono):
        mono = soxr.resample(mono, f.sample_rate, sample_rate, quality="HQ")
    out = np.zeros(n_samples, dtype=np.float32)
    out[: min(n_samples, len(mono))] = mono[:n_samples]
    return out
