"""What each style action means (issue 37): `python -m training.dit.actions` measures the chunks
that select each action, writes descriptions and one example per action beside the weights, and
the server lists them in /info and plays the examples."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient

from model.codec import Codec
from model.dit import DiT, DiTConfig
from model.weights import save_pretrained
from server.app import create_app
from server.settings import Settings
from tests.test_server import assert_error
from training.dit.actions import chunk_features, describe_actions
from training.tokens.shards import write_token_dir

ROOT = Path(__file__).resolve().parents[1]
SR = 32000
CHUNK = 196608          # 6.144 s


def test_chunk_features_measure_loudness_register_and_tempo():
    t = np.arange(CHUNK) / SR
    low = (0.5 * np.sin(2 * np.pi * 110.0 * t)).astype(np.float32)             # A2, -9 dBFS
    high = (0.05 * np.sin(2 * np.pi * 880.0 * t)).astype(np.float32)           # A5, -29 dBFS
    clicks = np.zeros(CHUNK, np.float32)
    for beat in np.arange(0.25, 6.1, 0.5):                                     # 120 BPM
        i = int(beat * SR)
        clicks[i:i + 320] = 0.8 * np.hanning(320) * np.sin(2 * np.pi * 2000.0 * t[:320])
    a, b, c = (chunk_features(x, SR) for x in (low, high, clicks))
    assert abs(a["loudness_db"] - -9.0) < 0.5 and abs(b["loudness_db"] - -29.0) < 0.5
    assert abs(a["register_midi"] - 45) < 2.5 and abs(b["register_midi"] - 81) < 2.5
    assert b["brightness_hz"] > 4 * a["brightness_hz"]
    assert math.isnan(a["tempo_bpm"])                                          # no beat in a sine
    assert abs(c["tempo_bpm"] - 120.0) < 3.0 and 1.5 < c["onsets_per_s"] < 2.6


def test_descriptions_name_what_sets_an_actions_chunks_apart():
    rng = np.random.default_rng(0)
    n = 60
    feats = [dict(loudness_db=-20 + rng.normal(0, 1), brightness_hz=1500 + rng.normal(0, 50),
                  onsets_per_s=2 + rng.normal(0, 0.2), tempo_bpm=120 + rng.normal(0, 1),
                  register_midi=55 + rng.normal(0, 1)) for _ in range(n)]
    weights = np.zeros((n, 3))
    weights[:30, 0], weights[30:, 1] = 1.0, 1.0
    for f in feats[:30]:                       # action 0: louder and an octave lower
        f["loudness_db"] += 10
        f["register_midi"] -= 12
    for f in feats[30:]:                       # action 1: no steady beat
        f["tempo_bpm"] = math.nan
    a0, a1, a2 = describe_actions(weights, feats)
    assert a0["description"].startswith(("loud, low", "low, loud")), a0
    assert a1["description"].startswith(("quiet, high", "high, quiet")), a1
    assert "bright" not in a0["description"] and "busy" not in a0["description"]
    assert "120 BPM" in a0["description"] and "no steady beat" in a1["description"]
    assert a0["share"] == a1["share"] == 0.5 and a1["beat_share"] == 0.0
    assert a2["share"] == 0 and a2["description"].startswith("unused") and a2["medians"] is None


def saved_styled_dit(codec: Codec, out: Path, std: float, actions: int = 3) -> Path:
    """A debug DiT with style actions, random weights of scale `std`, saved to `out`."""
    torch.manual_seed(0)
    dit = DiT(DiTConfig.from_name("debug", codebook_size=codec.codebook_size,
                                  style_actions=actions, style_topk=2))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, std)
    return save_pretrained(dit, out)


@pytest.fixture(scope="module")
def described(tmp_path_factory, debug_codec_dir):
    """A debug DiT with 3 style actions, a token directory of 3 files x 2 chunks (one file's
    audio on disk), and the tool run through its entry point on 5 of the chunks."""
    tmp = tmp_path_factory.mktemp("actions")
    codec = Codec.load(debug_codec_dir)
    weights = saved_styled_dit(codec, tmp / "dit", std=0.5)
    rng = np.random.default_rng(0)
    files = {f"f{i}.wav": [rng.integers(0, codec.codebook_size, 2 * f).astype(np.uint16)
                           for f in codec.frames_per_chunk] for i in range(3)}
    write_token_dir(tmp / "tokens", files, codebook_size=codec.codebook_size,
                    fingerprint=codec.fingerprint)
    (tmp / "audio").mkdir()
    t = np.arange(2 * CHUNK) / SR
    sf.write(tmp / "audio" / "f1.wav", 0.3 * np.sin(2 * np.pi * 220.0 * t), SR)
    r = subprocess.run([sys.executable, "-m", "training.dit.actions", "--weights", str(weights),
                        "--codec", debug_codec_dir, "--tokens", str(tmp / "tokens"),
                        "--audio", str(tmp / "audio"), "--chunks", "5", "--threads", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return weights, json.loads((weights / "style_actions.json").read_text()), r.stdout


def test_the_tool_writes_descriptions_and_an_example_per_used_action(described):
    weights, notes, stdout = described
    assert notes["chunks"] == 5 and sum(notes["audio"].values()) == 5
    assert notes["audio"]["original"] >= 1 and notes["audio"]["decoded"] >= 1
    actions = notes["actions"]
    assert [a["action"] for a in actions] == [0, 1, 2]
    assert sum(a["chunks"] for a in actions) == 5 and abs(sum(a["share"] for a in actions) - 1) < 1e-3
    for a in actions:
        assert f"action {a['action']}: {a['description']}" in stdout
        if a["chunks"]:
            y, sr = sf.read(weights / a["example"]["file"])
            assert sr == SR and len(y) == CHUNK and np.abs(y).max() <= 1.0   # peak-normalised to 0.9 (Vorbis overshoots a little)
            assert set(a["medians"]) == {"loudness_db", "brightness_hz", "onsets_per_s",
                                         "tempo_bpm", "register_midi"}
        else:
            assert a["example"] is None and a["description"].startswith("unused")


def test_the_server_lists_the_descriptions_and_plays_the_examples(described, debug_codec_dir,
                                                                   debug_weights_dir):
    weights, notes, _ = described
    app = create_app(Settings(weights=str(weights), codec=debug_codec_dir, warmup=False))
    with TestClient(app) as client:
        listed = client.get("/info").json()["engine"]["style"]["actions"]
        assert [a["description"] for a in listed] == [a["description"] for a in notes["actions"]]
        for a in listed:
            r = client.get(f"/actions/{a['action']}/example")
            if a["example"]:
                assert r.status_code == 200 and r.headers["content-type"] == "audio/ogg"
                assert len(r.content) > 1000
            else:
                assert_error(r, 404, "no_example", "python -m training.dit.actions")
        assert_error(client.get("/actions/3/example"), 422, "invalid_parameter", "[0, 2]")
        assert_error(client.get("/actions/x/example"), 422, "invalid_parameter")
    # another model's notes (2 actions for 3), or notes of other weights (a later export), are
    # not shown as this model's
    stale = weights.parent / "stale"
    stale.mkdir()
    for f in ("config.json", "model.safetensors"):
        (stale / f).write_bytes((weights / f).read_bytes())
    from model.style import weights_digest

    for notes_of, why in (([0, 1], "does not describe this model's 3 actions"),
                          ([0, 1, 2], "describes other weights")):
        (stale / "style_actions.json").write_text(json.dumps(
            {"weights_sha256": weights_digest(stale) if why.startswith("does") else "0" * 64,
             "actions": [dict(action=k, description="x") for k in notes_of]}))
        with TestClient(create_app(Settings(weights=str(stale), codec=debug_codec_dir,
                                            warmup=False))) as client:
            style = client.get("/info").json()["engine"]["style"]
            assert [a["description"] for a in style["actions"]] == [None] * 3
            assert why in style["detail"]
            assert_error(client.get("/actions/0/example"), 404, "no_example")
    with TestClient(create_app(Settings(weights=debug_weights_dir, codec=debug_codec_dir,
                                        warmup=False))) as client:
        assert_error(client.get("/actions/0/example"), 422, "no_style_actions")


def test_the_tool_refuses_a_model_without_style_actions(debug_weights_dir, debug_codec_dir,
                                                         tmp_path):
    from training.dit.actions import main

    with pytest.raises(SystemExit, match="has no style actions"):
        main(["--weights", debug_weights_dir, "--codec", debug_codec_dir, "--tokens",
              str(tmp_path)])


def test_the_tool_refuses_tokens_of_another_codec_and_a_missing_token_directory(
        described, debug_codec_dir, tmp_path):
    weights, _, _ = described
    rng = np.random.default_rng(0)
    write_token_dir(tmp_path / "other", {"a.wav": [rng.integers(0, 64, 64 * 8 // s).astype(
        np.uint16) for s in (8, 4, 2, 1)]}, codebook_size=64, fingerprint="another")
    from training.dit.actions import main

    for tokens, why in ((tmp_path / "other", "holds the codes of codec another"),
                        (tmp_path / "none", "no manifest.json")):
        with pytest.raises(SystemExit, match=why):      # a message, not a traceback
            main(["--weights", str(weights), "--codec", debug_codec_dir, "--tokens",
                  str(tokens)])


def test_the_client_and_cli_list_the_actions_and_save_an_example(described, debug_codec_dir,
                                                                 tmp_path):
    from clients import Client
    from server.background import serve_in_background

    weights, notes, _ = described
    used = next(a["action"] for a in notes["actions"] if a["chunks"])
    app = create_app(Settings(weights=str(weights), codec=debug_codec_dir, warmup=False))
    with serve_in_background(app) as url:
        with Client(url) as c:
            assert [a["description"] for a in c.actions()] == [
                a["description"] for a in notes["actions"]]
            assert c.action_example(used)[:4] == b"OggS"
        cli = [sys.executable, "-m", "clients", "actions", "--url", url]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        listed = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                env=env)
        assert listed.returncode == 0, listed.stderr
        for a in notes["actions"]:
            assert f"{a['action']}: {a['description']}" in listed.stdout
        saved = subprocess.run(cli + ["--example", str(used)], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120,
                               env=env)
        assert saved.returncode == 0, saved.stderr
        y, sr = sf.read(tmp_path / f"action-{used}.ogg")
        assert sr == SR and len(y) == CHUNK
        again = subprocess.run(cli + ["--example", str(used)], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120,
                               env=env)
        assert again.returncode != 0 and "exists; pass --force" in again.stderr


def test_the_model_card_tables_the_actions_and_the_style_evaluation(described, tmp_path):
    from training.dit.card import style_section

    weights, notes, _ = described
    evaluation = dict(windows=8, chance=0.125, rows={
        "unstyled": dict(ref_retrieval=0.125, style_retrieval=0.25, toward_timbre=0.0,
                         toward_chroma=0.0, seam_ratio=1.0),
        "cfg:2": dict(ref_retrieval=0.5, style_retrieval=0.75, toward_timbre=0.12,
                      toward_chroma=0.03, seam_ratio=1.1)})
    text = style_section(weights, evaluation)
    for a in notes["actions"]:
        assert f"| {a['action']} | {100 * a['share']:.0f} % | {a['description']} |" in text
    assert "measured on 5 chunks" in text and "| cfg:2 | 0.500 | 0.750 | 0.120 |" in text
    assert style_section(tmp_path) == ""                  # nothing measured: no section
