import json

import pytest
import torch

from model.dit import DiT, DiTConfig
from model.engine import ContinuationEngine
from model.sampler import SamplingParams
from model.weights import load_dit, read_dit_config, save_pretrained

CHUNK = 196_608
FAST = SamplingParams(steps=(2, 1, 1, 1), seed=123)


@pytest.fixture(scope="module")
def engine(debug_weights_dir, debug_codec_dir):
    eng = ContinuationEngine.load(debug_weights_dir, debug_codec_dir)
    with torch.no_grad():  # zero-initialised heads would make every token equally likely
        torch.manual_seed(1)
        for p in eng.dit.parameters():
            p.normal_(0.0, 0.05)
    return eng


def audio(seconds, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 32000)
    t = torch.arange(n) / 32000
    return 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.01 * torch.randn(n, generator=g)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    dit = DiT(DiTConfig.from_name("debug", codebook_size=64))
    save_pretrained(
        dit, tmp_path / "ckpt", extra={"diffusion": {"context_dropout": 0.2}, "step": 7}
    )
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["dit"]["codebook_size"] == 64 and cfg["step"] == 7
    assert read_dit_config(tmp_path / "ckpt")["diffusion"] == {"context_dropout": 0.2}
    back = load_dit(tmp_path / "ckpt")
    assert back.config == dit.config
    sd, sd2 = dit.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert all(isinstance(p, torch.nn.Parameter) for p in back.parameters())
    with pytest.raises(ValueError):
        save_pretrained(dit, tmp_path / "x", extra={"dit": {}})
    with pytest.raises(FileNotFoundError):
        load_dit(tmp_path / "missing")
    (tmp_path / "ckpt" / "config.json").write_text(
        json.dumps({"dit": {**cfg["dit"], "d_model": 32}})
    )
    with pytest.raises(ValueError):
        load_dit(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def reference(engine):
    """12.288 s of audio and its continuation with FAST (computed once: the codec dominates)."""
    full = audio(12.288)
    return full, engine.continue_audio(full, FAST)


def test_continue_geometry(engine, reference):
    _, out = reference
    assert out.shape == (CHUNK,) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0 and out.abs().max() > 0
    assert engine.chunk_samples == CHUNK and engine.context_samples == 2 * CHUNK


def test_window_is_the_last_whole_chunks(engine, reference):
    full, _ = reference
    assert torch.equal(engine._window(torch.cat([audio(2.0, seed=2), full])), full)
    assert torch.equal(engine._window(full.double()), full)
    nine = audio(9.0, seed=3)
    assert torch.equal(engine._window(nine), nine[-CHUNK:])          # one chunk, no silence
    short = audio(3.0, seed=1)                                        # under a chunk: padded
    assert torch.equal(engine._window(short), torch.cat([torch.zeros(CHUNK - len(short)), short]))
    assert [engine.context_chunks_for(n) for n in (1, CHUNK - 1, CHUNK, 2 * CHUNK - 1,
                                                   2 * CHUNK, 5 * CHUNK)] == [1, 1, 1, 1, 2, 2]


def test_short_input_is_a_one_chunk_context_not_silence(engine):
    """9 s of input continue from its last 6.144 s (n_ctx = 1): the first 2.856 s do not matter,
    which they would if the input were left-padded with silence to 12.288 s."""
    nine = audio(9.0, seed=3)
    a = engine.continue_audio(nine, FAST)
    b = engine.continue_audio(nine[-CHUNK:], FAST)
    c = engine.continue_audio(torch.cat([audio(2.856, seed=8), nine[-CHUNK:]]), FAST)
    assert torch.equal(a, b) and torch.equal(a, c)
    chained = list(engine.extend(nine, 2, FAST))
    assert torch.equal(chained[0], a[: CHUNK - engine.holdback_samples])
    assert sum(len(x) for x in chained) == 2 * CHUNK


def test_batch_with_short_input_and_guided_mate(engine, reference):
    full, out = reference
    guided = SamplingParams(steps=(1, 2, 1, 1), guidance=2.0, seed=7)
    short, nine = audio(3.0, seed=1), audio(9.0, seed=3)
    outs = engine.continue_batch([short, full, nine], [guided, FAST, FAST])
    assert len(outs) == 3 and all(o.shape == (CHUNK,) and torch.isfinite(o).all() for o in outs)
    # a request's result does not depend on its batch mates (other params, guidance rows,
    # other context lengths, batched encode): each equals the single request's audio
    assert torch.allclose(outs[1], out, atol=1e-5)
    assert torch.allclose(outs[0], engine.continue_audio(short, guided), atol=1e-5)
    assert torch.allclose(outs[2], engine.continue_audio(nine, FAST), atol=1e-5)
    assert not torch.allclose(outs[0], out)
    assert engine.continue_batch([]) == []


def test_extend_yields_chunks_and_first_equals_continue(engine, reference):
    full, out = reference
    H = engine.holdback_samples
    chunks = list(engine.extend(full, 3, FAST))
    assert [c.shape[0] for c in chunks] == [CHUNK - H, CHUNK, CHUNK + H]
    assert torch.equal(chunks[0], out[: CHUNK - H])
    assert not torch.equal(chunks[1], chunks[2][:CHUNK])
    (one,) = engine.extend(full, 1, FAST)
    assert torch.equal(one, out)
    with pytest.raises(ValueError):
        engine.extend(full, 0, FAST)  # raised at the call, not at the first next()
    with pytest.raises(ValueError):
        engine.extend(torch.zeros(0), 2, FAST)


def test_bad_input_and_info(engine):
    for bad in (
        torch.zeros(2, 100),
        torch.zeros(0),
        torch.full((100,), float("nan")),
        torch.zeros(5, dtype=torch.long),
    ):
        with pytest.raises(ValueError):
            engine.continue_audio(bad, FAST)
    with pytest.raises(ValueError, match="steps"):
        engine.continue_audio(audio(1.0), SamplingParams(steps=(0, 1, 1, 1)))
    with pytest.raises(ValueError):
        engine.continue_batch([audio(1.0)], [FAST, FAST])
    info = json.loads(json.dumps(engine.info()))
    assert info["geometry"]["chunk_samples"] == CHUNK and info["geometry"]["frames_per_chunk"] == [
        64,
        128,
        256,
        512,
    ]
    assert info["defaults"]["steps"] == [16, 12, 8, 8] and info["model"]["params"] > 0
    with pytest.raises(ValueError, match="disagree"):
        ContinuationEngine(engine.codec, DiT(DiTConfig.from_name("debug", codebook_size=1024)))


def test_extend_is_seam_exact_against_a_one_pass_decode(engine, reference):
    """The chained output equals a decode of the context and all generated tokens in one pass
    (same seed), everywhere: the chunk tails are re-decoded once the next chunk exists."""
    from model.sampler import derive_seed
    from model.sampler import extend as extend_tokens

    full, _ = reference
    n = 3
    chained = torch.cat(list(engine.extend(full, n, FAST)))
    context = engine._encode([full])
    new = list(extend_tokens(engine.dit, context, n, FAST, engine.diffusion.schedules))
    # What is decoded: the context with its end re-heard next to the first chunk (the join).
    heard = engine.heard_context(context, engine._window(full), new[0], engine._params(FAST).seed)
    tokens = [torch.cat([c, *(chunk[lv] for chunk in new)], dim=1) for lv, c in enumerate(heard)]
    seed = derive_seed(engine._params(FAST).seed, 0, "decode") % 2**31
    one_pass = engine.codec.decode(tokens, seed=seed)[0, 2 * CHUNK:].clamp(-1, 1)  # 2-chunk ctx
    assert chained.shape == one_pass.shape == (n * CHUNK,)
    torch.testing.assert_close(chained, one_pass, atol=1e-5, rtol=0)
    # Without the hold-back the old seams are real: each chunk decoded with only its left
    # context differs from the one-pass decode near its end.
    naive = engine.codec.decode([t[:, : 2 * f + f] for t, f in
                                 zip(tokens, engine.codec.frames_per_chunk, strict=True)],
                                seed=seed)[0, 2 * CHUNK:]
    assert (naive[-engine.holdback_samples:] - one_pass[CHUNK - engine.holdback_samples:CHUNK]
            ).abs().max() > 1e-3


def test_holdback_and_left_window_cover_the_decoders_reach(debug_codec):
    """How far the decoder sees, measured: decoding without the following chunk changes only
    the last samples, fewer than the engine holds back; decoding from LEFT_PADS before a chunk
    instead of from its whole context changes nothing. The reach depends on the rates, kernels
    and attention window (shared by every snac_32khz-geometry codec), not on the widths."""
    from model.engine import HOLDBACK_PADS, LEFT_PADS

    codec = debug_codec
    g = torch.Generator().manual_seed(0)
    tok = [torch.randint(0, codec.codebook_size, (1, 3 * f), generator=g)
           for f in codec.frames_per_chunk]
    whole = codec.decode(tok, seed=5)
    cut = codec.decode([t[:, : 2 * f] for t, f in zip(tok, codec.frames_per_chunk, strict=True)],
                       seed=5)
    diff = (cut - whole[:, : cut.shape[1]]).abs()[0]
    changed = (diff > 1e-5).nonzero()
    reach = cut.shape[1] - int(changed[0])
    assert 8_000 < reach < HOLDBACK_PADS * codec.pad_samples, reach
    pf, s0 = codec.pad_frames, codec.strides[0]
    for pads, exact in ((LEFT_PADS, True), (1, False)):
        ctx = [t[:, 2 * f - pads * p: 2 * f] for t, f, p in zip(tok, codec.frames_per_chunk, pf,
                                                                 strict=True)]
        new = [t[:, 2 * f:] for t, f in zip(tok, codec.frames_per_chunk, strict=True)]
        short = codec.decode(new, context=ctx, seed=5,
                             first_frame=(2 * codec.frames_per_chunk[0] - pads * pf[0]) * s0)
        err = float((short - whole[:, 2 * CHUNK:]).abs().max())
        assert (err < 1e-5) is exact, (pads, err)


def test_decode_noise_is_keyed_to_absolute_positions(debug_codec):
    codec = debug_codec
    F = codec.frames_per_chunk
    g = torch.Generator().manual_seed(1)
    tok = [torch.randint(0, codec.codebook_size, (1, 4 * f), generator=g) for f in F]
    part = [lambda a, b, t=t, f=f: t[:, a * f: b * f] for t, f in zip(tok, F, strict=True)]
    whole = codec.decode(tok, seed=9)
    window = codec.decode([p(2, 3) for p in part], context=[p(1, 2) for p in part],
                          right_context=[p(3, 4) for p in part], seed=9,
                          first_frame=F[0] * codec.strides[0])
    torch.testing.assert_close(window, whole[:, 2 * CHUNK: 3 * CHUNK], atol=1e-5, rtol=0)
    misplaced = codec.decode([p(2, 3) for p in part], context=[p(1, 2) for p in part],
                             right_context=[p(3, 4) for p in part], seed=9)
    assert (misplaced - window).abs().max() > 1e-2
    assert not torch.equal(codec.decode(tok, seed=9), codec.decode(tok, seed=10))
    with pytest.raises(ValueError, match="first_frame"):
        codec.decode(tok, seed=9, first_frame=5)


def test_round_trip_is_the_codecs_own_rendering_of_the_span(engine):
    """round_trip (the codec row of bench/eval_continuation.py) decodes only the tokens around
    the span, yet equals that span of a decode of all the audio's tokens (same seed)."""
    from model.sampler import derive_seed

    x = audio(3 * CHUNK / 32000, seed=3)
    got = engine.round_trip([x, x.flip(0)], 2 * CHUNK, 3 * CHUNK, seed=4)
    assert [g.shape for g in got] == [(CHUNK,)] * 2
    codec = engine.codec
    whole = codec.decode(codec.encode(x[None]), seed=derive_seed(4, 0, "decode") % 2**31)
    torch.testing.assert_close(got[0], whole[0, 2 * CHUNK:].clamp(-1, 1), atol=1e-5, rtol=0)
    assert (got[0] - got[1]).abs().max() > 1e-3                    # each row its own audio
    for bad in (dict(audios=[x], start=CHUNK, end=CHUNK), dict(audios=[x], start=0, end=4 * CHUNK),
                dict(audios=[x, x[:-1]], start=0, end=CHUNK), dict(audios=[], start=0, end=1)):
        with pytest.raises(ValueError):
            engine.round_trip(**bad)


def test_a_device_fault_marks_the_engine_dead_but_oom_and_bad_input_do_not(engine):
    from model.engine import DeviceFault

    eng = engine
    audio = torch.zeros(eng.chunk_samples)
    real = eng.dit.forward
    try:
        for error in (torch.cuda.OutOfMemoryError("CUDA out of memory"), ValueError("bad")):
            eng.dit.forward = lambda *a, error=error, **kw: (_ for _ in ()).throw(error)
            with pytest.raises(type(error)):
                eng.continue_batch([audio])
            assert eng.healthy
        eng.dit.forward = lambda *a, **kw: (_ for _ in ()).throw(
            RuntimeError("CUDA error: an illegal memory access was encountered"))
        with pytest.raises(RuntimeError, match="illegal memory access"):
            eng.continue_batch([audio])
        assert not eng.healthy
        eng.dit.forward = real
        for call in (lambda: eng.continue_batch([audio]), lambda: next(eng.extend(audio, 1)),
                     lambda: eng.loop_batch([audio])):
            with pytest.raises(DeviceFault, match="illegal memory access"):
                call()
    finally:
        eng.dit.forward = real
        eng.fault = None


def test_warmup_runs_the_full_context_layout_with_the_lead_in(engine, monkeypatch):
    import model.engine as engine_module

    seen = []
    real = engine_module.generate
    monkeypatch.setattr(engine_module, "generate", lambda dit, ctx, *a, **kw: seen.append(
        (ctx[0].shape, len(a[0]))) or real(dit, ctx, *a, **kw))
    leads = []
    real_batch = type(engine).continue_batch
    monkeypatch.setattr(type(engine), "continue_batch",
                        lambda self, *a, **kw: leads.append(kw.get("lead_in")) or
                        real_batch(self, *a, **kw))
    engine.warmup(batch_sizes=(1, 2))
    fpc = engine.codec.frames_per_chunk[0]
    assert seen == [((1, 2 * fpc), 1), ((2, 2 * fpc), 2), ((1, fpc), 1), ((2, fpc), 2)]
    assert set(leads) == {engine_module.JOIN_SAMPLES}


def test_a_batch_decodes_and_rehears_together_with_the_same_samples_as_one_at_a_time(engine):
    # The join (decode + encode) and the output decode run once per batch, each row with its
    # own seed; every row equals its request served alone, bit for bit.
    from model.engine import JOIN_SAMPLES

    audios = [audio(12.288, seed=s) for s in (4, 5, 6)]
    params = [SamplingParams(steps=(1, 1, 1, 1), seed=s) for s in (11, 12, 13)]
    calls = {"encode": 0, "decode": 0}
    codec = engine.codec
    real = {k: getattr(codec, k) for k in calls}

    def counted(name):
        def call(*a, **kw):
            calls[name] += 1
            return real[name](*a, **kw)
        return call

    rows = engine.codec_rows
    try:
        for name in calls:
            setattr(codec, name, counted(name))
        engine.codec_rows = None  # as on a GPU: a batch's rows in one codec call
        together = engine.continue_batch(audios, params, lead_in=JOIN_SAMPLES)
        assert calls == {"encode": 2, "decode": 2}  # context + join re-encode; join + output
        engine.codec_rows = 1  # as on a CPU (faster there): one row per call, same samples
        row_by_row = engine.continue_batch(audios, params, lead_in=JOIN_SAMPLES)
        assert calls == {"encode": 2 + 6, "decode": 2 + 6}
    finally:
        engine.codec_rows = rows
        for name in calls:
            delattr(codec, name)
    for a, p, got, row in zip(audios, params, together, row_by_row, strict=True):
        alone = engine.continue_batch([a], [p], lead_in=JOIN_SAMPLES)[0]
        assert torch.equal(got, alone) and torch.equal(row, alone)
