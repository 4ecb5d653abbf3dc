import math

import pytest
import torch

from model import attention as attn
from model import attention_rule as rule
from model.layout import (
    CLEAN,
    CONTEXT,
    NOISED,
    build_layout,
    collate,
    fill_tokens,
)

SMALL = ((4, 8, 16, 32), (8, 4, 2, 1))


@pytest.mark.parametrize("n_ctx,expected", [(0, 448 + 960), (1, 960 + 448 + 960), (2, 3328)])
def test_sequence_lengths_and_block_alignment(n_ctx, expected):
    lay = build_layout(n_ctx)
    assert lay.n_tokens == expected
    assert len(lay.segments) == 4 * n_ctx + 3 + 4
    assert all(s.length % 64 == 0 and s.start % 64 == 0 for s in lay.segments)
    # segments tile the sequence in order
    for a, b in zip(lay.segments, lay.segments[1:], strict=False):
        assert b.start == a.start + a.length
    for i, s in enumerate(lay.segments):
        sl = slice(s.start, s.start + s.length)
        assert (lay.seg_id[sl] == i).all() and (lay.level[sl] == s.level).all()
        assert (lay.role[sl] == s.role).all()


def test_positions_are_time_aligned():
    lay = build_layout(2)
    # token i of level l in chunk c sits at c*512 + (i + 0.5) * s_l - 0.5
    for s in lay.segments:
        stride = (8, 4, 2, 1)[s.level]
        p = lay.pos[s.start : s.start + s.length]
        i = torch.arange(s.length, dtype=torch.float32)
        assert torch.equal(p, s.chunk * 512 + (i + 0.5) * stride - 0.5)
    # the first A token and the mean of the first 8 D tokens of a chunk coincide
    a0 = lay.segments[lay.find(NOISED, 0)]
    d0 = lay.segments[lay.find(NOISED, 3)]
    assert lay.pos[a0.start] == lay.pos[d0.start : d0.start + 8].mean()
    assert a0.chunk == d0.chunk == 2


def test_allowed_rules():
    lay = build_layout(2)
    seg = lay.segments
    for qi, q in enumerate(seg):
        for ki, k in enumerate(seg):
            a = bool(lay.allowed[qi, ki])
            if q.role == CONTEXT:
                assert a == (k.role == CONTEXT)
            elif q.role == CLEAN:
                assert a == (k.role == CONTEXT or (k.role == CLEAN and k.level <= q.level))
            else:
                want = k.role == CONTEXT or (k.role == CLEAN and k.level < q.level)
                want |= k.role == NOISED and k.level == q.level
                assert a == want


def test_bad_input():
    with pytest.raises(ValueError):
        build_layout(-1)
    with pytest.raises(ValueError):
        build_layout(1, (4, 8), (8, 2))


def test_collate_pads_and_fill_tokens_keeps_recent_context():
    fpc, st = SMALL
    batch = collate([2, 0, 1], fpc, st)
    N2 = 2 * 60 + 28 + 60
    assert batch.shape == (3, N2)
    assert (batch.seg_id[1, 28 + 60 :] == -1).all() and (batch.seg_id[1, : 28 + 60] >= 0).all()
    assert batch.allowed.shape == (3, 15, 15)
    assert not batch.allowed[1, 7:].any() and not batch.allowed[1, :, 7:].any()
    # windows: 2 context chunks + target, token value encodes (level, chunk, index)
    windows = [
        (lvl * 10000 + torch.arange(3)[:, None] * 1000 + torch.arange(f))
        .reshape(1, -1)
        .repeat(3, 1)
        for lvl, f in enumerate(fpc)
    ]
    tok = fill_tokens(batch, windows)
    for b, n in enumerate(batch.n_ctx):
        lay = build_layout(n, fpc, st)
        for s in lay.segments:
            got = tok[b, s.start : s.start + s.length]
            window_chunk = 2 - n + s.chunk  # most recent context chunks, target = chunk 2
            want = s.level * 10000 + window_chunk * 1000 + torch.arange(s.length)
            assert torch.equal(got, want)
    assert (tok[batch.seg_id < 0] == 0).all()
    # target positions are found in every row
    idx = batch.target_index(NOISED, 3)
    assert (batch.role.gather(1, idx) == NOISED).all() and (batch.level.gather(1, idx) == 3).all()


def _naive(q, k, v, seg_q, seg_k, allowed):
    mask = rule.dense_mask(seg_q, seg_k, allowed)[:, None]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def test_attention_reference_matches_naive_and_zeroes_blind_rows():
    torch.manual_seed(0)
    batch = collate([2, 1], *SMALL)
    B, N = batch.shape
    q, k, v = (torch.randn(B, 2, N, 16) for _ in range(3))
    seg = batch.seg_id.clone()
    out = attn.attention(q, k, v, seg, seg, batch.allowed)
    assert torch.allclose(out, _naive(q, k, v, seg, seg, batch.allowed), atol=1e-5)
    assert (out[1][:, seg[1] < 0] == 0).all()  # padding rows output 0
    # a (S, S) table broadcasts; a segment with nothing allowed outputs zeros, not NaN
    allowed = batch.allowed[0].clone()
    allowed[0] = False
    out = attn.attention(q, k, v, seg, seg, allowed)
    assert torch.isfinite(out).all() and (out[:, :, seg[0] == 0] == 0).all()


def test_backend_switch():
    assert attn.get_backend() == "auto"
    with attn.attention_backend("sdpa"):
        assert attn.get_backend() == "sdpa"
    assert attn.get_backend() == "auto"
    with pytest.raises(ValueError):
        attn.set_backend("flash")
    q = torch.randn(1, 1, 4, 8)
    seg = torch.zeros(1, 4, dtype=torch.long)
    allowed = torch.ones(1, 1, dtype=torch.bool)
    # "auto" on CPU is the reference
    assert torch.equal(
        attn.attention(q, q, q, seg, seg, allowed), rule.attention_ref(q, q, q, seg, seg, allowed)
    )
    with pytest.raises(ValueError):
        attn.attention(q, q, q, seg[:, :3], seg, allowed)


@pytest.mark.parametrize("n_ctx", [0, 1, 2])
def test_after_context_layout(n_ctx):
    """The after chunk is context (chunk n_ctx + 1), placed right after the other context so the
    context stays a prefix; with n_after = 0 the layout is exactly the continuation one."""
    plain, edit = build_layout(n_ctx), build_layout(n_ctx, n_after=1)
    same = build_layout(n_ctx, n_after=0)
    assert same.segments == plain.segments and torch.equal(same.allowed, plain.allowed)
    assert all(torch.equal(getattr(same, f), getattr(plain, f)) for f in ("seg_id", "role", "pos"))
    per_chunk = 64 + 128 + 256 + 512
    assert edit.n_tokens == plain.n_tokens + per_chunk and edit.n_after == 1
    after = [s for s in edit.segments if s.chunk == n_ctx + 1]
    assert [s.level for s in after] == [0, 1, 2, 3] and {s.role for s in after} == {CONTEXT}
    assert after[0].start == n_ctx * per_chunk and after[-1].start + 512 == (n_ctx + 1) * per_chunk
    for s in after:  # positions: the chunk after the target
        p = edit.pos[s.start : s.start + s.length]
        assert p.min() > (n_ctx + 1) * 512 - 1 and p.max() < (n_ctx + 2) * 512
    # the rule: context (before and after) sees all context and nothing else; targets see it
    for qi, q in enumerate(edit.segments):
        for ki, k in enumerate(edit.segments):
            if k.chunk == n_ctx + 1:
                assert bool(edit.allowed[qi, ki])
            if q.chunk == n_ctx + 1:
                assert bool(edit.allowed[qi, ki]) == (k.role == CONTEXT)
    with pytest.raises(ValueError, match="n_after"):
        build_layout(n_ctx, n_after=2)


def test_fill_tokens_places_the_after_chunk_and_rows_may_lack_it():
    fpc, st = SMALL
    batch = collate([2, 1, 0], fpc, st, n_after=[1, 0, 1])
    windows = [  # 2 context chunks, the target (chunk 2), the after chunk (chunk 3)
        (lvl * 10000 + torch.arange(4)[:, None] * 1000 + torch.arange(f)).reshape(1, -1).repeat(3, 1)
        for lvl, f in enumerate(fpc)
    ]
    tok = fill_tokens(batch, windows, after=1)
    for b, (n, a) in enumerate(zip(batch.n_ctx, batch.n_after, strict=True)):
        for s in build_layout(n, fpc, st, a).segments:
            window_chunk = 2 - n + s.chunk if s.chunk <= n else 3   # the after chunk is chunk 3
            want = s.level * 10000 + window_chunk * 1000 + torch.arange(s.length)
            assert torch.equal(tok[b, s.start : s.start + s.length], want)
    idx, valid = batch.context_index()
    assert valid.sum(1).tolist() == [3 * 60, 60, 60]
    with pytest.raises(ValueError, match="after-context"):
        fill_tokens(batch, [w[:, : 3 * f] for w, f in zip(windows, fpc, strict=True)])


def test_last_inputs_cache_reuses_and_invalidates():
    """The cache behind per-forward (not per-layer) mask and plan building."""
    from model.attention_rule import LastInputsCache

    g = torch.Generator().manual_seed(1)
    seg = torch.randint(0, 4, (1, 32), generator=g)
    allowed = torch.rand(4, 4, generator=g) < 0.5
    cache, built = LastInputsCache(), []

    def get(*tensors, extra=(16,)):
        return cache.get(tensors, extra, lambda: built.append(1) or object())

    p1 = get(seg, seg, allowed)
    assert get(seg, seg, allowed) is p1  # every layer of a forward
    assert get(seg, seg, allowed, extra=(8,)) is not p1  # other parameters
    p2 = get(seg, seg, allowed)
    allowed[0, 0] = ~allowed[0, 0]  # in-place edit bumps the version
    assert get(seg, seg, allowed) is not p2
    assert get(seg.clone(), seg, allowed) is not p2  # same values, other tensor
    # KV-cache style: every layer slices the same preallocated tensor afresh
    kv_seg = torch.full((1, 64), -1)
    kv_seg[:, :32] = seg
    p3 = get(seg, kv_seg[:, :48], allowed)
    assert get(seg, kv_seg[:, :48], allowed) is p3
    assert get(seg, kv_seg[:, :40], allowed) is not p3  # other length
    p4 = get(seg, kv_seg[:, :48], allowed)
    kv_seg[:, 40:48] = 2  # the cache grows: a write through the base invalidates its views
    assert get(seg, kv_seg[:, :48], allowed) is not p4
    with torch.inference_mode():  # no version counters: never cached, still correct
        s_inf = seg.clone()
        assert get(s_inf, s_inf, allowed) is not get(s_inf, s_inf, allowed)


def test_sdpa_backend_builds_the_mask_once_per_forward(monkeypatch):
    """A DiT forward with the SDPA backend builds the dense mask once, not once per layer,
    and its output is unchanged."""
    import model.attention as attn
    from model.diffusion import DiffusionConfig, MaskedDiffusion
    from model.dit import DiT, DiTConfig

    cfg = DiTConfig.from_name("debug", codebook_size=32, n_layers=3)
    torch.manual_seed(0)
    dit = DiT(cfg)
    windows = [torch.randint(0, 32, (2, 3 * f)) for f in cfg.frames_per_chunk]
    diffusion = MaskedDiffusion(DiffusionConfig())

    def loss():
        return diffusion.loss(dit, windows, n_ctx=[2, 1], generator=torch.Generator().manual_seed(0))

    calls = []
    real = attn.sdpa_mask
    monkeypatch.setattr(attn, "sdpa_mask", lambda *a: calls.append(1) or real(*a))
    with attn.attention_backend("sdpa"):
        cached = loss()["loss"]
    assert len(calls) == 1
    monkeypatch.setattr(attn, "_mask_cache", type("NoCache", (), {
        "get": staticmethod(lambda tensors, extra, build: build())})())
    with attn.attention_backend("sdpa"):
        uncached = loss()["loss"]
    assert len(calls) == 1 + cfg.n_layers
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("rows,after,prefix", [  # prefix: tokens split off (a chunk is 60)
    ([2, 2], None, 120),             # the continuation layout: the two context chunks
    ([1, 1, 1], None, 60),
    ([0, 0], None, 4),               # no context: clean A sees only itself
    ([2, 1], None, 0),               # rows differ (padding): the dense path
    ([1, 1], [1, 1], 120),           # editing: both context chunks lead the sequence
])
def test_context_prefix_split_is_the_same_attention(rows, after, prefix):
    """The SDPA backend runs the leading context block (it sees exactly itself) unmasked and
    the dense mask only for the rows after it: outputs and gradients equal the reference."""
    batch = collate(rows, *SMALL, n_after=after)
    seg = batch.seg_id.clone()
    assert attn.context_prefix(seg, seg, batch.allowed) == prefix
    torch.manual_seed(0)
    B, N = batch.shape
    q, k, v = (torch.randn(B, 2, N, 16, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    cot = torch.randn(B, 2, N, 16, dtype=torch.float64)
    with attn.attention_backend("sdpa"):
        out = attn.attention(q, k, v, seg, seg, batch.allowed)
    grads = torch.autograd.grad(out, (q, k, v), cot)
    ref = rule.attention_ref(q, k, v, seg, seg, batch.allowed)
    ref_grads = torch.autograd.grad(ref, (q, k, v), cot)
    assert torch.allclose(out, ref, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ref_grads, strict=True))
    # not self-attention (the sampler's queries against cached keys): no split
    assert attn.context_prefix(seg[:, -8:], seg, batch.allowed) == 0


def test_context_prefix_needs_one_leading_block():
    table = torch.tensor([[1, 0, 1], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    apart = torch.tensor([[0, 0, 1, 2, 2]])  # segments 0 and 2 see each other, 1 sits between
    assert attn.context_prefix(apart, apart, table) == 0
    together = torch.tensor([[0, 2, 2, 1, 1]])
    assert attn.context_prefix(together, together, table) == 3
    assert attn.context_prefix(together, together, table[None]) == 3
    assert attn.context_prefix(together[:, :3], together[:, :3], table) == 0  # nothing after it
    padded = torch.tensor([[-1, 0, 2, 1, 1]])
    assert attn.context_prefix(padded, padded, table) == 0
