"""The Debian music corpus builder on a fake package tree: discovery (dpkg list, per-package
extraction, .pk3 archives), dedup (bytes and decoded), length filter, licences, manifest, resume."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training.corpus import debian_music as dm
from training.corpus.licences import dep5_licence, detect_licences, parse_dep5

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fake

Files: *
Copyright: someone
License: GPL-2+

Files:
 base/music/special.ogg
 base/music/zipped.wav
Copyright: someone else
License: CC-BY-3.0

Files: debian/*
Copyright: packager
License: GPL-2+
"""
FREE_TEXT = """This package is free software; you can redistribute it under the terms of the
GNU General Public License as published by the Free Software Foundation; either version 2
of the License, or (at your option) any later version."""


def tone(seconds: float, freq: float, rate: int = 32000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def wav_bytes(x: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    # int16 in: libsndfile's float -> int scaling differs between WAV and FLAC.
    sf.write(buf, np.round(x * 32767).astype(np.int16), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture
def root(tmp_path) -> Path:
    """pkg-a: extracted into ROOT/pkg-a (DEP-5, a .pk3). pkg-b: 'installed' (dpkg list) in ROOT."""
    root = tmp_path / "root"
    a = root / "pkg-a"
    music = a / "usr/share/games/a/base/music"
    music.mkdir(parents=True)
    (a / "usr/share/doc/pkg-a").mkdir(parents=True)
    (a / "usr/share/doc/pkg-a/copyright").write_text(DEP5)
    (music / "one.wav").write_bytes(wav_bytes(tone(1.5, 220), 32000))
    shutil.copy(music / "one.wav", music / "one_copy.wav")                  # byte duplicate
    (music / "two.wav").write_bytes(wav_bytes(tone(1.5, 330), 32000))
    (music / "two_again.flac").write_bytes(wav_bytes(tone(1.5, 330), 32000, "FLAC"))  # decoded dup
    (music / "jingle.wav").write_bytes(wav_bytes(tone(0.5, 440), 32000))    # too short
    (music / "cover.png").write_bytes(b"not audio")
    with zipfile.ZipFile(a / "usr/share/games/a/base/0music.pk3", "w") as z:
        z.writestr("music/", b"")
        z.writestr("music/zipped.wav", wav_bytes(tone(1.5, 550, 44100, 2), 44100))  # resampled

    b_music = root / "usr/share/b/music/album"
    b_music.mkdir(parents=True)
    (root / "usr/share/doc/pkg-b").mkdir(parents=True)
    (root / "usr/share/doc/pkg-b/copyright").write_text(FREE_TEXT)
    (b_music / "three.wav").write_bytes(wav_bytes(tone(2.0, 660), 32000))
    (b_music / "license.txt").write_text("Licensed under CC BY-SA 3.0 (or any later version).")
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    (info / "pkg-b.list").write_text("/.\n/usr/share/b/music/album/three.wav\n"
                                     "/usr/share/b/music/album/license.txt\n"
                                     "/usr/share/doc/pkg-b/copyright\n")
    return root


def rows_by_name(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {r["original_path"].rsplit("/", 1)[-1]: r for r in rows}


def test_build_dedups_filters_and_documents(root, tmp_path):
    out = tmp_path / "corpus"
    rc = dm.main([str(out), "--root", str(root), "--packages", "pkg-a,pkg-b,pkg-missing",
                  "--min-seconds", "1.0", "--jobs", "1", "--no-progress"])
    assert rc == 0
    rows = rows_by_name(out)
    assert set(rows) == {"one.wav", "one_copy.wav", "two.wav", "two_again.flac", "jingle.wav",
                         "zipped.wav", "three.wav"}
    kept = {k for k, r in rows.items() if r["status"] == "kept"}
    assert kept == {"one.wav", "two.wav", "zipped.wav", "three.wav"}
    assert rows["one_copy.wav"]["duplicate_kind"] == "bytes"
    assert rows["one_copy.wav"]["duplicate_of"].endswith("/one.wav")
    assert rows["two_again.flac"]["duplicate_kind"] == "decoded"
    assert rows["jingle.wav"]["status"] == "short"

    z = rows["zipped.wav"]
    assert z["original_path"] == "/usr/share/games/a/base/0music.pk3!/music/zipped.wav"
    assert z["source_rate"] == 44100 and z["channels"] == 2
    for name in kept:
        r = rows[name]
        assert {"package", "original_path", "duration_s", "licence", "licence_file",
                "output_path"} <= set(r)
        audio, rate = sf.read(out / r["output_path"])
        assert rate == 32000 and audio.ndim == 1                   # 32 kHz mono
        assert abs(len(audio) / rate - r["duration_s"]) < 1e-3
        assert (out / r["licence_file"]).is_file()
    # DEP-5: the specific paragraph wins for the archive member, "*" for the rest.
    assert z["licence"] == "CC-BY-3.0" and rows["one.wav"]["licence"] == "GPL-2+"
    assert rows["one.wav"]["licence_source"] == "/usr/share/doc/pkg-a/copyright"
    b = rows["three.wav"]
    assert b["package"] == "pkg-b" and b["licence"] == "GPL-2+"
    assert b["licence_basis"] == "detected" and b["track_licence"] == "CC-BY-SA-3.0"
    assert (out / b["track_licence_file"]).read_text().startswith("Licensed under")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 4 and summary["missing"] == ["pkg-missing"]
    assert summary["total_seconds"] == pytest.approx(1.5 * 3 + 2.0, abs=1e-3)
    assert summary["packages"]["pkg-a"]["duplicate"] == 2


def test_build_resumes(root, tmp_path):
    out = tmp_path / "corpus"
    dm.build(out, root, ["pkg-a", "pkg-b"], min_seconds=1.0, progress=False)
    manifest = out / "manifest.jsonl"
    first = manifest.read_text().splitlines()
    dm.build(out, root, ["pkg-a", "pkg-b"], min_seconds=1.0, progress=False)
    assert manifest.read_text().splitlines() == first                    # nothing redone
    # A run killed mid-line: the cut line is ignored and only that track is redone.
    manifest.write_text("\n".join(first[:-1]) + "\n" + first[-1][:20])
    dm.build(out, root, ["pkg-a", "pkg-b"], min_seconds=1.0, progress=False)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert len(rows) == len(first)
    assert rows[-1]["original_path"] == json.loads(first[-1])["original_path"]
    with pytest.raises(ValueError, match="built with"):
        dm.build(out, root, ["pkg-a"], fmt="opus", min_seconds=1.0, progress=False)


def test_opus_output(root, tmp_path):
    out = tmp_path / "opus"
    summary = dm.build(out, root, ["pkg-b"], fmt="opus", min_seconds=1.0, progress=False)
    assert summary["kept"] == 1
    (row,) = rows_by_name(out).values()
    assert row["output_path"].endswith(".opus") and row["sample_rate"] == 48000
    info = sf.info(out / row["output_path"])
    assert info.samplerate == 48000 and info.channels == 1 and info.subtype == "OPUS"


def test_default_length_filter_and_nothing_found(root, tmp_path):
    assert dm.main([str(tmp_path / "c1"), "--root", str(root), "--packages", "pkg-b",
                    "--no-progress", "--jobs", "1"]) == 1              # 2 s < 30 s: none kept
    rows = rows_by_name(tmp_path / "c1")
    assert rows["three.wav"]["status"] == "short"
    assert dm.main([str(tmp_path / "c2"), "--root", str(tmp_path), "--no-progress"]) == 1


def test_licence_helpers():
    paras = parse_dep5(DEP5)
    assert [p.licence for p in paras] == ["GPL-2+", "CC-BY-3.0", "GPL-2+"]
    assert dep5_licence(paras, "/usr/share/games/a/base/music/special.ogg") == "CC-BY-3.0"
    assert dep5_licence(paras, "/usr/share/games/a/base/music/other.ogg") == "GPL-2+"
    assert parse_dep5(FREE_TEXT) is None
    assert detect_licences(FREE_TEXT) == ["GPL-2+"]
    assert detect_licences("Attribution-ShareAlike 3.0 ... GNU General Public License "
                           "Version 2 or later") == ["CC-BY-SA-3.0", "GPL-2+"]
    assert detect_licences("CC-BY 4.0") == ["CC-BY-4.0"]
    assert detect_licences("GNU GENERAL PUBLIC LICENSE Version 2, June 1991 ... GNU General "
                           "Public License, version 2 or (at your option) any later") == ["GPL-2+"]
