"""The CPU fast path (model/fast.py): exact levers stay exact, opt-in levers switch on and off,
and the server says which serve (/info, the start-up log) and takes a switch for each."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import model.attention as attn
from model.attention_rule import attention_ref
from model.engine import ContinuationEngine
from model.fast import FastPath, apply_fast_path, describe
from model.layout import collate, fill_tokens
from model.sampler import SamplingParams, generate
from server.app import create_app
from server.settings import Settings
from tests.test_sampler import FPC, assert_logits_match_full_forward, context, tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def maskless_restored():
    yield
    attn.set_maskless(True)


def test_maskless_sdpa_is_the_masked_attention_and_only_serves_where_all_is_allowed():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
    allowed = torch.tensor([[True, True], [True, True]])
    seg = torch.tensor([[0] * 12 + [1] * 12])
    ref = attention_ref(q, k, v, seg, seg, allowed)
    for on in (True, False):
        attn.set_maskless(on)
        assert attn._sdpa_plan(seg, seg, allowed, torch.float32)[2] is on
        torch.testing.assert_close(attn.attention(q, k, v, seg, seg, allowed), ref,
                                   atol=1e-6, rtol=0)
    attn.set_maskless(True)
    padded = torch.tensor([[0] * 12 + [1] * 10 + [-1] * 2])  # padding is never allowed
    causal = torch.tensor([[True, False], [True, True]])
    assert not attn._sdpa_plan(padded, padded, allowed, torch.float32)[2]
    assert not attn._sdpa_plan(seg, seg, causal, torch.float32)[2]


def test_one_unguided_request_runs_maskless_and_equals_the_full_recompute(monkeypatch):
    """The single-request passes (maskless SDPA, modulation broadcast per segment) give every
    logit the training layout's full forward gives, and the same tokens as the masked path."""
    model, ctx = tiny(), context(B=1)
    plans = []
    plan = attn._sdpa_plan
    monkeypatch.setattr(attn, "_sdpa_plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    seen = []
    out = generate(model, ctx, SamplingParams(steps=(3, 2, 2, 2), seed=0),
                   on_step=lambda *a: seen.append(a))
    assert plans and all(p[2] for p in plans)  # every forward of this request ran maskless
    batch = collate([2], FPC, model.config.strides)
    full = fill_tokens(batch, [torch.cat([c, o], 1) for c, o in zip(ctx, out, strict=True)])
    assert_logits_match_full_forward(model, batch, full, seen)
    attn.set_maskless(False)
    again = generate(model, ctx, SamplingParams(steps=(3, 2, 2, 2), seed=0))
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))


@pytest.fixture
def engine(debug_weights_dir, debug_codec_dir):
    return ContinuationEngine.load(debug_weights_dir, debug_codec_dir)


def test_int8_switches_on_and_off_and_is_refused_where_it_cannot_apply(engine):
    exact = engine.dit
    report = apply_fast_path(engine, FastPath(int8=True))
    assert report["int8"]["on"] and not report["int8"]["exact"]
    assert isinstance(exact.blocks[0].attn.qkv, torch.nn.Linear)  # the exact model is kept
    assert not isinstance(engine.dit.blocks[0].attn.qkv, torch.nn.Linear)
    assert isinstance(engine.dit.heads[0], torch.nn.Linear)  # the logits stay fp32
    quantised = engine.dit
    apply_fast_path(engine, FastPath(int8=True))  # idempotent: not quantised twice
    assert engine.dit is quantised
    out = engine.continue_audio(torch.randn(engine.chunk_samples) * 0.1,
                                SamplingParams(steps=1, seed=0))
    assert out.shape == (engine.chunk_samples,) and torch.isfinite(out).all()
    assert not apply_fast_path(engine, FastPath())["int8"]["on"] and engine.dit is exact
    engine.dtype = torch.bfloat16  # as a DiT served in bf16 reports itself
    report = apply_fast_path(engine, FastPath(int8=True))
    assert not report["int8"]["on"] and "fp32" in report["int8"]["detail"]
    assert engine.dit is exact
    with pytest.raises(ValueError, match="threads"):
        FastPath(threads=-1)
    with pytest.raises(ValueError, match="unknown lever"):
        FastPath.from_names("maskless,turbo")


def test_inplace_snake_is_snacs_bit_for_bit_and_keeps_the_fingerprints(engine):
    codec = engine.codec
    before = codec.fingerprint, codec.codes_fingerprint
    audio = torch.randn(1, 2 * codec.pad_samples, generator=torch.Generator().manual_seed(0))
    apply_fast_path(engine, FastPath(inplace_snake=False))
    assert not describe(engine)["inplace_snake"]["on"]
    tokens = codec.encode(audio * 0.1)
    decoded = codec.decode(tokens, seed=0)
    codec._fingerprint = codec._codes_fingerprint = None
    assert apply_fast_path(engine, FastPath())["inplace_snake"]["on"]
    assert (codec.fingerprint, codec.codes_fingerprint) == before  # state_dict keys unchanged
    assert all(torch.equal(a, b) for a, b in zip(tokens, codec.encode(audio * 0.1), strict=True))
    assert torch.equal(decoded, codec.decode(tokens, seed=0))


def test_server_reports_the_levers_and_each_switch_turns_one_off(engine, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="server")
    with TestClient(create_app(Settings(warmup=False), engine=engine)) as c:
        levers = c.get("/info").json()["engine"]["fast_path"]
    assert levers["maskless"] == dict(on=True, exact=True, detail=levers["maskless"]["detail"])
    assert levers["inplace_snake"]["on"] and not levers["int8"]["on"]
    assert any(r.getMessage().startswith("fast path: maskless on") for r in caplog.records)
    monkeypatch.setenv("SNAC_DIT_MASKLESS", "0")
    monkeypatch.setenv("SNAC_DIT_INPLACE_SNAKE", "false")
    monkeypatch.setenv("SNAC_DIT_INT8", "1")
    monkeypatch.setenv("SNAC_DIT_THREADS", "1")
    with TestClient(create_app(Settings(warmup=False), engine=engine)) as c:
        levers = c.get("/info").json()["engine"]["fast_path"]
        r = c.post("/continue?steps=1&seed=0", files={"audio": (
            "a.wav", _wav(torch.randn(32000).numpy() * 0.1), "audio/wav")})
    assert r.status_code == 200, r.text
    assert not levers["maskless"]["on"] and not levers["inplace_snake"]["on"]
    assert levers["int8"]["on"]
    assert levers["threads"]["detail"].startswith("1 ")
    monkeypatch.setenv("SNAC_DIT_THREADS", "-1")
    with pytest.raises(ValueError, match="threads"):
        Settings()


def _wav(x) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, 32000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_realtime_bench_times_continue_and_each_extend_piece(debug_weights_dir, debug_codec_dir,
                                                              tmp_path):
    import shutil

    out, other = tmp_path / "rt.jsonl", str(tmp_path / "other_dit")
    shutil.copytree(debug_weights_dir, other)
    subprocess.run([sys.executable, "bench/realtime.py", "--weights", debug_weights_dir,
                    "--codec", debug_codec_dir, "--threads", "1", "--steps", "1,1,1,1",
                    "--warmup", "0", "--repeats", "1", "--chunks", "2", "--isa", "avx2",
                    "--levers", "maskless,int8", "--modes", "continue,extend,paired,weights,http_paired",
                    "--compare", "none/maskless,int8",
                    "--compare-weights", f"{debug_weights_dir},{other}", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    cont, ext, paired, dits, http = (json.loads(line) for line in out.read_text().splitlines())
    assert set(paired["compare"]) == {"none", "maskless,int8"}
    assert all(len(v["totals_s"]) == 1 for v in paired["compare"].values())
    assert list(dits["compare"]) == [debug_weights_dir, other]      # each DiT timed, in turn
    assert all(v["params_m"] > 0 and v["median_s"]["sample"] > 0 and v["realtime_factor"] > 0
               for v in dits["compare"].values())
    # through the app and, before each request, the server's own engine directly
    assert len(http["totals_s"]["http"]) == len(http["totals_s"]["engine"]) == 1
    assert http["median_s"]["total"] > 0 and http["engine_median_s"] > 0
    assert cont["mode"] == "continue" and ext["mode"] == "extend"
    assert cont["cpu"]["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert cont["cpu"]["torch_capability"] in ("AVX2", "DEFAULT")
    assert cont["levers"] == dict(maskless=True, inplace_snake=False, int8=True)
    med = cont["median_s"]
    assert med["total"] >= med["encode"] + med["sample"] + med["decode"] > 0
    assert [p["audio_s"] for p in ext["pieces"]] == [5.376, 6.912]  # 6.144 -/+ the holdback
    assert ext["pieces"][0]["encode"] > 0 and ext["pieces"][1]["encode"] == 0


def test_describe_reads_the_engine_state(engine):
    attn.set_maskless(False)
    assert not describe(engine)["maskless"]["on"]
    assert engine.info()["fast_path"]["threads"]["on"]


def test_same_music_check_reports_masked_ce_and_token_identity(debug_weights_dir,
                                                              debug_codec_dir, tmp_path):
    import soundfile as sf

    from tests.conftest import tone

    files = []
    for i, f0 in enumerate((220.0, 330.0)):
        files.append(tmp_path / f"t{i}.wav")
        sf.write(files[-1], tone(19.0, freq=f0), 32000)
    out = tmp_path / "check.json"
    subprocess.run([sys.executable, "bench/fast_path_check.py", "--weights", debug_weights_dir,
                    "--codec", debug_codec_dir, "--audio", *map(str, files), "--per-track", "1",
                    "--steps", "1,1,1,1", "--levers", "maskless", "maskless,int8",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["windows"] == 2
    assert set(r["masked_ce"]) == {"none", "none, other masks", "maskless", "maskless,int8"}
    assert r["masked_ce"]["maskless"] == r["masked_ce"]["none"]  # full layout: no cache path
    assert r["same_tokens"]["maskless"] == [1.0] * 4  # exact: the same tokens
