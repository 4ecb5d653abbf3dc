"""`python -m training.dit.adapt` through its entry point: synthetic songs, the debug codec and a
debug base model (seconds). Resume, every bad-input case, and the numbers it reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model.dit import DiT, DiTConfig
from model.weights import load_dit, save_pretrained
from training.dit.adapt import hold_out, main

ROOT = Path(__file__).resolve().parents[1]


def song(seconds: float, base: float, seed: int) -> np.ndarray:
    """A repeating four-note riff: the same across songs but for its key, so it is learnable."""
    t = np.arange(int(seconds * 32000)) / 32000
    notes = base * np.array([1.0, 1.25, 1.5, 1.25])[(t * 2).astype(int) % 4]
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * np.cumsum(notes) / 32000)
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def base(tmp_path_factory, debug_codec):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base")
    save_pretrained(DiT(DiTConfig.from_name("debug", codebook_size=debug_codec.codebook_size,
                                            max_after_chunks=1)), out)
    return out


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    root = tmp_path_factory.mktemp("songs")
    for i, f in enumerate((220.0, 247.0, 262.0, 294.0)):
        sf.write(root / f"song{i}.wav", song(19.0, f, i), 32000, subtype="PCM_16")
    (root / "cover.jpg").write_bytes(b"not audio")
    return root


def args(songs, base, codec, work, out, steps):
    return [str(songs), "--out", str(out), "--base", str(base), "--codec", codec, "--work",
            str(work), "--steps", str(steps), "--batch-size", "2", "--lr", "3e-3",
            "--no-progress"]


def test_adapt_tokenises_holds_out_fine_tunes_exports_and_resumes(
        tmp_path, songs, base, debug_codec_dir, capsys):
    work, out = tmp_path / "work", tmp_path / "mine"
    full = ["--lora-rank", "0"]  # every weight (the default is rank-8 adapters, below)
    assert main([*args(songs, base, debug_codec_dir, work, out, 4), *full]) == 0
    err = capsys.readouterr().err
    assert "3 songs to learn from, 1 held out" in err and "every weight of" in err
    # The held-out curve: scored before the first step and at the checkpoints.
    assert "eval at step 0: val CE mean" in err and "eval at step 4: val CE mean" in err
    assert f"SNAC_DIT_CODEC={debug_codec_dir} SNAC_DIT_WEIGHTS={out} make serve" in err
    adapted = load_dit(out)
    assert adapted.config.max_after_chunks == 1           # still an editing model
    assert not all(torch.equal(a, b) for a, b in zip(adapted.state_dict().values(),
                                                     load_dit(base).state_dict().values(),
                                                     strict=True))
    report = json.loads((work / "adapt_eval.json").read_text())
    assert set(report["base"]) == set(report["adapted"]) == set("ABCD")
    # The held-out 19 s song gives 3 windows, scored one by one: each change has its error.
    assert report["windows"] == 3 and "level A: base" in err and "nan" not in err.lower()
    for lvl, change in report["change_adapted"].items():  # paired over the scored batches
        assert change["mean"] == pytest.approx(report["adapted"][lvl] - report["base"][lvl],
                                               abs=2e-3)
        assert change["se"] >= 0
        assert f"({change['mean']:+.3f} ± {change['se']:.3f})" in err

    # The default: low-rank adapters instead of every weight; the export is a plain DiT again.
    lora_out = tmp_path / "mine_lora"
    assert main(args(songs, base, debug_codec_dir, tmp_path / "work_lora", lora_out, 4)) == 0
    err = capsys.readouterr().err
    assert "rank-8 adapters of" in err and "lora: rank 8 adapters" in err
    lora = load_dit(lora_out)
    assert lora.state_dict().keys() == load_dit(base).state_dict().keys()
    assert not all(torch.equal(a, b) for a, b in zip(lora.state_dict().values(),
                                                     load_dit(base).state_dict().values(),
                                                     strict=True))
    def same(a, b, prefix):  # the export is fp16: compare at that precision
        return all(torch.equal(v.half(), b.state_dict()[k].half())
                   for k, v in a.state_dict().items() if k.startswith(prefix))

    assert same(lora, load_dit(base), "heads.") and same(lora, load_dit(base), "tok_emb.")
    # --lora-heads: the per-level output heads get adapters too (and nothing else new).
    heads_out = tmp_path / "mine_heads"
    assert main([*args(songs, base, debug_codec_dir, tmp_path / "work_heads", heads_out, 4),
                 "--lora-heads"]) == 0
    assert "heads" in capsys.readouterr().err
    assert 'targets = ["attn.qkv", "attn.proj", "mlp.0", "mlp.2", "adaLN", "heads"]' in (
        tmp_path / "work_heads" / "adapt.toml").read_text()
    heads = load_dit(heads_out)
    assert not same(heads, load_dit(base), "heads.") and same(heads, load_dit(base), "tok_emb.")
    assert main([*args(songs, base, debug_codec_dir, tmp_path / "w", tmp_path / "o", 4),
                 "--lora-rank", "-1"]) == 2

    # The same command with more steps goes on from the saved run (tokens are not redone);
    # this time with the progress bars a user sees, scoring included.
    with_bars = [x for x in args(songs, base, debug_codec_dir, work, out, 16)
                 if x != "--no-progress"]
    assert main([*with_bars, *full]) == 0
    err = capsys.readouterr().err
    assert re.search(r"score held-out: 100%\|.*\| (\d+)/\1 ", err), err  # base + adapted
    assert "resumed from" in err and "eval at step 0" not in err  # the start is scored once and "tokenised 0 files" not in err
    report = json.loads((work / "adapt_eval.json").read_text())
    # 16 steps at lr 3e-3 on a riff: the held-out song is predicted better than by the base.
    assert np.mean(list(report["adapted"].values())) < np.mean(list(report["base"].values()))
    metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in metrics if r["kind"] == "train") == 16
    curve = {r["step"]: r["ce_mean"] for r in metrics if r["kind"] == "eval"}
    assert {0, 4, 10, 16} <= set(curve) and curve[16] < curve[0]


def test_a_single_held_out_window_says_its_error_is_unknown(
        tmp_path, base, debug_codec_dir, capsys):
    root = tmp_path / "songs"
    root.mkdir()
    for i, f in enumerate((220.0, 247.0, 262.0, 294.0)):  # 18.3 s: one 18.432 s window each
        sf.write(root / f"song{i}.wav", song(18.3, f, i), 32000, subtype="PCM_16")
    work = tmp_path / "work"
    assert main(args(root, base, debug_codec_dir, work, tmp_path / "mine", 2)) == 0
    err = capsys.readouterr().err
    report = json.loads((work / "adapt_eval.json").read_text())
    assert report["windows"] == 1
    assert all(change["se"] is None for change in report["change_adapted"].values())
    assert "nan" not in err.lower() and " ± " not in err
    assert "the error of these changes is unknown" in err and "--val-songs" in err


def test_hold_out_is_stable_and_respects_the_count(tmp_path):
    from training.tokens import shards

    files = {f"s{i}.wav": [np.zeros(64 * 3 * 8 // s, dtype=np.uint16) for s in (8, 4, 2, 1)]
             for i in range(9)}
    shards.write_token_dir(tmp_path, files)
    train, val = hold_out(tmp_path, None)
    assert len(val) == 1 and len(train) == 8
    assert hold_out(tmp_path, None) == (train, val)         # the same songs every run
    assert len(hold_out(tmp_path, 3)[1]) == 3


@pytest.mark.parametrize("case,code,says", [
    ("missing", 2, "not a folder"),
    ("empty", 1, "no audio files"),
    ("undecodable", 1, "no file could be decoded"),
    ("short", 1, "shorter than 12.288 s"),
    ("nobase", 2, "base model"),
])
def test_bad_input_is_a_clear_message_and_exit_code(tmp_path, base, debug_codec_dir, capsys,
                                                    case, code, says):
    folder = tmp_path / "in"
    if case != "missing":
        folder.mkdir()
    if case == "undecodable":
        (folder / "a.wav").write_bytes(b"RIFF....WAVEnot really")
    if case == "short":
        sf.write(folder / "a.wav", song(5.0, 220.0, 0), 32000)
    b = tmp_path / "nothing" if case == "nobase" else base
    rc = main(args(folder, b, debug_codec_dir, tmp_path / "w", tmp_path / "o", 2))
    err = capsys.readouterr().err
    assert rc == code and says in err and "Traceback" not in err, err


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "training.dit.adapt", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--out" in r.stdout and "--val-songs" in r.stdout
    # --help and the README quote the same measured time.
    quoted = r"about (\d+) minutes for (\d+) songs on 2 CPU cores"
    readme = re.search(quoted, " ".join((ROOT / "README.md").read_text().split()))
    assert readme and readme.groups() == re.search(quoted, " ".join(r.stdout.split())).groups()


# ---------------------------------------------------------------- Hugging Face datasets
def saved_dataset(path: Path, songs: Path, **columns) -> Path:
    """A `save_to_disk` dataset of the song files (their bytes embedded, as on the hub)."""
    datasets = pytest.importorskip("datasets")
    files = sorted(str(p) for p in songs.glob("*.wav"))
    data = {"audio": files, "title": [Path(f).stem for f in files], **columns}
    ds = datasets.Dataset.from_dict(data).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(path))
    return path


def test_adapt_from_a_saved_hugging_face_dataset(tmp_path, songs, base, debug_codec_dir, capsys):
    ds = saved_dataset(tmp_path / "ds", songs)
    work, out = tmp_path / "work", tmp_path / "mine"
    assert main(args(ds, base, debug_codec_dir, work, out, 2)) == 0
    err = capsys.readouterr().err
    assert "writing the songs of dataset" in err and "3 songs to learn from, 1 held out" in err
    written = sorted(p.name for p in (work / "songs").iterdir())
    assert written == [f"{i:06d}-song{i}.wav" for i in range(4)]
    assert load_dit(out).config.max_after_chunks == 1
    # Again: nothing is fetched or tokenised twice.
    def stamps():
        files = sorted((work / "songs").iterdir()) + sorted((work / "tokens").rglob("*.*"))
        return {str(p): p.stat().st_mtime_ns for p in files}
    before = stamps()
    assert main(args(ds, base, debug_codec_dir, work, out, 2)) == 0
    assert "resumed from" in capsys.readouterr().err
    assert stamps() == before


@pytest.mark.parametrize("case,code,says", [
    ("no_audio_column", 2, "no audio column"),
    ("wrong_split", 2, "not 'train'"),
    ("rows_without_audio", 1, "no row has audio"),
    ("offline_hub_id", 2, "could not open the dataset"),
])
def test_bad_datasets_are_a_clear_message_and_exit_code(tmp_path, songs, base, debug_codec_dir,
                                                       capsys, monkeypatch, case, code, says):
    datasets = pytest.importorskip("datasets")
    source = tmp_path / "ds"
    if case == "no_audio_column":
        datasets.Dataset.from_dict({"title": ["a", "b"]}).save_to_disk(str(source))
    elif case == "wrong_split":
        one = datasets.Dataset.from_dict({"title": ["a"]})
        datasets.DatasetDict({"test": one}).save_to_disk(str(source))
    elif case == "rows_without_audio":
        features = datasets.Features({"audio": datasets.Audio(), "title": datasets.Value("string")})
        datasets.Dataset.from_dict({"audio": [None, None], "title": ["a", "b"]},
                                   features=features).save_to_disk(str(source))
    else:
        # Never the network in a test. The libraries read HF_HUB_OFFLINE when first imported,
        # which an earlier test may have done: set their flags too.
        import huggingface_hub.constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
        source = "nobody-here/no-such-dataset"
    rc = main(args(source, base, debug_codec_dir, tmp_path / "w", tmp_path / "o", 2))
    err = capsys.readouterr().err
    assert rc == code and says in err and "Traceback" not in err, err


def test_adapt_compare_bench_runs_full_and_lora_on_the_same_tokens(
        tmp_path, songs, base, debug_codec_dir):
    """bench/adapt_compare.py: one tokenisation, one adapt run per rank, and the sizes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("adapt_compare",
                                                  ROOT / "bench" / "adapt_compare.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "compare.json"
    assert bench.main([str(songs), "--base", str(base), "--codec", debug_codec_dir, "--ranks",
                       "0,4", "--steps", "3", "--batch-size", "2", "--lr", "3e-3",
                       "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    shared = sorted((tmp_path / "work" / "tokens" / "shards").iterdir())
    for rank in (0, 4):  # each run trained on the shared tokens, not a tokenisation of its own
        own = sorted((tmp_path / "work" / f"rank{rank}" / "tokens" / "shards").iterdir())
        assert [f.stat().st_ino for f in own] == [f.stat().st_ino for f in shared]
    runs = json.loads(out.read_text())["runs"]
    assert [r["rank"] for r in runs] == [0, 4]
    full, lora = runs
    assert full["written_bytes"] == full["model_bytes"] > 4 * lora["written_bytes"] > 0
    assert set(full["ce_base"]) == set(lora["ce_adapted"]) == set("ABCD")
    assert full["ce_base"] == lora["ce_base"]  # the same held-out songs and windows
    assert bench.main([str(songs), "--ranks", "-1"]) == 2
