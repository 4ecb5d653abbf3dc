import time
from dataclasses import replace

import pytest
import torch

from model.diffusion import DiffusionConfig, MaskedDiffusion, mask_time
from model.dit import DiT, DiTConfig
from model.layout import NOISED, collate, fill_tokens
from model.sampler import SamplingParams, extend, generate, slide_window

FPC = (4, 8, 16, 32)
V = 32
P = SamplingParams(steps=(3, 2, 2, 2), seed=0)


def tiny(std=0.1, **kw) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=V, **kw)).eval()
    with torch.no_grad():  # zero-initialised heads would make every prediction uniform
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def context(B=2, W=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, W * f), generator=g) for f in FPC]


@torch.no_grad()
def assert_logits_match_full_forward(model, batch, full, seen):
    """Every logit the sampler used (on_step records) equals a full forward of the training
    layout with the same tokens: the step's level as the sampler saw it, the other noised
    levels all masked at random t (invisible to it)."""
    for level, _, x_in, t_in, logits in seen:
        tokens = full.clone()
        seg_t = torch.rand(batch.seg_role.shape) * (batch.seg_role == NOISED)
        for lvl in range(4):
            tokens.scatter_(1, batch.target_index(NOISED, lvl), V)
        idx = batch.target_index(NOISED, level)
        tokens.scatter_(1, idx, x_in)
        seg_t.scatter_(1, batch.segment_index(NOISED, level)[:, None], t_in[:, None])
        h = model(tokens, batch, seg_t)
        ref = model.logits(h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1])), level)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_params_validation():
    p = SamplingParams(steps=4, temperature=0.5, top_p=1, guidance=(1, 2, 3, 4), seed=3).validated(
        4
    )
    assert p.steps == (4, 4, 4, 4) and p.top_p == (1.0,) * 4 and p.guidance == (1.0, 2.0, 3.0, 4.0)
    bad = [
        ("steps", dict(steps=(1, 2, 3))),
        ("steps", dict(steps=0)),
        ("steps", dict(steps=1.5)),
        ("temperature", dict(temperature=-1)),
        ("top_p", dict(top_p=0.0)),
        ("guidance", dict(guidance=float("nan"))),
        ("seed", dict(seed=-1)),
        ("seed", dict(seed="7")),
        ("gumbel", dict(gumbel=-0.5)),
        ("confidence", dict(confidence="random")),
    ]
    for field, kw in bad:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw).validated(4)


def test_cached_staged_inference_equals_full_recompute():
    """Every logit the sampler used equals the training-layout full forward (fp32, atol 1e-5)."""
    model = tiny()
    ctx = context(B=2)
    params = [replace(P, guidance=(2.0, 1.0, 1.5, 3.0)), replace(P, seed=1, steps=(1, 3, 2, 1))]
    seen = []
    out = generate(model, ctx, params, on_step=lambda *a: seen.append(a))
    assert len(seen) == 3 + 3 + 2 + 2  # max steps per level
    n_ctx = [2, 2, 0, 0]  # guidance adds unconditional rows (no context)
    batch = collate(n_ctx, FPC, model.config.strides)
    both = lambda x: torch.cat([x, x])  # noqa: E731
    windows = [both(torch.cat([c, o], 1)) for c, o in zip(ctx, out, strict=True)]
    full = fill_tokens(batch, windows)
    assert_logits_match_full_forward(model, batch, full, seen)


def test_editing_with_after_context_and_given_tokens_equals_full_recompute():
    """Inpaint-shaped call (context before and after, a span of the target given at every
    level): given tokens come back unchanged, and every logit used equals the training layout's
    full forward with the after chunk."""
    model = tiny(max_after_chunks=1)
    ctx, after = context(B=2, W=1), [c[:, :f] for c, f in zip(context(B=2, W=1, seed=1), FPC,
                                                               strict=True)]
    truth = [c[:, :f] for c, f in zip(context(B=2, W=1, seed=2), FPC, strict=True)]
    given = []
    for t, f in zip(truth, FPC, strict=True):
        g = t.clone()
        g[:, f // 4: f // 2] = -1          # regenerate the second quarter of the chunk
        given.append(g)
    params = [replace(P, guidance=(1.5, 1.0, 1.0, 2.0)), replace(P, seed=1)]
    seen = []
    out = generate(model, ctx, params, after=after, given=given,
                   on_step=lambda *a: seen.append(a))
    for o, g in zip(out, given, strict=True):
        assert torch.equal(o[g >= 0], g[g >= 0]) and (o >= 0).all()
    n_ctx, n_after = [1, 1, 0, 0], [1, 1, 0, 0]            # guidance: unconditional rows
    batch = collate(n_ctx, FPC, model.config.strides, n_after)
    both = lambda x: torch.cat([x, x])  # noqa: E731
    windows = [both(torch.cat([c, o, a], 1)) for c, o, a in zip(ctx, out, after, strict=True)]
    full = fill_tokens(batch, windows, after=1)
    # the masked fraction of an inpainted level starts at 1/4: so does the t the model is told
    first = [x for x in seen if x[0] == 3][0]
    assert torch.allclose(first[3][:2], mask_time("cosine", torch.tensor(0.25)).expand(2))
    assert_logits_match_full_forward(model, batch, full, seen)


def test_variation_keeps_the_given_levels_and_runs_no_steps_for_them():
    model = tiny()
    ctx = context(B=1)
    base = generate(model, ctx, P)
    seen = []
    given = [base[0], base[1]] + [torch.full_like(b, -1) for b in base[2:]]   # keep A and B
    vary = generate(model, ctx, replace(P, seed=7), given=given,
                    on_step=lambda *a: seen.append(a[0]))
    assert torch.equal(vary[0], base[0]) and torch.equal(vary[1], base[1])
    assert set(seen) == {2, 3}                     # no denoising step for the kept levels
    assert any(not torch.equal(v, b) for v, b in zip(vary[2:], base[2:], strict=True))


def test_after_context_needs_a_model_trained_with_it():
    model = tiny()                                  # max_after_chunks = 0
    after = [torch.zeros(1, f, dtype=torch.long) for f in FPC]
    with pytest.raises(ValueError, match="trained without after-context"):
        generate(model, context(B=1), P, after=after)
    with pytest.raises(ValueError, match="given"):
        generate(model, context(B=1), P, given=[torch.full((1, f), -2) for f in FPC])


def test_seed_determinism_batch_independence_and_greedy():
    model = tiny()
    ctx = context(B=2)
    a = generate(model, ctx, [P, replace(P, seed=5)])
    b = generate(model, ctx, [P, replace(P, seed=5)])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x[0], x[1]) for x in a)  # same context, different seeds
    assert all(
        x.shape == (2, f) and x.max() < V and x.min() >= 0 for x, f in zip(a, FPC, strict=True)
    )
    # A request's output does not depend on its batch mates (other steps, guidance, top_p).
    alone = generate(model, [c[1:] for c in ctx], [replace(P, seed=5)])
    mate = SamplingParams(steps=(5, 1, 4, 2), guidance=3.0, top_p=1.0, seed=9)
    mixed = generate(model, [c[[1, 0]] for c in ctx], [replace(P, seed=5), mate])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(alone, mixed, strict=True))
    # temperature 0 is greedy: the seed does not matter
    g1 = generate(model, ctx, replace(P, temperature=0.0, seed=1))
    g2 = generate(model, ctx, replace(P, temperature=0.0, seed=2))
    assert all(torch.equal(x, y) for x, y in zip(g1, g2, strict=True))


def test_steps_per_level_are_respected():
    model = tiny()
    calls = []
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((args[0].shape[1], kwargs.get("commit"))),
        with_kwargs=True,
    )
    seen = []
    steps_a, steps_b = (4, 1, 2, 3), (2, 3, 2, 1)
    params = [SamplingParams(steps=steps_a, seed=0), SamplingParams(steps=steps_b, seed=1)]
    generate(model, context(B=2), params, on_step=lambda *a: seen.append(a))
    hook.remove()
    # one context pass, max(steps) noised passes per level, one clean pass per level but D
    noised = [c for c in calls if not c[1]]
    clean = [c for c in calls if c[1]]
    assert len(clean) == 1 + 3 and clean[0][0] == 2 * sum(FPC)
    assert [n for n, _ in noised] == [4] * 4 + [8] * 3 + [16] * 2 + [32] * 3
    # masked counts per step follow the cosine plan, and rows with fewer steps finish early
    masked = {}
    for level, _step, x_in, _, _ in seen:
        masked.setdefault(level, []).append((x_in == V).sum(1).tolist())
    assert [m[0] for m in masked[3]] == [32, 27, 16]  # 3 steps: floor(32 sin(pi/2 (1 - s/3)))
    assert [m[1] for m in masked[3]] == [32, 0, 0]  # 1 step: done after the first
    assert [m[0] for m in masked[1]] == [8, 0, 0]
    assert all(m[-1] > 0 for m in masked[1][-1:]) and masked[1][-1][1] > 0


def test_extend_slides_window_in_token_space():
    model = tiny()
    ctx = context(B=1)
    chunks = list(extend(model, ctx, 3, P))
    assert len(chunks) == 3
    # chunk k is generate() on the slid window with chunk_index k
    window = ctx
    for k, new in enumerate(chunks):
        again = generate(model, window, P, chunk_index=k)
        assert all(torch.equal(x, y) for x, y in zip(again, new, strict=True))
        window = slide_window(window, new, 2)
    assert all(
        torch.equal(w, torch.cat([a, b], 1))
        for w, a, b in zip(window, chunks[1], chunks[2], strict=True)
    )
    # a short context grows up to max_ctx_chunks
    assert slide_window(context(B=1, W=0), chunks[0], 2)[0].shape[1] == FPC[0]
    with pytest.raises(ValueError):
        list(extend(model, ctx, 0, P))


def test_bad_context_rejected():
    model = tiny()
    with pytest.raises(ValueError):
        generate(model, context(W=3), P)  # more chunks than the model takes
    with pytest.raises(ValueError):
        generate(model, [c + V for c in context()], P)
    with pytest.raises(ValueError):
        generate(model, context()[:3], P)
    with pytest.raises(ValueError):
        generate(model, context(B=2), [P])


def test_learns_and_samples_seen_continuations():
    """Loss, layout and sampler agree: a memorised song is continued exactly, and chained."""
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=V))
    g = torch.Generator().manual_seed(0)
    songs = [torch.randint(0, V, (3, 4 * f), generator=g) for f in FPC]  # 3 songs x 4 chunks
    # every (2 context chunks -> next chunk) window of every song
    windows = [torch.cat([s[:, : 3 * f], s[:, f:]]) for s, f in zip(songs, FPC, strict=True)]
    diffusion = MaskedDiffusion(DiffusionConfig(context_dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start = time.time()
    for step in range(400):
        terms = diffusion.loss(model, windows, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        if step >= 100 and step % 25 == 0 and terms["loss"].item() < 0.01:
            break
    train_s = time.time() - start
    final = diffusion.loss(model, windows, generator=torch.Generator().manual_seed(10_000))
    assert final["loss"].item() < 0.05, (final, step, train_s)
    model.eval()
    ctx = [s[:, : 2 * f] for s, f in zip(songs, FPC, strict=True)]
    params = SamplingParams(steps=(4, 4, 4, 4), top_p=0.9, seed=0)
    out = generate(model, ctx, params)
    for s, o, f in zip(songs, out, FPC, strict=True):
        assert torch.equal(o, s[:, 2 * f : 3 * f])
    # chaining: the second chunk comes from a window that contains the first generated one
    chained = list(extend(model, ctx, 2, params))
    for s, o, f in zip(songs, chained[1], FPC, strict=True):
        assert torch.equal(o, s[:, 3 * f :])


def _agreement(out: list, ref: list, free: list | None = None) -> list[float]:
    """Per level, the fraction of tokens equal to the reference (only where `free`, if given)."""
    free = free or [torch.ones_like(r, dtype=torch.bool) for r in ref]
    return [float((o == r)[m].float().mean()) for o, r, m in zip(out, ref, free, strict=True)]


def test_memorised_songs_are_inpainted_looped_and_varied():
    """The editing layouts through the real loss and sampler: a model that memorised three songs
    (one of them periodic: its 4th chunk is its 1st) fills a masked span from what surrounds it,
    closes the loop (after-context = the clip's own first chunk), and regenerates the finer
    levels under given coarse ones.

    What is guaranteed exactly: given tokens stay as given. What is not: that a memorised model
    reproduces every free token. How sure it is depends on where training stopped, and the CPU's
    kernels (AVX2 or AVX-512 rounding) move that by a few steps; a sure token can still be drawn
    wrong at temperature 1. So training goes on to a loss 5x below the bar, and the free tokens
    must match the song at 90% or more per level (chance: 1 in 32)."""
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=V,
                                    max_after_chunks=1))
    g = torch.Generator().manual_seed(1)
    songs = [torch.randint(0, V, (3, 4 * f), generator=g) for f in FPC]
    for s_, f in zip(songs, FPC, strict=True):
        s_[0, 3 * f:] = s_[0, :f]                               # song 0 loops: c3 == c0
    chunk = lambda s_, f, c: s_[:, c * f:(c + 1) * f]  # noqa: E731
    # rows: (c0 c1 | c2 | after c3) and (c1 c2 | c3), the latter with an ignored after slot
    windows = [torch.cat([s_, torch.cat([s_[:, f:], torch.zeros_like(s_[:, :f])], 1)])
               for s_, f in zip(songs, FPC, strict=True)]
    n_after = [1, 1, 1, 0, 0, 0]
    diffusion = MaskedDiffusion(DiffusionConfig(context_dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(500):
        terms = diffusion.loss(model, windows, n_after=n_after,
                               generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        if step >= 100 and step % 25 == 0 and terms["loss"].item() < 0.002:
            break
    assert terms["loss"].item() < 0.01, (terms, step)
    model.eval()
    params = SamplingParams(steps=(4, 4, 4, 4), seed=0)
    ctx = [torch.cat([chunk(s_, f, 0), chunk(s_, f, 1)], 1) for s_, f in zip(songs, FPC, strict=True)]
    truth = [chunk(s_, f, 2) for s_, f in zip(songs, FPC, strict=True)]
    after = [chunk(s_, f, 3) for s_, f in zip(songs, FPC, strict=True)]
    # inpaint: the middle half of chunk 2 masked at every level, between c0 c1 and c3
    given = []
    for t, f in zip(truth, FPC, strict=True):
        x = t.clone()
        x[:, f // 4: 3 * f // 4] = -1
        given.append(x)
    out = generate(model, ctx, params, after=after, given=given)
    span = [x < 0 for x in given]
    assert all(torch.equal(o[~m], t[~m]) for o, t, m in zip(out, truth, span, strict=True))
    assert min(_agreement(out, truth, span)) >= 0.9, _agreement(out, truth, span)
    # loop: song 0's clip c0 c1, after-context = its own first chunk -> the chunk that leads there
    loop = generate(model, [c[:1] for c in ctx], params, after=[c[:1, :f] for c, f in
                                                                zip(ctx, FPC, strict=True)])
    assert min(_agreement(loop, [t[:1] for t in truth])) >= 0.9
    # variation: keep A and B of chunk 3, regenerate C and D (continuation layout, c1 c2 | c3)
    ctx3 = [torch.cat([chunk(s_, f, 1), chunk(s_, f, 2)], 1) for s_, f in zip(songs, FPC, strict=True)]
    vary = generate(model, ctx3, params, given=[after[0], after[1]] +
                    [torch.full_like(t, -1) for t in after[2:]])
    assert torch.equal(vary[0], after[0]) and torch.equal(vary[1], after[1])
    assert min(_agreement(vary[2:], after[2:])) >= 0.9, _agreement(vary[2:], after[2:])


def test_confidence_variants_and_gumbel_scale():
    """The commit order's two knobs. Defaults are today's behaviour (top log-prob, Gumbel 1).
    Greedy sampling makes 'sampled' confidence equal 'top' exactly (the sampled token is the
    top one); otherwise they differ. Gumbel 0 removes the order noise, so the seed then only
    matters through the tokens drawn."""
    model = tiny()
    ctx = context(B=2)
    default = generate(model, ctx, P)
    explicit = generate(model, ctx, replace(P, confidence="top", gumbel=1.0))
    assert all(torch.equal(a, b) for a, b in zip(default, explicit, strict=True))
    greedy = replace(P, temperature=0.0)
    top_g = generate(model, ctx, greedy)
    sampled_g = generate(model, ctx, replace(greedy, confidence="sampled"))
    assert all(torch.equal(a, b) for a, b in zip(top_g, sampled_g, strict=True))
    sampled = generate(model, ctx, replace(P, confidence="sampled"))
    assert any(not torch.equal(a, b) for a, b in zip(default, sampled, strict=True))
    no_noise = generate(model, ctx, replace(P, gumbel=0.0))
    assert any(not torch.equal(a, b) for a, b in zip(default, no_noise, strict=True))
    # Rows choose independently: a 'sampled' row beside a 'top' row is what it is alone.
    mixed = generate(model, ctx, [P, replace(P, confidence="sampled")])
    alone = generate(model, [c[1:] for c in ctx], replace(P, confidence="sampled"))
    assert all(torch.equal(m[1], a[0]) for m, a in zip(mixed, alone, strict=True))
