"""bench/eval_style.py: its scores on designed continuations, and its entry point on a debug
model with style actions (issue 37's measurement)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.test_eval_continuation import chord_track

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("eval_style", ROOT / "bench/eval_style.py")
ev = importlib.util.module_from_spec(spec)
sys.path.insert(0, str(ROOT / "bench"))
spec.loader.exec_module(ev)
CHORDS = [(220.0, 277.2, 329.6), (246.9, 311.1, 370.0), (174.6, 207.7, 261.6),
          (196.0, 246.9, 293.7)]


def test_scores_tell_a_continuation_that_follows_its_reference_from_one_that_ignores_it():
    tracks = [chord_track(c, 12.0, 2 + 2 * i, i) for i, c in enumerate(CHORDS)]
    contexts = [t[:6 * 32000] for t in tracks]
    ref_of = ev.derangement(list(range(4)), seed=0)
    assert all(j != i for i, j in enumerate(ref_of))
    references = [tracks[j][6 * 32000:] for j in ref_of]
    ignoring = [t[6 * 32000:] for t in tracks]            # its own track's continuation
    following = [r.copy() for r in references]             # sounds like its reference
    features = ev.Features(32000)
    style_of = lambda x: features.frames(x)[:, 19:].mean(0)   # noqa: E731 - chroma as "style"
    ref_styles = np.stack([style_of(r) for r in references])
    ign = ev.score(features, contexts, references, ref_styles, ignoring, ignoring, style_of)
    fol = ev.score(features, contexts, references, ref_styles, following, ignoring, style_of)
    assert ign["toward_timbre"] == 0.0 and ign["toward_chroma"] == 0.0
    assert ign["ref_retrieval"] == 0.0 and fol["ref_retrieval"] == 1.0
    assert fol["style_retrieval"] == 1.0
    assert fol["toward_timbre"] > 0.2 and fol["toward_chroma"] > 0.05
    assert fol["context_timbre"] < ign["context_timbre"]   # it left its own context's sound
    assert ev.parse_modes("cfg:1, icg:2.5") == [("cfg", 1.0), ("icg", 2.5)]


def test_entry_point_on_a_model_with_style_actions(tmp_path, debug_codec_dir, debug_weights_dir):
    from model.codec import Codec
    from tests.test_style_actions import saved_styled_dit

    weights = saved_styled_dit(Codec.load(debug_codec_dir), tmp_path / "dit", std=0.05)
    audio = tmp_path / "tracks"
    audio.mkdir()
    for i, chord in enumerate(CHORDS[:2]):
        sf.write(audio / f"t{i}.wav", chord_track(chord, 19.0, 2 + 3 * i, i), 32000,
                 subtype="PCM_16")
    out = tmp_path / "style.json"
    cmd = [sys.executable, "bench/eval_style.py", "--codec", debug_codec_dir, "--audio",
           str(audio), "--per-track", "1", "--steps", "1,1,1,1", "--modes", "icg:2",
           "--threads", "1", "--out", str(out)]
    r = subprocess.run(cmd + ["--weights", str(weights)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["windows"] == 2 and result["chance"] == 0.5
    rows = result["rows"]
    assert list(rows) == ["unstyled", "icg:2"]
    assert rows["unstyled"]["seam_ratio"] == 1.0 and rows["unstyled"]["toward_timbre"] == 0.0
    for row in rows.values():
        assert 0 <= row["ref_retrieval"] <= 1 and 0 <= row["style_retrieval"] <= 1
        assert row["seam"] > 0 and row["seconds"] > 0
    assert "| icg:2 |" in r.stdout and "chance retrieval 0.500" in r.stdout
    import pytest

    with pytest.raises(SystemExit, match="has no style actions"):
        ev.main(cmd[2:] + ["--weights", debug_weights_dir])
