import math

import pytest
import torch

from model.diffusion import DiffusionConfig, MaskedDiffusion, mask_fraction
from model.dit import DiT, DiTConfig
from model.layout import CLEAN, CONTEXT, NOISED, fill_tokens

FPC = (4, 8, 16, 32)
V = 32


def diffusion_loss(model, windows, config=None, n_ctx=None, generator=None):
    return MaskedDiffusion(config).loss(model, windows, n_ctx=n_ctx, generator=generator)


def model_and_windows(B=6, W=2, seed=0):
    torch.manual_seed(seed)
    model = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=V))
    g = torch.Generator().manual_seed(seed)
    windows = [torch.randint(0, V, (B, (W + 1) * f), generator=g) for f in FPC]
    return model, windows


class Spy(torch.nn.Module):
    """Records what the diffusion process feeds the model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, tokens, layout, seg_t):
        self.calls.append((tokens.clone(), layout, seg_t.clone()))
        return self.model(tokens, layout, seg_t)

    def logits(self, h, level):
        return self.model.logits(h, level)


def test_schedules():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(mask_fraction("cosine", t), torch.tensor([0.0, math.sqrt(0.5), 1.0]))
    assert torch.equal(mask_fraction("linear", t), t)
    with pytest.raises(ValueError):
        mask_fraction("exp", t)
    with pytest.raises(ValueError):
        DiffusionConfig(schedules=("cosine", "nope", "cosine", "cosine"))
    with pytest.raises(ValueError):
        DiffusionConfig(context_dropout=1.5)
    with pytest.raises(ValueError):
        DiffusionConfig.from_dict({"bogus": 1})


def test_loss_at_init_is_log_vocab_and_backprops():
    model, windows = model_and_windows()
    terms = diffusion_loss(model, windows, n_ctx=[2, 1, 0, 2, 1, 0])
    assert set(terms) == {
        "loss",
        "ce_A",
        "ce_B",
        "ce_C",
        "ce_D",
        "acc_A",
        "acc_B",
        "acc_C",
        "acc_D",
    }
    for name in "ABCD":  # zero heads: uniform predictions
        assert terms[f"ce_{name}"].item() == pytest.approx(math.log(V), abs=1e-5)
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert all(h.weight.grad.abs().sum() > 0 for h in model.heads)


def test_masking_follows_schedule_and_spares_context_and_clean():
    model, windows = model_and_windows(B=64, W=2)
    spy = Spy(model)
    cfg = DiffusionConfig(context_dropout=0.0, schedules=("linear", "cosine", "square", "sqrt"))
    with torch.no_grad():
        MaskedDiffusion(cfg).loss(spy, windows, generator=torch.Generator().manual_seed(1))
    tokens, layout, seg_t = spy.calls[0]
    clean = fill_tokens(layout, windows)
    keep = (layout.role == CONTEXT) | (layout.role == CLEAN)
    assert torch.equal(tokens[keep], clean[keep])  # context and clean copies never masked
    assert (seg_t[layout.seg_role != NOISED] == 0).all()
    fracs, want = [], []
    for lvl, sched in enumerate(cfg.schedules):
        idx = layout.target_index(NOISED, lvl)
        x = tokens.gather(1, idx)
        m = x == V
        assert torch.equal(x[~m], clean.gather(1, idx)[~m])  # unmasked noised tokens are clean
        assert m.any(1).all()  # at least one masked token per row
        t = seg_t.gather(1, layout.segment_index(NOISED, lvl)[:, None])[:, 0]
        fracs.append(m.float().mean(1))
        want.append(mask_fraction(sched, t))
        # stratified t: one draw per 1/B stratum
        assert torch.equal((t * 64).floor().sort().values, torch.arange(64.0))
    fracs, want = torch.cat(fracs), torch.cat(want)
    # the 32-token level dominates: per-row fraction tracks gamma(t) on average
    assert (fracs - want).mean().abs() < 0.03
    assert torch.corrcoef(torch.stack([fracs, want]))[0, 1] > 0.9


def test_context_dropout_and_n_ctx():
    model, windows = model_and_windows(B=8, W=2)
    spy = Spy(model)
    with torch.no_grad():
        MaskedDiffusion(DiffusionConfig(context_dropout=1.0)).loss(spy, windows)
        MaskedDiffusion(DiffusionConfig(context_dropout=0.0)).loss(spy, windows, n_ctx=1)
    assert spy.calls[0][1].n_ctx == (0,) * 8
    assert spy.calls[1][1].n_ctx == (1,) * 8
    with pytest.raises(ValueError):
        diffusion_loss(model, windows, n_ctx=3)
    with pytest.raises(ValueError):
        diffusion_loss(model, windows[:3])
    with pytest.raises(ValueError):
        diffusion_loss(model, [w.clamp(max=V - 1) + 1 for w in windows])  # id V is [MASK]


def test_after_context_windows_and_dropout():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=V,
                                    max_after_chunks=1))
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, V, (4, 4 * f), generator=g) for f in FPC]  # 2 ctx + target + after
    spy = Spy(model)
    terms = MaskedDiffusion(DiffusionConfig(context_dropout=0.0)).loss(
        spy, windows, n_ctx=[2, 1, 0, 2], n_after=[1, 0, 1, 0])
    terms["loss"].backward()
    tokens, layout, _ = spy.calls[0]
    assert layout.n_ctx == (2, 1, 0, 2) and layout.n_after == (1, 0, 1, 0)
    ctx = layout.role == CONTEXT                 # context and after chunk as in the windows
    assert torch.equal(tokens[ctx], fill_tokens(layout, windows, after=1)[ctx])
    assert ctx.sum(1).tolist() == [3 * 60, 60, 60, 2 * 60]
    with torch.no_grad():
        MaskedDiffusion(DiffusionConfig(context_dropout=1.0)).loss(spy, windows, n_after=1)
    assert spy.calls[1][1].n_ctx == (0,) * 4 and spy.calls[1][1].n_after == (0,) * 4
    plain = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=V))
    with pytest.raises(ValueError, match="max_after_chunks"):
        MaskedDiffusion().loss(plain, windows, n_after=1)


def test_reproducible_with_generator_and_elbo_weighting():
    model, windows = model_and_windows()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    a = diffusion_loss(model, windows, generator=torch.Generator().manual_seed(3))
    b = diffusion_loss(model, windows, generator=torch.Generator().manual_seed(3))
    c = diffusion_loss(model, windows, generator=torch.Generator().manual_seed(4))
    assert a["loss"].item() == b["loss"].item() != c["loss"].item()
    e = diffusion_loss(
        model,
        windows,
        DiffusionConfig(weighting="elbo"),
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.isfinite(e["loss"]) and e["loss"].item() != a["loss"].item()
