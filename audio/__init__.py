"""Audio I/O, the ground floor beside `model/`: `model/` does no I/O, and `server/` and
`training/` both read and write audio through this package only.

    read_audio(bytes | path, rate) -> float32 mono      write_wav(audio, rate) -> WAV bytes
    AUDIO_EXTENSIONS, probe(paths), read_segment(file, start, n, rate)

`audio.plots.spectrogram_sheet` draws spectrograms for the benchmarks' samples (matplotlib, the
`bench` extra; not imported here).
"""

from audio.files import (
    AUDIO_EXTENSIONS,
    AudioError,
    AudioFile,
    EmptyAudioError,
    NonFiniteAudioError,
    UndecodableAudioError,
    is_audio_name,
    probe,
    read_audio,
    read_segment,
    write_wav,
)

__all__ = [
    "AUDIO_EXTENSIONS", "AudioError", "AudioFile", "EmptyAudioError", "NonFiniteAudioError",
    "UndecodableAudioError", "is_audio_name", "probe", "read_audio", "read_segment", "write_wav",
]
