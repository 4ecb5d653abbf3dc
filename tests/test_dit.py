import json
from dataclasses import asdict

import pytest
import torch

from model.dit import PRESETS, DiT, DiTConfig
from model.layout import CLEAN, CONTEXT, NOISED, collate

FPC, STRIDES = (4, 8, 16, 32), (8, 4, 2, 1)


def tiny(**kw) -> DiT:
    torch.manual_seed(0)
    cfg = DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=32, **kw)
    model = DiT(cfg).eval()
    # Zero-initialised gates/heads would hide leaks (every block is the identity at init).
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def inputs(n_ctx, V=32, seed=0, n_after=None):
    g = torch.Generator().manual_seed(seed)
    batch = collate(n_ctx, FPC, STRIDES, n_after)
    tokens = torch.randint(0, V + 1, batch.shape, generator=g)
    seg_t = torch.rand(batch.seg_role.shape, generator=g) * (batch.seg_role == NOISED)
    return batch, tokens, seg_t


def test_presets_param_counts():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):  # no memory, no init cost
            counts[name] = DiT(DiTConfig.from_name(name)).num_params()
    assert counts["debug"] < 3e6
    assert 10e6 < counts["small"] < 25e6
    assert 90e6 < counts["base"] < 120e6
    assert counts["large"] > 3 * counts["base"]
    with pytest.raises(ValueError):
        DiTConfig.from_name("huge")


def test_config_roundtrip_and_validation():
    cfg = DiTConfig.from_name("debug", frames_per_chunk=FPC)
    back = DiTConfig.from_dict(json.loads(json.dumps(asdict(cfg))))
    assert back == cfg and isinstance(back.frames_per_chunk, tuple)
    with pytest.raises(ValueError):
        DiTConfig.from_dict({**asdict(cfg), "bogus": 1})
    with pytest.raises(ValueError):
        DiTConfig(d_model=65, n_heads=2)
    with pytest.raises(ValueError):
        DiTConfig(frames_per_chunk=(4, 8, 16), strides=(4, 2, 1))  # 3 levels, n_levels=4


def test_every_block_is_identity_at_init():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=32))
    seen = []
    hooks = [
        b.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
        for b in model.blocks
    ]
    batch, tokens, seg_t = inputs([2, 0])
    h = model(tokens, batch, seg_t)
    for hk in hooks:
        hk.remove()
    assert len(seen) == model.config.n_layers
    for x_in, x_out in seen:
        assert torch.equal(x_in, x_out)
    # and the heads start at zero: uniform predictions
    assert torch.equal(model.logits(h, 0), torch.zeros(*h.shape[:2], 32))


@torch.no_grad()
@pytest.mark.parametrize("n_ctx,n_after", [(2, 0), (1, 1), (0, 1)])
def test_no_leakage(n_ctx, n_after):
    model = tiny()
    batch, tokens, seg_t = inputs([n_ctx], n_after=[n_after])
    base = model(tokens, batch, seg_t)
    role, level = batch.role[0], batch.level[0]

    def changed(where, new_t=None):
        tok = tokens.clone()
        tok[0, where] = (tok[0, where] + 1) % 33
        t = seg_t if new_t is None else new_t
        return (model(tok, batch, t) - base).abs().amax(-1)[0]  # (N,) per-token change

    # Target tokens (any level, any role) never change context outputs.
    diff = changed(role != CONTEXT)
    assert diff[role == CONTEXT].max() == 0
    assert diff[role != CONTEXT].max() > 0  # the perturbation is real
    for lvl in range(4):
        noised_l = (role == NOISED) & (level == lvl)
        # clean levels >= l and noised levels != l are invisible to noised level l
        hidden = ((role == CLEAN) & (level >= lvl)) | ((role == NOISED) & (level != lvl))
        assert changed(hidden)[noised_l].max() == 0
        # ... while clean levels < l, the context and itself are seen
        if lvl > 0:
            assert changed((role == CLEAN) & (level < lvl))[noised_l].max() > 0
        assert changed(role == CONTEXT)[noised_l].max() > 0
        if n_after:  # the after-context is seen too
            after = (role == CONTEXT) & (batch.pos[0] > (n_ctx + 1) * FPC[-1] - 1)
            assert changed(after)[noised_l].max() > 0
        # other noised segments' t does not matter either
        t2 = seg_t.clone()
        other = (batch.seg_role[0] == NOISED) & (batch.seg_level[0] != lvl)
        t2[0, other] = 0.77
        assert (model(tokens, batch, t2) - base)[0, noised_l].abs().max() == 0


@torch.no_grad()
def test_rows_with_fewer_context_chunks_are_padding_invariant():
    model = tiny()
    batch, tokens, seg_t = inputs([2, 1, 0, 1], n_after=[0, 1, 1, 0])
    out = model(tokens, batch, seg_t)
    for b, (n, a) in enumerate(zip(batch.n_ctx, batch.n_after, strict=True)):
        alone, _, _ = inputs([n], n_after=[a])
        N = alone.shape[1]
        single = model(tokens[b : b + 1, :N], alone, seg_t[b : b + 1, : alone.seg_role.shape[1]])
        torch.testing.assert_close(out[b : b + 1, :N], single, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_bad_tokens_rejected():
    model = tiny()
    batch, tokens, seg_t = inputs([0])
    tokens[0, 0] = 33
    with pytest.raises(ValueError):
        model(tokens, batch, seg_t)
    with pytest.raises(ValueError):
        model(tokens[:, :-1], batch, seg_t)


def test_bf16_with_fp32_qk_norms_runs_on_sdpa():
    # CUDA autocast runs rms_norm in fp32: q/k come out fp32, v bf16. The model coerces q/k to
    # v's dtype and the SDPA backend builds its additive mask in that dtype.
    from model.attention import attention_backend

    model = tiny()
    batch, tokens, seg_t = inputs([2, 1])
    with torch.no_grad():
        want = model(tokens, batch, seg_t)
        model.bfloat16()
        for blk in model.blocks:
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                norm.float().register_forward_pre_hook(lambda m, a: (a[0].float(),))
        with attention_backend("sdpa"):
            got = model(tokens, batch, seg_t)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
