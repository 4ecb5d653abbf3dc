"""The tokeniser through its real entry point, on short generated audio and the debug codec."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audio import read_audio
from model.codec import DEBUG_CODEC_CONFIG, Codec
from tests.conftest import tone
from training.tokens import shards
from training.tokens.tokenizer import KILL_HOOK_ENV, encode_files, main

ROOT = Path(__file__).resolve().parents[1]
PIECE = "1.152"  # 3 grid units (36,864 samples): a 2.5 s file spans 3 pieces


def make_folder(root: Path) -> Path:
    audio = root / "audio"
    (audio / "sub" / "deeper").mkdir(parents=True)
    sf.write(audio / "a.wav", tone(1.0, freq=440), 32000, subtype="PCM_16")
    stereo = np.stack([tone(2.5, 48000, 220), tone(2.5, 48000, 330)], axis=1)
    sf.write(audio / "sub" / "b.flac", stereo, 48000)
    sf.write(audio / "sub" / "deeper" / "c.wav", tone(0.5, freq=660), 32000, subtype="FLOAT")
    (audio / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio" * 4)
    (audio / "notes.txt").write_text("not audio, ignored")
    return audio


def mtimes(out: Path) -> dict:
    return {
        p: p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def all_tokens(out: Path) -> dict:
    m = shards.read_manifest(out)
    return {f["path"]: [np.asarray(t) for t in shards.file_tokens(out, m, f)] for f in m["files"]}


def test_tokenise_folder_then_noop_rerun(tmp_path, debug_codec, debug_codec_dir, capsys):
    audio = make_folder(tmp_path)
    out = tmp_path / "tokens"
    base = ["--audio", str(audio), "--out", str(out), "--codec", debug_codec_dir, "--no-progress",
            "--workers", "1"]
    args = [*base, "--piece-seconds", PIECE, "--val-fraction", "0.5"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "bad.wav" in err and "undecodable_audio" in err

    m = shards.read_manifest(out, expected_fingerprint=debug_codec.fingerprint)
    assert [f["path"] for f in m["files"]] == ["a.wav", "sub/b.flac", "sub/deeper/c.wav"]
    assert [(f["path"], f["code"]) for f in m["failed"]] == [("bad.wav", "undecodable_audio")]
    assert m["codec"]["geometry"]["frames_per_chunk"] == [64, 128, 256, 512]
    assert m["piece_samples"] == 36864
    for f in m["files"]:
        assert f["split"] == shards.split_of(f["path"], 0.5)
        src = audio / f["path"]
        assert (f["size"], f["mtime_ns"]) == (src.stat().st_size, src.stat().st_mtime_ns)
    for name in (n for s in m["shards"] for n in s["levels"]):
        assert np.load(out / name).dtype == np.uint16

    tokens = all_tokens(out)
    # A file shorter than a piece is encoded in one pass: exactly Codec.encode.
    a = read_audio(audio / "a.wav", 32000)
    want = debug_codec.encode(torch.from_numpy(a)[None])
    assert m["files"][0]["n_frames"] == want[0].shape[1] == 12  # 1.0 s pads to 1.152 s
    assert m["files"][0]["duration"] == pytest.approx(1.0)
    for got, w in zip(tokens["a.wav"], want, strict=True):
        np.testing.assert_array_equal(got, w[0].numpy())
    # A longer one is encoded piece by piece, each with the encoder's reach of audio either
    # side: the tokens are exactly those of one pass over the whole file.
    assert m["piece_border_samples"] == debug_codec.border_samples > 0
    b = read_audio(audio / "sub" / "b.flac", 32000)
    assert len(b) > 2 * 36864  # three pieces: a middle one has borders on both sides
    whole = debug_codec.encode(torch.from_numpy(b)[None])
    for got, w in zip(tokens["sub/b.flac"], whole, strict=True):
        np.testing.assert_array_equal(got, w[0].numpy())
    assert m["files"][1]["n_frames"] == 28  # 2.5 s -> 80,000 samples -> 7 grid units

    # Second run: nothing to do, nothing rewritten.
    before = mtimes(out)
    assert main(args) == 0
    assert mtimes(out) == before
    assert "tokenised 0 files" in capsys.readouterr().err
    assert main([*args, "--retry-failed"]) == 0  # tries bad.wav again, still bad, still listed
    assert "1 failed now" in capsys.readouterr().err
    assert [f["path"] for f in shards.read_manifest(out)["failed"]] == ["bad.wav"]

    # Another val fraction re-splits without re-encoding; another piece length is refused.
    assert main([*base, "--val-fraction", "0.9"]) == 0
    m_resplit = shards.read_manifest(out)
    assert [f["split"] for f in m_resplit["files"]] == [shards.split_of(f["path"], 0.9) for f in m["files"]]
    assert m_resplit["shards"] == m["shards"] and m_resplit["val_fraction"] == 0.9
    assert main([*base, "--piece-seconds", "3"]) == 2
    assert "pieces of 1.152 s" in capsys.readouterr().err

    # A changed file is re-tokenised, alone, into a new shard; the others are kept.
    sf.write(audio / "sub" / "deeper" / "c.wav", tone(0.8, freq=550), 32000)
    assert main(base) == 0
    m2 = shards.read_manifest(out)
    assert len(m2["shards"]) == len(m["shards"]) + 1
    c = next(f for f in m2["files"] if f["path"] == "sub/deeper/c.wav")
    assert c["shard"] == m2["shards"][-1]["id"] and c["duration"] == pytest.approx(0.8)
    assert all(f in m2["files"] for f in m_resplit["files"] if f["path"] != "sub/deeper/c.wav")


def test_other_codec_is_refused(tmp_path, debug_codec_dir, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "x.wav", tone(0.5), 32000)
    out = tmp_path / "tokens"
    base = ["--audio", str(audio), "--out", str(out), "--no-progress"]
    assert main(base + ["--codec", debug_codec_dir]) == 0
    before = mtimes(out)

    other = Codec.load(DEBUG_CODEC_CONFIG, seed=1).save(tmp_path / "other_codec")
    capsys.readouterr()
    assert main(base + ["--codec", str(other)]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and "another --out" in err
    assert mtimes(out) == before
    with pytest.raises(shards.ManifestError, match="must not be mixed"):
        shards.read_manifest(
            out, expected_fingerprint=Codec.load(DEBUG_CODEC_CONFIG, seed=1).fingerprint
        )


def test_decoder_only_fine_tune_of_the_codec_adds_files_to_the_same_tokens(
        tmp_path, debug_codec, debug_codec_dir, capsys):
    """The manifest keys tokens on the codes fingerprint (encoder + quantiser): a codec whose
    decoder was fine-tuned since makes the same codes, so it may tokenise new files into the
    directory; the manifest keeps the codec it was made with."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "x.wav", tone(0.5), 32000)
    out = tmp_path / "tokens"
    base = ["--audio", str(audio), "--out", str(out), "--no-progress", "--workers", "1"]
    assert main(base + ["--codec", debug_codec_dir]) == 0
    tuned = Codec.load(debug_codec_dir)
    with torch.no_grad():
        next(tuned.snac.decoder.parameters()).mul_(1.5)
    tuned_dir = tuned.save(tmp_path / "tuned_codec")
    assert Codec.load(tuned_dir).fingerprint != debug_codec.fingerprint
    sf.write(audio / "y.wav", tone(0.7, freq=330), 32000)
    assert main(base + ["--codec", str(tuned_dir)]) == 0
    m = shards.read_manifest(out)
    assert [f["path"] for f in m["files"]] == ["x.wav", "y.wav"]
    assert m["codec"]["fingerprint"] == debug_codec.fingerprint
    assert m["codec"]["codes_fingerprint"] == debug_codec.codes_fingerprint
    y = read_audio(audio / "y.wav", 32000)
    want = debug_codec.encode(torch.from_numpy(y)[None])
    for got, w in zip(all_tokens(out)["y.wav"], want, strict=True):
        np.testing.assert_array_equal(got, w[0].numpy())


def test_refusals_and_empty_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no audio here")
    out = tmp_path / "tokens"
    assert (
        main(["--audio", str(empty), "--out", str(out), "--codec", "debug", "--no-progress"]) == 1
    )
    assert "no audio files under" in capsys.readouterr().err
    (empty / "broken.wav").write_bytes(b"not a wav")
    assert main(["--audio", str(empty), "--out", str(out), "--codec", "debug", "--no-progress"]) == 1
    assert "no audio could be tokenised" in capsys.readouterr().err
    assert main(["--audio", str(tmp_path / "missing"), "--out", str(out), "--codec", "debug"]) == 2
    assert "not a directory" in capsys.readouterr().err
    (out / "manifest.json").write_text("{ truncated")
    assert main(["--audio", str(empty), "--out", str(out), "--codec", "debug"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["--audio", str(empty), "--out", str(tmp_path / "t2"), "--device", "gpu"]) == 2
    assert "not a device" in capsys.readouterr().err and not (tmp_path / "t2").exists()


def test_out_of_memory_halves_the_batch(debug_codec, monkeypatch):
    """A GPU OOM on a batch retries it in halves; the tokens do not change."""
    audios = [tone(0.3, freq=f) for f in (200, 300, 400, 500, 600)]  # one bucket of 5 pieces
    want = encode_files(debug_codec, audios, piece_samples=36864, batch_size=1)
    real, sizes = debug_codec.encode, []

    def flaky(x):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(debug_codec, "encode", flaky)
    got = encode_files(debug_codec, audios, piece_samples=36864, batch_size=5)
    assert sizes == [5, 2, 3, 1, 2]
    for g, w in zip(got, want, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(g, w, strict=True))


def test_directory_made_before_borders_keeps_encoding_without_them(
        tmp_path, debug_codec, debug_codec_dir):
    """A manifest without `piece_border_samples` (an older directory) encodes new files as its
    old files were: pieces cut edge to edge, each encoded alone."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", tone(2.5, freq=220), 32000, subtype="FLOAT")
    out = tmp_path / "tokens"
    base = ["--audio", str(audio), "--out", str(out), "--codec", debug_codec_dir, "--no-progress",
            "--workers", "1", "--piece-seconds", PIECE]
    assert main(base) == 0
    path = out / shards.MANIFEST
    m = json.loads(path.read_text())
    del m["piece_border_samples"]
    path.write_text(json.dumps(m))

    sf.write(audio / "b.wav", tone(2.5, freq=330), 32000, subtype="FLOAT")
    assert main(base) == 0
    m = shards.read_manifest(out)
    assert "piece_border_samples" not in m
    b = read_audio(audio / "b.wav", 32000)
    alone = [debug_codec.encode(torch.from_numpy(b[i:i + 36864])[None])
             for i in range(0, len(b), 36864)]
    got = all_tokens(out)["b.wav"]
    for level, g in enumerate(got):
        np.testing.assert_array_equal(g, torch.cat([p[level][0] for p in alone]).numpy())
    # and the bordered pieces differ from those near the piece edges (the reason for borders)
    whole = debug_codec.encode(torch.from_numpy(b)[None])
    assert any(not np.array_equal(g, w[0].numpy()) for g, w in zip(got, whole, strict=True))


def test_encode_files_checks_the_grid(debug_codec):
    with pytest.raises(ValueError, match="multiples of the codec's grid"):
        encode_files(debug_codec, [tone(1.0)], piece_samples=36864, batch_size=1, border_samples=100)


def run_cli(audio: Path, out: Path, codec_dir: str, **env) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "training.tokens",
        "--audio",
        str(audio),
        "--out",
        str(out),
        "--codec",
        codec_dir,
        "--piece-seconds",
        PIECE,
        "--shard-seconds",
        "0.1",
        "--no-progress",
        "--workers",
        "1",
    ]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_to_the_clean_result(tmp_path, debug_codec_dir):
    audio = tmp_path / "audio"
    (audio / "d").mkdir(parents=True)
    for i, (name, secs) in enumerate(
        [("1.wav", 0.6), ("2.wav", 1.3), ("d/3.wav", 0.4), ("d/4.wav", 0.9)]
    ):
        sf.write(audio / name, tone(secs, freq=200 + 100 * i), 32000)

    # Shard 2 hits the disk, then the process is SIGKILLed before the manifest names it.
    killed = run_cli(audio, tmp_path / "resumed", debug_codec_dir, **{KILL_HOOK_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = shards.read_manifest(tmp_path / "resumed")
    assert [f["path"] for f in partial["files"]] == ["1.wav"]  # the committed shard survives
    assert (tmp_path / "resumed" / shards.shard_level_name(1, 0)).exists()  # the orphan

    resumed = run_cli(audio, tmp_path / "resumed", debug_codec_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "tokenised 3 files" in resumed.stderr and "skipped 1 done" in resumed.stderr

    assert (
        main(
            [
                "--audio",
                str(audio),
                "--out",
                str(tmp_path / "clean"),
                "--codec",
                debug_codec_dir,
                "--piece-seconds",
                PIECE,
                "--shard-seconds",
                "0.1",
                "--no-progress",
            ]
        )
        == 0
    )
    got, want = all_tokens(tmp_path / "resumed"), all_tokens(tmp_path / "clean")
    assert list(got) == list(want) == ["1.wav", "2.wav", "d/3.wav", "d/4.wav"]
    for path in want:
        for g, w in zip(got[path], want[path], strict=True):
            np.testing.assert_array_equal(g, w)
    m_resumed = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    m_clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())

    def strip(m):  # where a file's tokens sit may differ; what they are may not
        return [{k: v for k, v in f.items() if k not in ("shard", "offsets")} for f in m["files"]]

    assert strip(m_resumed) == strip(m_clean)
    assert not list((tmp_path / "resumed").rglob(".*.tmp-*"))


def test_hold_out_list_keeps_named_files_in_val(tmp_path, debug_codec_dir, capsys):
    """--hold-out: the tracks a codec was validated on stay 'val' for the DiT too (by file name
    or relative path, from a text list or eval_codec's JSON); the list is kept for re-runs and
    re-splits without re-encoding when it changes."""
    audio = make_folder(tmp_path)
    out = tmp_path / "tokens"
    base = ["--audio", str(audio), "--out", str(out), "--codec", debug_codec_dir, "--no-progress",
            "--workers", "1", "--piece-seconds", PIECE, "--val-fraction", "0"]
    listed = tmp_path / "held.txt"
    listed.write_text("# the codec's held-out tracks\nb.flac\n")
    assert main([*base, "--hold-out", str(listed)]) == 0
    m = shards.read_manifest(out)
    assert {f["path"]: f["split"] for f in m["files"]} == {
        "a.wav": "train", "sub/b.flac": "val", "sub/deeper/c.wav": "train"}
    assert m["hold_out"] == ["b.flac"]

    before = mtimes(out)
    assert main(base) == 0                        # no --hold-out: the directory's list stays
    assert mtimes(out) == before
    evaluated = tmp_path / "eval.json"
    evaluated.write_text(json.dumps({"held_out_tracks": ["sub/deeper/c.wav"]}))
    assert main([*base, "--hold-out", str(evaluated)]) == 0
    m2 = shards.read_manifest(out)
    assert [f["split"] for f in m2["files"]] == ["train", "train", "val"]
    assert m2["shards"] == m["shards"]            # re-split, not re-encoded

    capsys.readouterr()
    assert main([*base, "--hold-out", str(tmp_path / "missing.txt")]) == 2
    assert "--hold-out" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main([*base, "--hold-out", str(tmp_path / "bad.json")]) == 2
    assert "held_out_tracks" in capsys.readouterr().err


def test_parts_tokenise_a_share_each_and_add_up_to_the_whole(tmp_path, debug_codec_dir, capsys):
    """--part K/N: one run tokenises its share of the training files plus every val file; the
    other parts, run into the same directory, add the rest; the union is what one run without
    --part makes, token for token. A malformed part is refused with exit status 2."""
    from training.tokens.tokenizer import in_part

    audio = tmp_path / "audio"
    audio.mkdir()
    names = [f"song{i:02d}.wav" for i in range(12)]
    for i, n in enumerate(names):
        sf.write(audio / n, tone(0.6, freq=200 + 40 * i), 32000, subtype="PCM_16")
    common = ["--audio", str(audio), "--codec", debug_codec_dir, "--no-progress",
              "--workers", "1", "--piece-seconds", PIECE, "--hold-out"]
    held = tmp_path / "held.txt"
    held.write_text("song03.wav\n")
    parts = tmp_path / "parts"
    assert main(["--out", str(parts), *common, str(held), "--part", "1/2"]) == 0
    err = capsys.readouterr().err
    m = shards.read_manifest(parts)
    first = {f["path"] for f in m["files"]}
    assert "song03.wav" in first                                    # val: in every part
    assert first == {n for n in names if in_part(n, m, 1, 2)}
    assert 0 < len(first) < len(names)
    assert f"{len(names) - len(first)} training files belong to other parts" in err
    assert main(["--out", str(parts), *common, str(held), "--part", "2/2"]) == 0
    assert main(["--out", str(tmp_path / "whole"), *common, str(held)]) == 0
    whole = all_tokens(tmp_path / "whole")
    split = all_tokens(parts)
    assert split.keys() == whole.keys() == set(names)
    assert all(all(np.array_equal(a, b) for a, b in zip(split[n], whole[n], strict=True))
               for n in names)

    for bad in ("3/2", "0/2", "half"):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(parts), *common, str(held), "--part", bad])
        assert e.value.code == 2
        assert "--part" in capsys.readouterr().err
