import io

import numpy as np
import pytest
import soundfile as sf

from audio import (
    EmptyAudioError,
    NonFiniteAudioError,
    UndecodableAudioError,
    read_audio,
    write_wav,
)
from tests.conftest import tone


def encoded(audio: np.ndarray, rate: int, **kw) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt, subtype",
    [
        ("WAV", "PCM_U8"),
        ("WAV", "PCM_16"),
        ("WAV", "PCM_24"),
        ("WAV", "PCM_32"),
        ("WAV", "FLOAT"),
        ("FLAC", "PCM_16"),
        ("OGG", "VORBIS"),
    ],
)
def test_formats_load_to_mono_32k(fmt, subtype):
    src = tone(1.0, 48000, noise=0)
    stereo = np.stack([src, src], axis=1)
    out = read_audio(encoded(stereo, 48000, format=fmt, subtype=subtype), 32000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 32000) <= 1
    # Same signal in both channels: the downmix keeps the level; lossy/8-bit codecs add error.
    tol = 0.05 if subtype in ("PCM_U8", "VORBIS") else 1e-3
    ref = tone(1.0, 32000, noise=0)
    assert np.sqrt(np.mean((out[1000:-1000] - ref[1000:-1000]) ** 2)) < tol


def test_downmix_averages_channels():
    left, right = tone(0.5, 32000, 300), tone(0.5, 32000, 500)
    out = read_audio(
        encoded(np.stack([left, right], 1), 32000, format="WAV", subtype="FLOAT"), 32000
    )
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-6)


def test_reads_paths(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, tone(0.5, 16000), 16000)
    assert len(read_audio(path, 32000)) == 16000


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", EmptyAudioError, "empty"),
        (b"this is a text file, not audio" * 10, UndecodableAudioError, "could not decode"),
        (
            encoded(np.zeros((0, 1), np.float32), 32000, format="WAV", subtype="FLOAT"),
            EmptyAudioError,
            "no samples",
        ),
        (
            encoded(np.array([0.0, np.nan, 0.1], np.float32), 32000, format="WAV", subtype="FLOAT"),
            NonFiniteAudioError,
            "NaN",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(data, error, message):
    with pytest.raises(error, match=message) as info:
        read_audio(data, 32000)
    assert info.value.code in ("empty_audio", "undecodable_audio", "non_finite_audio")
    assert "BytesIO" not in str(info.value)  # the message goes to API users: no Python reprs


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(UndecodableAudioError, match="no such file"):
        read_audio(tmp_path / "nope.wav", 32000)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(EmptyAudioError):
        read_audio(tmp_path / "empty.wav", 32000)


def test_write_wav_is_16bit_mono_and_clips():
    data = write_wav(np.array([0.0, 0.5, 2.0, -2.0], np.float32), 32000)
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.subtype) == (32000, 1, "PCM_16")
    back, _ = sf.read(io.BytesIO(data), dtype="float32")
    np.testing.assert_allclose(back, [0.0, 0.5, 1.0, -1.0], atol=1e-4)


def test_spectrogram_sheet_draws_a_png_or_says_it_cannot(tmp_path):
    """audio.plots.spectrogram_sheet (the benchmarks' samples): rows of named signals to a PNG
    with matplotlib (the bench extra); without it, False and no file."""
    from audio.plots import spectrogram_sheet

    t = np.arange(32000) / 32000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    rows = [("a", {"original": tone, "codec": tone[::-1].copy()}), ("b", {"original": tone})]
    path = tmp_path / "sheet.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert spectrogram_sheet(path, rows, 32000, mark_s=0.5) is False and not path.exists()
        return
    assert spectrogram_sheet(path, rows, 32000, mark_s=0.5) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
