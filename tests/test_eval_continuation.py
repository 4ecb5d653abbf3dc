"""bench/eval_continuation.py through its entry point, on synthetic tracks with known answers.

Each track holds one chord with its own timbre, so the references must come out as designed:
the real continuation retrieves its own context, a random other clip does not; "repeat" copies
the context; the real continuation shares the context's harmony, a random other clip less so.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("eval_continuation", ROOT / "bench/eval_continuation.py")
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)


def chord_track(freqs, seconds: float, harmonics: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 32000)) / 32000
    x = sum(np.sin(2 * np.pi * f * k * t) / k ** 1.5 for f in freqs for k in range(1, harmonics + 1))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t) ** 2)          # a pulse: frames vary
    return (0.2 * x / np.abs(x).max() + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def test_metrics_rank_the_references_as_designed(tmp_path, debug_weights_dir, debug_codec_dir):
    chords = [(220.0, 277.2, 329.6), (246.9, 311.1, 370.0), (174.6, 207.7, 261.6)]
    audio = tmp_path / "tracks"
    audio.mkdir()
    for i, chord in enumerate(chords):
        sf.write(audio / f"t{i}.wav", chord_track(chord, 19.0, 2 + 3 * i, i), 32000,
                 subtype="PCM_16")
    out = tmp_path / "eval.json"
    rc = ev.main(["--weights", debug_weights_dir, "--codec", debug_codec_dir, "--audio",
                  str(audio), "--per-track", "1", "--steps", "1", "--out", str(out),
                  "--samples", str(tmp_path / "samples")])
    assert rc == 0
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert result["windows"] == 3 and set(m) == {"model", "codec", "repeat", "random", "real"}
    assert m["real"]["retrieval"] == 1.0 and m["random"]["retrieval"] == 0.0
    assert m["real"]["frechet"] < 1e-6
    assert m["repeat"]["copy"] > 0.99 and m["repeat"]["copy"] > m["random"]["copy"]
    assert m["real"]["harmony"] > m["random"]["harmony"] + 0.1
    assert m["real"]["timbre"] > m["random"]["timbre"]
    assert all(np.isfinite(v) for s in m.values() for v in s.values())
    # The codec-domain table: perfect tokens are its "real" (Fréchet 0 by construction), and
    # its contexts are the codec's renderings, so "repeat" (their last chunk) copies them.
    c = result["metrics_codec_domain"]
    assert set(c) == {"model", "repeat", "random", "real"}
    assert c["real"]["frechet"] < 1e-6 < m["codec"]["frechet"]
    assert c["repeat"]["copy"] > 0.99 and c["repeat"]["copy"] > c["random"]["copy"]
    assert all(np.isfinite(v) for s in c.values() for v in s.values())
    assert len(list((tmp_path / "samples").glob("*.wav"))) == 9
    try:
        import matplotlib  # noqa: F401  (the bench extra) draws the samples' spectrograms
        assert (tmp_path / "samples" / "spectrograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert not (tmp_path / "samples" / "spectrograms.png").exists()
    readme = (tmp_path / "samples" / "README.md").read_text()  # which track each sample is from
    assert [f"window{n}_model.wav" in readme for n in range(3)] == [True] * 3
    assert len({line.split(": ")[1].split(" from")[0] for line in readme.splitlines()
                if line.startswith("- ")}) == 3  # three different tracks


def test_too_few_tracks_is_a_clear_error(tmp_path, debug_weights_dir, debug_codec_dir, capsys):
    sf.write(tmp_path / "short.wav", chord_track((220.0,), 5.0, 2, 0), 32000)
    rc = ev.main(["--weights", debug_weights_dir, "--codec", debug_codec_dir, "--audio",
                  str(tmp_path), "--out", str(tmp_path / "e.json")])
    assert rc == 1 and "at least 2 tracks" in capsys.readouterr().err


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 4))
    assert abs(ev.frechet(a, a)) < 1e-9
    assert abs(ev.frechet(a, a + 2.0) - 16.0) < 1e-6       # |mean shift|^2 = 4 dims x 2^2


def test_sampling_ablation_adds_a_row_per_variant(tmp_path, debug_weights_dir, debug_codec_dir):
    audio = tmp_path / "tracks"
    audio.mkdir()
    for i, chord in enumerate([(220.0, 277.2), (246.9, 311.1)]):
        sf.write(audio / f"t{i}.wav", chord_track(chord, 19.0, 3, i), 32000, subtype="PCM_16")
    out = tmp_path / "eval.json"
    args = ["--weights", debug_weights_dir, "--codec", debug_codec_dir, "--audio", str(audio),
            "--per-track", "1", "--steps", "1", "--out", str(out)]
    assert ev.main([*args, "--variants", "nonsense"]) == 2
    assert ev.main([*args, "--variants", "gumbel_0,guidance_2,reseed"]) == 0
    result = json.loads(out.read_text())
    v = result["variants"]
    assert list(v) == ["gumbel_0", "guidance_2", "reseed"]
    # reseed: the defaults with other seeds, so its output (and scores) differ from the model row
    assert v["reseed"]["params"] == {"seed_offset": 100_000}
    assert v["reseed"]["metrics"] != result["metrics"]["model"]
    assert v["guidance_2"]["params"] == {"guidance": [2.0] * 4} and v["guidance_2"]["steps"] == [1] * 4
    for row in v.values():
        assert set(row["metrics"]) == set(ev.METRICS) and row["seconds"] >= 0
        assert all(np.isfinite(x) for x in row["metrics"].values())


def test_step_budget_variants_keep_the_default_total():
    from model.sampler import SamplingParams

    total = sum(SamplingParams().steps)
    for name in ("a_heavy", "d_heavy", "flat"):
        assert sum(ev.VARIANTS[name]["steps"]) == total, name


def test_sample_licence_finds_the_corpus_root_above_the_package_folder(tmp_path):
    """Samples name their track's package and licence: the corpus builder writes
    OUT/audio/PKG/NAME.flac, so the manifest sits three levels above the file."""
    corpus = tmp_path / "corpus"
    track = corpus / "audio" / "some-music" / "song-0123.flac"
    track.parent.mkdir(parents=True)
    track.write_bytes(b"")
    row = {"package": "some-music", "licence": "GPL-2+", "status": "kept",
           "output_path": "audio/some-music/song-0123.flac"}
    (corpus / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    (corpus / "summary.json").write_text(json.dumps({"total_hours": 0.1, "kept": 1, "packages": {
        "some-music": {"kept": 1, "hours": 0.1, "licences": {"GPL-2+": 1}}}}))
    assert ev.sample_licence(track) == " (some-music, GPL-2+)"
    assert ev.sample_licence(tmp_path / "elsewhere" / "x.flac") == ""
