"""Style actions (issue 37): the action model, its path into the DiT, training, sampling, engine."""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from model.diffusion import MaskedDiffusion
from model.dit import DiT, DiTConfig
from model.engine import ContinuationEngine, StyleRequest, StyleUnsupported
from model.layout import CONTEXT
from model.sampler import SamplingParams, generate
from model.weights import load_dit, save_pretrained
from tests.test_dit import FPC, inputs, tiny
from training.dit.step import LossModule, target_style

ROOT = Path(__file__).resolve().parents[1]
STYLE = dict(style_actions=4, style_topk=2)


def without_style(model: DiT) -> DiT:
    """The same weights in a model built without the style path (as before issue 37)."""
    plain = DiT(replace(model.config, style_actions=0)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("style")}
    plain.load_state_dict(state, strict=True)
    return plain


def test_config_fields_validate_and_old_configs_load():
    cfg = DiTConfig.from_name("debug", frames_per_chunk=FPC, **STYLE)
    assert DiTConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    old = {k: v for k, v in asdict(cfg).items() if not k.startswith("style")}
    assert DiTConfig.from_dict(old).style_actions == 0
    for bad in (dict(style_actions=-1), dict(style_actions=4, style_topk=5),
                dict(style_actions=4, style_topk=0), dict(style_dropout=1.5),
                dict(style_warmup=-1)):
        with pytest.raises(ValueError):
            DiTConfig.from_name("debug", **bad)


def test_blocks_are_identity_and_style_changes_nothing_at_init():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=32, **STYLE))
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
             for b in model.blocks]
    batch, tokens, seg_t = inputs([2, 0])
    style = torch.randn(2, model.config.d_model)
    h = model(tokens, batch, seg_t, style=style)
    for hk in hooks:
        hk.remove()
    assert len(seen) == model.config.n_layers
    assert all(torch.equal(x_in, x_out) for x_in, x_out in seen)
    # The zero projection: the style path added to a model starts as that model exactly.
    with torch.no_grad():
        for blk in model.blocks:  # open the gates so a style could show if it leaked through
            blk.adaLN.weight.normal_(0, 0.2)
        assert torch.equal(model(tokens, batch, seg_t, style=style), model(tokens, batch, seg_t))
    assert h.shape[:2] == tokens.shape


@torch.no_grad()
def test_dropped_style_is_exactly_the_model_without_the_style_path():
    model = tiny(**STYLE)
    plain = without_style(model)
    batch, tokens, seg_t = inputs([2, 1, 0])
    ref = plain(tokens, batch, seg_t)
    assert torch.equal(model(tokens, batch, seg_t), ref)
    zeros = torch.zeros(3, model.config.d_model)
    assert torch.equal(model(tokens, batch, seg_t, style=zeros), ref)
    # A real style moves the target tokens and never the context (cached once for every style).
    style = zeros.clone()
    style[0] = model.style_action(torch.tensor([1]))[0]
    h = model(tokens, batch, seg_t, style=style)
    seg_role = batch.seg_role.gather(1, batch.seg_id.clamp(min=0))
    ctx = (seg_role == CONTEXT) & (batch.seg_id >= 0)
    assert torch.equal(h[ctx], ref[ctx])
    assert not torch.allclose(h[0][~ctx[0]], ref[0][~ctx[0]])
    assert torch.equal(h[1:], ref[1:])  # rows without a style untouched
    with pytest.raises(ValueError, match="no style path"):
        plain(tokens, batch, seg_t, style=zeros)


@torch.no_grad()
def test_style_weights_top_k_after_warm_up_and_actions():
    model = tiny(**STYLE)
    chunk = [torch.randint(0, 32, (5, f)) for f in FPC]
    dense = model.style.weights(model.tok_emb(torch.cat(
        [c + i * 33 for i, c in enumerate(chunk)], 1)), sparse=False)
    sparse = model.style.weights(model.tok_emb(torch.cat(
        [c + i * 33 for i, c in enumerate(chunk)], 1)), sparse=True)
    assert torch.allclose(dense.sum(1), torch.ones(5)) and (dense > 0).all()
    assert ((sparse > 0).sum(1) <= 2).all() and torch.allclose(sparse.sum(1), torch.ones(5))
    s = model.style_of(chunk)
    assert torch.allclose(s, sparse @ model.style.styles)
    assert torch.equal(model.style_action(torch.tensor([3])), model.style.styles[3:4])
    with pytest.raises(ValueError):
        model.style_action(torch.tensor([4]))


def test_checkpoints_carry_the_style_fields_and_old_ones_load(tmp_path):
    model = tiny(**STYLE)
    save_pretrained(model, tmp_path / "new")
    back = load_dit(tmp_path / "new")
    assert back.config.style_actions == 4 and back.config.style_topk == 2
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    # A checkpoint written before style actions: no style fields, no style weights.
    plain = without_style(model)
    save_pretrained(plain, tmp_path / "old")
    cfg_file = tmp_path / "old/config.json"
    record = json.loads(cfg_file.read_text())
    record["dit"] = {k: v for k, v in record["dit"].items() if not k.startswith("style")}
    cfg_file.write_text(json.dumps(record))
    old = load_dit(tmp_path / "old")
    assert old.config.style_actions == 0 and not hasattr(old, "style")


def test_training_loss_uses_the_target_chunks_style_with_dropout():
    torch.manual_seed(0)
    cfg = DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=32, **STYLE)
    dit = DiT(cfg)
    with torch.no_grad():  # zero gates and heads at init would hide the style from the loss
        for p in dit.parameters():
            p.normal_(0.0, 0.2)
    windows = [torch.randint(0, 32, (3, 3 * f)) for f in FPC]  # 2 context chunks + target
    g = torch.Generator().manual_seed(0)
    module = LossModule(dit, MaskedDiffusion())
    terms = module(windows, [2, 1, 0], g, step=10_000)
    terms["loss"].backward()
    assert 1.0 <= terms["style_usage"] <= 4.0
    assert dit.style.styles.grad.abs().sum() > 0 and dit.style.query.grad is not None
    # The style comes from the target chunk (the last one), not from the context.
    dit.config.style_dropout = 0.0
    a, w = target_style(dit, windows, None, True, False)
    other = [torch.cat([torch.randint(0, 32, (3, 2 * f)), w[:, 2 * f:]], 1)
             for w, f in zip(windows, FPC, strict=True)]
    assert torch.equal(a, target_style(dit, other, None, True, False)[0])
    assert ((w > 0).sum(1) <= 2).all()  # top-k after the warm-up
    assert torch.equal(a, dit.style_of([w[:, 2 * f:] for w, f in zip(windows, FPC, strict=True)]))
    # Dropout 1: every style zeroed, the loss is the plain model's for the same draws.
    dit.config.style_dropout = 1.0
    z = target_style(dit, windows, torch.Generator().manual_seed(1), True, False)[0]
    assert torch.equal(z, torch.zeros_like(z))
    dit.config.style_dropout = 0.2


def params(**kw):
    return SamplingParams(steps=(3, 2, 2, 2), seed=5, **kw)


@torch.no_grad()
def test_unconditioned_sampling_unchanged_bit_for_bit():
    model = tiny(**STYLE)
    plain = without_style(model)
    ctx = [torch.randint(0, 32, (2, 2 * f)) for f in FPC]
    p = [params(guidance=(2.0,) * 4), params()]
    ref = generate(plain, ctx, p)
    for style in (None, torch.zeros(2, model.config.d_model)):
        out = generate(model, ctx, p, style=style)
        assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    with pytest.raises(ValueError, match="no style"):
        generate(plain, ctx, p, style=torch.zeros(2, model.config.d_model))


@torch.no_grad()
def test_style_guidance_cfg_and_icg():
    model = tiny(**STYLE)
    ctx = [torch.randint(0, 32, (1, 2 * f)) for f in FPC]
    style = model.style_action(torch.tensor([2]))
    base = generate(model, ctx, params())
    cond = generate(model, ctx, params(), style=style)
    assert any(not torch.equal(a, b) for a, b in zip(base, cond, strict=True))
    # cfg at scale 0 ignores the style: the unstyled tokens (up to the extra rows' rounding).
    zero = generate(model, ctx, params(style_scale=0.0), style=style)
    assert sum((a == b).float().mean() for a, b in zip(zero, base, strict=True)) / 4 > 0.9
    seen = []
    for how in ("cfg", "icg"):
        seen.clear()
        out = generate(model, ctx, params(style_scale=3.0, style_guidance=how), style=style,
                       on_step=lambda lvl, s, x, t, logits: seen.append(logits.shape[0]))
        assert seen[0] == 2  # one reference row per request
        again = generate(model, ctx, params(style_scale=3.0, style_guidance=how), style=style)
        assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))  # seeded
    # A styled, guided request does not change an unstyled batch mate's tokens.
    both = generate(model, [torch.cat([c, c]) for c in ctx], [params(style_scale=3.0), params()],
                    style=torch.cat([style, torch.zeros_like(style)]))
    assert all(torch.equal(b[1], a[0]) for a, b in zip(base, both, strict=True))
    with pytest.raises(ValueError):
        params(style_guidance="both").validated(4)
    with pytest.raises(ValueError):
        params(style_scale=-1.0).validated(4)


@pytest.fixture(scope="module")
def style_engine(debug_codec):
    torch.manual_seed(0)
    cfg = DiTConfig.from_name("debug", codebook_size=debug_codec.codebook_size, **STYLE)
    dit = DiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.05)
    return ContinuationEngine(debug_codec, dit)


def clip(seconds, hz=220.0):
    t = torch.arange(int(seconds * 32000)) / 32000
    return 0.3 * torch.sin(2 * torch.pi * hz * t)


def test_engine_styles_from_a_reference_or_an_action(style_engine, debug_codec):
    eng = style_engine
    assert eng.info()["style"]["available"] and len(eng.info()["style"]["actions"]) == 4
    ref = eng.style_vector(reference=clip(7.0, 440.0))
    act = eng.style_vector(action=1)
    assert ref.shape == act.shape == (eng.dit.config.d_model,)
    p = SamplingParams(steps=(2, 1, 1, 1), seed=3)
    plain = eng.continue_audio(clip(3.0), p)
    assert torch.equal(eng.continue_batch([clip(3.0)], [p], styles=[None])[0], plain)
    styled = eng.continue_audio(clip(3.0), replace(p, style_scale=2.0), style=act)
    assert styled.shape == plain.shape and not torch.equal(styled, plain)
    # A StyleRequest resolves on the engine (a server's engine thread) to the same vector.
    req = eng.continue_batch([clip(3.0)], [replace(p, style_scale=2.0)],
                             styles=[StyleRequest(action=1)])[0]
    assert torch.equal(req, styled)
    pieces = list(eng.extend(clip(3.0), 2, p, style=ref))
    assert sum(x.shape[0] for x in pieces) == 2 * eng.chunk_samples
    for bad in (dict(action=4), dict(), dict(reference=clip(1.0), action=0)):
        with pytest.raises(ValueError):
            eng.style_vector(**bad)
    # A model without the path refuses clearly (a ValueError: the server's 4xx).
    plain_eng = ContinuationEngine(debug_codec, without_style(eng.dit))
    assert plain_eng.info()["style"]["available"] is False
    with pytest.raises(StyleUnsupported, match="no style actions"):
        plain_eng.style_vector(action=0)
    with pytest.raises(StyleUnsupported):
        plain_eng.continue_audio(clip(3.0), p, style=act)


def test_train_entry_point_with_style_actions(tmp_path):
    from tests.test_resume import _cli, make_tokens

    tokens = make_tokens(tmp_path / "tokens")
    args = _cli(tokens, tmp_path, "style", **{
        "model.style_actions": 4, "model.style_topk": 2, "model.style_warmup": 3,
        "curriculum.stages.2.steps": 1, "eval.every": 0, "log.every": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "training/train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpts = sorted((tmp_path / "style").glob("ckpt-*"))
    record = json.loads((ckpts[-1] / "config.json").read_text())
    assert json.dumps(record).count('"style_actions": 4') >= 1
    logged = [json.loads(x) for x in (tmp_path / "style/metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in logged)
    usage = [x["style_usage"] for x in logged if x.get("kind") == "train"]
    assert usage and all(1.0 <= u <= 4.0 for u in usage)  # effective actions in use, 1..K


def test_fine_tune_adds_style_actions_to_an_exported_model(tmp_path):
    from tests.test_resume import debug_config, make_tokens
    from training.dit.trainer import Trainer

    tokens = make_tokens(tmp_path / "tokens")
    torch.manual_seed(0)
    plain = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=32,
                                    max_after_chunks=1))
    save_pretrained(plain, tmp_path / "served")
    tuned = Trainer(debug_config(tokens, tmp_path, "tuned", init=str(tmp_path / "served"),
                                 **{"model.style_actions": 4, "curriculum.stages.0.steps": 1,
                                    "curriculum.stages.1.steps": 0,
                                    "curriculum.stages.2.steps": 0, "eval.every": 0}))
    assert tuned.model_cfg.style_actions == 4 and tuned.model_cfg.d_model == 64
    state = tuned.dit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    assert torch.equal(state["style_proj.weight"], torch.zeros_like(state["style_proj.weight"]))
    assert tuned.fit() == 0


@torch.no_grad()
def test_cached_styled_and_guided_inference_equals_full_recompute():
    """With a style and both guidances, every logit the sampler used equals the training
    layout's full forward with the same styles (the context cache is shared by all styles)."""
    from model.layout import collate, fill_tokens
    from tests.test_sampler import assert_logits_match_full_forward, context
    from tests.test_sampler import tiny as sampler_tiny

    model = sampler_tiny(**STYLE)
    ctx = context(B=2)
    style = torch.cat([model.style_action(torch.tensor([1])),
                       model.style_of([c[:, -f:] for c, f in zip(ctx, FPC, strict=True)])[1:]])
    p = [params(guidance=(2.0,) * 4, style_scale=2.5), params(style_scale=0.5)]
    seen = []
    out = generate(model, ctx, p, style=style, on_step=lambda *a: seen.append(a))
    rows = torch.cat([style, style, torch.zeros_like(style)])  # cond, no context, no style

    class Styled:
        def __call__(self, tokens, batch, seg_t):
            return model(tokens, batch, seg_t, style=rows)

        def logits(self, h, level):
            return model.logits(h, level)

    batch = collate([2, 2, 0, 0, 2, 2], FPC, model.config.strides)
    windows = [torch.cat([torch.cat([c, o], 1)] * 3) for c, o in zip(ctx, out, strict=True)]
    assert_logits_match_full_forward(Styled(), batch, fill_tokens(batch, windows), seen)


def test_model_card_names_the_style_actions():
    from training.dit.card import _style_line

    assert _style_line({}).startswith("none")
    line = _style_line(asdict(DiTConfig.from_name("debug", style_actions=8)))
    assert line.startswith("8 learned without labels (top-2 after 2,000 steps")
