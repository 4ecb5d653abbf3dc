"""Block-structured attention kernel vs the SDPA reference (`model.attention_rule.attention_ref`).

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, which must be set before
the kernel module is imported), in fp32 and fp16 only: the interpreter computes bf16 wrongly.
The interpreter costs ~10-20 ms per (tile pair, head) step, so shapes are tiny and the real
training layouts are checked at full size only for the tile plan (pure torch); their numerics run
on the same segment structure scaled down (frames_per_chunk=(4, 8, 16, 32)).

Tolerance (STYLE.md): max error vs an fp64 reference <= 2x the error of plain PyTorch (the SDPA
reference) in the same dtype, plus a small absolute floor (fp32 errors are ~1e-7 both ways).
"""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported, see the module docstring
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
import model.attention as attn  # noqa: E402
import model.kernels.block_attention as ba  # noqa: E402
from model.attention_rule import attention_ref, dense_mask  # noqa: E402
from model.layout import build_layout, collate  # noqa: E402

if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
if not torch.cuda.is_available() and not isinstance(ba._fwd_kernel, importlib.import_module(
        "triton.runtime.interpreter").InterpretedFunction):
    # Imported earlier in this process before TRITON_INTERPRET was set: re-decorate the kernels.
    ba = importlib.reload(ba)

SMALL_FPC = (4, 8, 16, 32)  # the real geometry / 16: every segment a multiple of 4
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# The small numerics tests run where the kernel runs: the interpreter on CPU, the GPU otherwise.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- helpers


def brute_force_classes(seg_q, seg_k, allowed, bm, bn):
    """(B, Tq, Tk) classes from the dense mask, tile by tile (positions past N are padding)."""
    mask = dense_mask(seg_q, seg_k, allowed)
    B, Nq, Nk = mask.shape
    Tq, Tk = -(-Nq // bm), -(-Nk // bn)
    padded = torch.zeros(B, Tq * bm, Tk * bn, dtype=torch.bool)
    padded[:, :Nq, :Nk] = mask
    tiles = padded.view(B, Tq, bm, Tk, bn)
    cls = torch.full((B, Tq, Tk), ba.PARTIAL, dtype=torch.int8)
    cls[~tiles.any(4).any(2)] = ba.EMPTY
    cls[tiles.all(4).all(2)] = ba.FULL
    return cls


def random_problem(B, Nq, Nk, S, seed, p_allowed=0.5, pad=True, empty_rows=True):
    """Sorted random segment ids (contiguous runs, like real layouts), some padding, a random
    table; with empty_rows one segment sees nothing."""
    g = torch.Generator().manual_seed(seed)
    lo = -1 if pad else 0
    seg_q = torch.randint(lo, S, (B, Nq), generator=g).sort(-1).values
    seg_k = torch.randint(lo, S, (B, Nk), generator=g).sort(-1).values
    allowed = torch.rand(B, S, S, generator=g) < p_allowed
    if empty_rows:
        allowed[:, 1] = False  # queries of segment 1 see nothing -> output 0
    return seg_q, seg_k, allowed


def check_against_reference(q, k, v, seg_q, seg_k, allowed, **kw):
    """Forward and dq/dk/dv of the kernel vs fp64, within 2x the SDPA error in q's dtype."""
    dtype = q.dtype
    seg_q, seg_k, allowed = (x.to(q.device) for x in (seg_q, seg_k, allowed))
    g = torch.Generator().manual_seed(123)
    do = torch.randn(q.shape, generator=g).to(device=q.device, dtype=dtype)

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs, seg_q, seg_k, allowed)
        grads = torch.autograd.grad(out, xs, do.to(out.dtype))
        return [out.detach(), *grads]

    exact = run(attention_ref, *(x.double() for x in (q, k, v)))
    torch_same = run(attention_ref, q, k, v)
    kernel = run(lambda *a: ba.block_attention(*a, **kw), q, k, v)
    for name, got, base, ref in zip(("out", "dq", "dk", "dv"), kernel, torch_same, exact,
                                    strict=True):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        err = (got.double() - ref).abs().max().item()
        err_torch = (base.double() - ref).abs().max().item()
        assert err <= 2 * err_torch + FLOOR[dtype], \
            f"{name}: kernel error {err:.3g} vs PyTorch {err_torch:.3g} ({dtype})"
    return kernel


def qkv(B, H, Nq, Nk, D, dtype, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, H, Nk, D, generator=g)
    v = torch.randn(B, H, Nk, D, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


# ----------------------------------------------------------------------------- the tile plan


def blocky_segments(B, N, S, seed):
    """(B, N) ids in runs whose lengths are multiples of 8 (like real layouts vs 8/16-tiles),
    in random order, -1 (padding) included."""
    g = torch.Generator().manual_seed(seed)
    lengths = 8 * torch.randint(1, 4, (B, N), generator=g)  # more runs than needed
    ids = torch.randint(-1, S, (B, N), generator=g)
    return torch.stack([ids[b].repeat_interleave(lengths[b])[:N] for b in range(B)])


@pytest.mark.parametrize("bm,bn", [(4, 4), (8, 16), (16, 8)])
def test_classification_matches_brute_force(bm, bn):
    seen = set()
    for seed in range(4):
        Nq, Nk = 45 + seed, 70 - seed  # not multiples of the tiles
        seg_q, seg_k, allowed = random_problem(3, Nq, Nk, S=7, seed=seed)
        if seed % 2:
            seg_q, seg_k = blocky_segments(3, Nq, 7, seed), blocky_segments(3, Nk, 7, seed + 9)
        got = ba.classify_tiles(seg_q, seg_k, allowed, bm, bn)
        assert torch.equal(got, brute_force_classes(seg_q, seg_k, allowed, bm, bn))
        # a shared (S, S) table gives the same as the table broadcast over the batch
        shared = ba.classify_tiles(seg_q, seg_k, allowed[0], bm, bn)
        assert torch.equal(shared, brute_force_classes(seg_q, seg_k, allowed[0].expand(3, 7, 7),
                                                       bm, bn))
        seen |= set(got.unique().tolist())
    assert seen == {ba.EMPTY, ba.PARTIAL, ba.FULL}  # so the comparisons above tested each class


def test_tile_lists_and_mask_bits():
    seg_q, seg_k, allowed = random_problem(2, 50, 37, S=6, seed=5)
    plan = ba.plan_block_attention(seg_q, seg_k, allowed, 8, 4)
    cls = plan.tile_class
    for lists, cnt, c in ((plan.fwd_idx, plan.fwd_cnt, cls),
                          (plan.bwd_idx, plan.bwd_cnt, cls.transpose(1, 2))):
        B, T, U = c.shape
        assert lists.shape == (B, T, U) and lists.dtype == torch.int32
        for b in range(B):
            for t in range(T):
                n_p, n_f = cnt[b, t].tolist()
                row = lists[b, t].long()
                assert sorted(row.tolist()) == list(range(U))  # a permutation
                assert (c[b, t, row[:n_p]] == ba.PARTIAL).all()
                assert (c[b, t, row[n_p:n_p + n_f]] == ba.FULL).all()
                assert (c[b, t, row[n_p + n_f:]] == ba.EMPTY).all()
    # the bit test reproduces the dense mask exactly
    bits = (plan.q_bits[:, :, None] & plan.k_bits[:, None, :]) != 0
    assert torch.equal(bits, dense_mask(seg_q, seg_k, allowed))


def test_mask_bits_use_all_64_segments():
    # bit 63 is the int64 sign bit: the packing must still be exact
    g = torch.Generator().manual_seed(0)
    seg = torch.arange(64).repeat_interleave(2)[None]  # (1, 128)
    allowed = torch.rand(64, 64, generator=g) < 0.5
    allowed[:, 63] = allowed[63, :] = True
    plan = ba.plan_block_attention(seg, seg, allowed, 16, 16)
    bits = (plan.q_bits[:, :, None] & plan.k_bits[:, None, :]) != 0
    assert torch.equal(bits, dense_mask(seg, seg, allowed))
    with pytest.raises(ValueError, match="at most 64 segments"):
        ba.plan_block_attention(seg, seg, torch.ones(65, 65, dtype=torch.bool), 16, 16)


@pytest.mark.parametrize("n_ctx", [0, 1, 2])
def test_real_layout_plan_full_size(n_ctx):
    lay = build_layout(n_ctx)  # real SNAC geometry, up to 3328 tokens
    seg = lay.seg_id[None]
    plan = ba.plan_block_attention(seg, seg, lay.allowed, 64, 64)
    assert torch.equal(plan.tile_class, brute_force_classes(seg, seg, lay.allowed, 64, 64))
    # segments are multiples of 64, so aligned 64-tiles are never PARTIAL
    assert (plan.tile_class != ba.PARTIAL).all()
    assert (plan.fwd_cnt[..., 0] == 0).all() and (plan.bwd_cnt[..., 0] == 0).all()


def test_real_layout_batch_plan_full_size():
    # a mixed batch pads the shorter rows: their padding tiles are EMPTY, the rest FULL/EMPTY
    batch = collate((2, 0, 1))
    plan = ba.plan_block_attention(batch.seg_id, batch.seg_id, batch.allowed, 64, 64)
    assert torch.equal(plan.tile_class,
                       brute_force_classes(batch.seg_id, batch.seg_id, batch.allowed, 64, 64))
    assert (plan.tile_class != ba.PARTIAL).all()
    full = (plan.tile_class[0] == ba.FULL).float().mean().item()
    assert 0.6 < full < 0.7  # n_ctx=2: ~65% of the tile pairs are computed (DESIGN's estimate)


# ----------------------------------------------------------------------------- numerics (CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_segments_padding_empty_rows(dtype):
    # Nq != Nk, neither a multiple of the tiles; padding; a segment that sees nothing
    seg_q, seg_k, allowed = random_problem(2, 40, 72, S=6, seed=0)
    q, k, v = qkv(2, 2, 40, 72, 16, dtype)
    out = check_against_reference(q, k, v, seg_q, seg_k, allowed, block_m=16, block_n=16)[0].cpu()
    dead = ~dense_mask(seg_q, seg_k, allowed).any(-1)  # (B, Nq) rows that see nothing
    assert dead.any() and (out.transpose(1, 2)[dead] == 0).all()


def test_head_dim_32_shared_table_uneven_tiles():
    seg_q, seg_k, allowed = random_problem(1, 48, 48, S=5, seed=3)
    q, k, v = qkv(1, 2, 48, 48, 32, torch.float32, seed=1)
    check_against_reference(q, k, v, seg_q, seg_k, allowed[0], block_m=16, block_n=8)


def test_all_64_segments():
    g = torch.Generator().manual_seed(0)
    seg = torch.arange(64).repeat_interleave(1)[None]  # (1, 64): one token per segment
    allowed = torch.rand(64, 64, generator=g) < 0.3
    allowed[63] = True  # bit 63 in a query row
    q, k, v = qkv(1, 1, 64, 64, 16, torch.float32, seed=2)
    check_against_reference(q, k, v, seg, seg, allowed, block_m=16, block_n=16)


@pytest.mark.parametrize("block", [4, 16])
def test_real_layout_scaled_down(block):
    if DEV == "cuda" and block < 16:
        pytest.skip("tl.dot needs tiles >= 16 on GPU")
    # The training layout's segment structure at 1/16 size, mixed n_ctx (so padded rows). With
    # block 4 the tiles align with the segments as 64-tiles do at full size (FULL/EMPTY only);
    # with block 16 they straddle segments (many PARTIAL tiles).
    ctx = (0,) if block == 4 else (2, 0, 1)  # block 4 is ~4x the interpreter steps: keep it small
    batch = collate(ctx, frames_per_chunk=SMALL_FPC)
    seg = batch.seg_id
    plan = ba.plan_block_attention(seg, seg, batch.allowed, block, block)
    assert ((plan.tile_class == ba.PARTIAL).any()) == (block == 16)
    q, k, v = qkv(len(ctx), 1, seg.shape[1], seg.shape[1], 16, torch.float32, seed=4)
    check_against_reference(q, k, v, seg, seg, batch.allowed, block_m=block, block_n=block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inference_shape(dtype):
    # Sampling: one level's noised queries against the cached context + clean levels + itself.
    lay = build_layout(2, frames_per_chunk=SMALL_FPC)
    level = 2
    noised = [s for s in lay.segments if s.role == 2]
    seg_k = torch.cat([lay.seg_id[s.start:s.start + s.length] for s in lay.segments
                       if s.role != 2 or s.level == level])[None]
    qs = noised[level]
    seg_q = lay.seg_id[qs.start:qs.start + qs.length][None]  # (1, 16)
    q, k, v = qkv(1, 2, seg_q.shape[1], seg_k.shape[1], 16, dtype, seed=5)
    check_against_reference(q, k, v, seg_q, seg_k, lay.allowed, block_m=16, block_n=16)


def test_strided_inputs_and_determinism():
    # (B, N, H, D) projections viewed as (B, H, N, D): strides differ from contiguous
    seg_q, seg_k, allowed = random_problem(1, 32, 32, S=4, seed=7)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g).to(DEV).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    a = check_against_reference(q, k, v, seg_q, seg_k, allowed, block_m=16, block_n=16)
    b = check_against_reference(q, k, v, seg_q, seg_k, allowed, block_m=16, block_n=16)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # no atomics: bitwise reproducible


def test_every_output_element_written():
    # Outputs and gradients are allocated with torch.empty: poison those allocations with NaN
    # so an element the kernels never store (padding rows, rows past the last full tile, rows
    # that see nothing) cannot pass by holding a lucky 0.
    seg_q, seg_k, allowed = (x.to(DEV) for x in random_problem(1, 40, 24, S=4, seed=14))
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 40, 24, 16, torch.float32))
    real_empty = torch.empty
    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    try:
        out = ba.block_attention(q, k, v, seg_q, seg_k, allowed, block_m=16, block_n=16)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    finally:
        mp.undo()
    ref = attention_ref(q, k, v, seg_q, seg_k, allowed)
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    for got, want in zip((out, *grads), (ref, *ref_grads), strict=True):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_expanded_gradient_and_single_head():
    # out.sum().backward() hands the kernel an expanded (stride 0) dO; H = 1 has a free stride
    seg_q, seg_k, allowed = (x.to(DEV) for x in random_problem(1, 16, 16, S=3, seed=15))
    q, k, v = (x.requires_grad_() for x in qkv(1, 1, 16, 16, 16, torch.float32))
    ba.block_attention(q, k, v, seg_q, seg_k, allowed, block_m=16, block_n=16).sum().backward()
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    attention_ref(*xs, seg_q, seg_k, allowed).sum().backward()
    for got, want in zip((q, k, v), xs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_explicit_plan_and_empty_sequences():
    seg_q, seg_k, allowed = (x.to(DEV) for x in random_problem(1, 16, 16, S=3, seed=8,
                                                               empty_rows=False))
    q, k, v = qkv(1, 1, 16, 16, 16, torch.float32)
    plan = ba.plan_block_attention(seg_q, seg_k, allowed, 16, 16)
    out = ba.block_attention(q, k, v, seg_q, seg_k, allowed, plan=plan)
    torch.testing.assert_close(out, attention_ref(q, k, v, seg_q, seg_k, allowed))
    with pytest.raises(ValueError, match="other segment shapes"):
        ba.block_attention(q[:, :, :8], k, v, seg_q[:, :8], seg_k, allowed, plan=plan)
    empty = ba.block_attention(q[:, :, :0], k, v, seg_q[:, :0], seg_k, allowed)
    assert empty.shape == (1, 1, 0, 16)
    no_keys = ba.block_attention(q, k[:, :, :0], v[:, :, :0], seg_q, seg_k[:, :0], allowed)
    assert no_keys.shape == q.shape and (no_keys == 0).all()


def test_bad_inputs_raise_clear_errors():
    seg, _, allowed = random_problem(1, 16, 16, S=3, seed=9)
    q, k, v = qkv(1, 1, 16, 16, 16, torch.float32, device="cpu")  # validation precedes launch
    call = ba.block_attention
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        call(q[0], k, v, seg, seg, allowed)
    with pytest.raises(ValueError, match="one dtype"):
        call(q.half(), k, v, seg, seg, allowed)
    with pytest.raises(ValueError, match="one dtype"):
        call(q.double(), k.double(), v.double(), seg, seg, allowed)
    with pytest.raises(ValueError, match="head dim"):
        call(q[..., :12], k[..., :12], v[..., :12], seg, seg, allowed)
    with pytest.raises(ValueError, match="seg_q"):
        call(q, k, v, seg[:, :8], seg, allowed)
    with pytest.raises(ValueError, match="integers"):
        call(q, k, v, seg.float(), seg, allowed)
    with pytest.raises(ValueError, match="allowed"):
        call(q, k, v, seg, seg, allowed.int())
    with pytest.raises(ValueError, match="power of two"):
        call(q, k, v, seg, seg, allowed, block_m=12)


# ----------------------------------------------------------------------------- the model


def test_attention_dispatch_uses_kernel():
    # model.attention's "triton" backend reaches this kernel with the same signature.
    seg_q, seg_k, allowed = (x.to(DEV) for x in random_problem(1, 16, 16, S=3, seed=10))
    q, k, v = qkv(1, 1, 16, 16, 16, torch.float32)
    calls = []

    def spy(*a, **kw):
        calls.append(1)
        return ba.block_attention(*a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(attn, "_triton_fn", spy)  # the module caches its lazily imported kernel here
    try:
        with attn.attention_backend("triton"):
            out = attn.attention(q, k, v, seg_q, seg_k, allowed)
    finally:
        mp.undo()
    assert calls, "the triton backend did not call the kernel"
    torch.testing.assert_close(out, attention_ref(q, k, v, seg_q, seg_k, allowed))


def test_training_step_same_loss_and_gradients():
    # The DiT's diffusion loss with the kernel behind model.attention equals the SDPA backend's:
    # loss and every parameter gradient within 2x the fp32 SDPA error vs an fp64 SDPA run.
    dit = pytest.importorskip("model.dit")
    diffusion = pytest.importorskip("model.diffusion")
    V = 32
    cfg = dit.DiTConfig.from_name("debug", frames_per_chunk=SMALL_FPC, codebook_size=V)
    torch.manual_seed(0)
    net = dit.DiT(cfg).to(DEV)
    with torch.no_grad():  # adaLN-Zero/zero heads would make every attention gradient exactly 0
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, V, (2, 3 * f), generator=g).to(DEV) for f in SMALL_FPC]
    loss_fn = diffusion.MaskedDiffusion(diffusion.DiffusionConfig(context_dropout=0.0))

    def step(model, backend):
        model.zero_grad()
        with attn.attention_backend(backend):
            loss = loss_fn.loss(model, windows, n_ctx=[2, 1],  # rows of different length: padding
                                generator=torch.Generator().manual_seed(1))["loss"]
        loss.backward()
        return torch.cat([loss.detach().reshape(1).double()]
                         + [p.grad.double().flatten() for p in model.parameters()])

    calls = []
    mp = pytest.MonkeyPatch()
    mp.setattr(attn, "_triton_fn", lambda *a, **kw: calls.append(1) or ba.block_attention(*a, **kw))
    try:
        kernel = step(net, "triton")
    finally:
        mp.undo()
    assert len(calls) == cfg.n_layers
    sdpa = step(net, "sdpa")
    exact = step(net.double(), "sdpa")  # fp64 reference (the kernel itself has no fp64)
    err, err_torch = (kernel - exact).abs(), (sdpa - exact).abs()
    assert err[0] <= 2 * err_torch[0] + 1e-6, "loss"
    assert err.max() <= 2 * err_torch.max() + 1e-6, \
        f"grads: kernel {err.max():.3g} vs PyTorch {err_torch.max():.3g}"
    assert exact[1:].abs().max() > 1e-3  # the gradients compared are not trivially zero


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_cpu_parts():
    # bench/attention.py needs a GPU to time; its shapes, FLOP counts and masks are checked here.
    bench = _bench_module()
    assert set(bench.all_cases(bench.parse_args([]))) == {"train", "prefill", "infer_A",
                                                          "infer_B", "infer_C", "infer_D"}
    res = bench.main(["--dry-run", "--batch", "2", "--infer-batch", "2", "--cfg",
                      "--cases", "train", "infer_D"])
    shapes = {s["case"]: s for s in res["shapes"]}
    seg_q, seg_k, allowed = bench.training_case([2, 2], (64, 128, 256, 512))
    pairs = int(dense_mask(seg_q, seg_k, allowed).sum())
    assert shapes["train"]["Nq"] == 3328 and shapes["train"]["pairs"] == pairs
    assert shapes["train"]["gflop_fwd"] == pytest.approx(4 * 64 * 10 * pairs / 1e9)
    assert shapes["infer_D"]["Nq"] == 512 and shapes["infer_D"]["Nk"] == 2 * 960 + 448 + 512
    # the FlexAttention BlockMask built from the tile lists computes the same attention
    # (eager flex on CPU: a missing tile or a PARTIAL tile marked FULL would change the output)
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
    batch = collate((1, 0), frames_per_chunk=SMALL_FPC)
    seg, allowed = batch.seg_id, batch.allowed
    plan = ba.plan_block_attention(seg, seg, allowed, 16, 16)
    assert (plan.tile_class == ba.PARTIAL).any() and (plan.tile_class == ba.FULL).any()
    q, k, v = qkv(2, 1, seg.shape[1], seg.shape[1], 16, torch.float32, seed=13)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = flex_attention(q, k, v, block_mask=bench.flex_block_mask(plan, seg, seg, allowed))
    torch.testing.assert_close(out, attention_ref(q, k, v, seg, seg, allowed))
    mask = bench.sdpa_mask(seg, seg, allowed)
    assert mask.shape == (2, 1, seg.shape[1], seg.shape[1]) and mask.all(-1)[1, 0, -1]


def test_kernels_compile_for_hopper_without_spills():
    # The interpreter does not run Triton's GPU compiler; this does (for sm_90, with Triton's
    # bundled ptxas, no GPU needed) and checks the build: tensor-core (wgmma) dots, no spills.
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton build ships no NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "bench/attention.py", "--compile-report", "--dtypes",
                          "bf16", "--head-dims", "64"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("sm_90")]
    assert len(lines) == 4, run.stdout
    for ln in lines:
        assert "spill_stack=0" in ln, ln
        assert "wgmma=True" in ln or "_bwd_delta_kernel" in ln, ln


# ----------------------------------------------------------------------------- GPU (real sizes)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_training_layouts(dtype, head_dim):
    batch = collate((2, 1, 0, 2)).to("cuda")  # 3328 tokens, padded rows
    seg = batch.seg_id
    q, k, v = qkv(4, 4, seg.shape[1], seg.shape[1], head_dim, dtype, seed=11, device="cuda")
    check_against_reference(q, k, v, seg, seg, batch.allowed)


@cuda
@pytest.mark.gpu
def test_gpu_inference_shape_and_head_dim_32():
    lay = build_layout(2)
    keep = torch.tensor([s.role != 2 or s.level == 3 for s in lay.segments])[lay.seg_id]
    seg_k = lay.seg_id[keep][None].expand(2, -1).cuda()  # context + clean + noised D
    s = lay.segments[lay.find(2, 3)]
    seg_q = lay.seg_id[s.start:s.start + s.length][None].expand(2, -1).cuda()  # (2, 512)
    q, k, v = qkv(2, 12, seg_q.shape[1], seg_k.shape[1], 32, torch.bfloat16, seed=12,
                  device="cuda")
    check_against_reference(q, k, v, seg_q, seg_k, lay.allowed.cuda())


# ----------------------------------------------------------------------------- mixed dtypes
# Under CUDA autocast rms_norm is an fp32 op, so the DiT's normed, rotated q/k arrive in fp32
# while v is bf16: attention() runs in v's dtype whatever the backend (fp16 here: the
# interpreter computes bf16 wrongly).


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_attention_mixed_dtypes_run_in_v_dtype(backend):
    seg_q, seg_k, allowed = (x.to(DEV) for x in random_problem(1, 32, 32, S=4, seed=16))
    q, k, v = qkv(1, 2, 32, 32, 16, torch.float32)
    with attn.attention_backend(backend):
        out = attn.attention(q, k, v.half(), seg_q, seg_k, allowed)
    assert out.dtype == torch.float16
    want = attention_ref(q.half(), k.half(), v.half(), seg_q, seg_k, allowed)
    torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)


def test_dit_with_fp32_norms_runs_on_the_kernel():
    # The DiT in fp16 with its q/k norms forced to return fp32 (what autocast does on CUDA).
    dit = pytest.importorskip("model.dit")
    cfg = dit.DiTConfig.from_name("debug", frames_per_chunk=SMALL_FPC, codebook_size=32,
                                  n_layers=1)
    torch.manual_seed(0)
    net = dit.DiT(cfg).to(DEV)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    batch = collate((1,), frames_per_chunk=SMALL_FPC)
    tokens = torch.randint(0, 32, batch.shape, generator=torch.Generator().manual_seed(0))
    seg_t = torch.zeros(batch.seg_role.shape)
    args = [x.to(DEV) for x in (tokens, seg_t)]
    want = net(args[0], batch.to(DEV), args[1])
    net.half()
    for blk in net.blocks:
        for norm in (blk.attn.q_norm, blk.attn.k_norm):
            norm.float().register_forward_pre_hook(lambda m, a: (a[0].float(),))
    with attn.attention_backend("triton"):
        got = net(args[0], batch.to(DEV), args[1])
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_launches_run_under_the_tensors_device_guard():
    # Triton launches on the *current* CUDA device; inputs on cuda:1 need its guard (forward and
    # backward). Recorded here on whatever device runs the kernel.
    entered = []
    real = ba._device_guard
    mp = pytest.MonkeyPatch()
    mp.setattr(ba, "_device_guard", lambda t: entered.append(t.device) or real(t))
    try:
        seg_q, seg_k, allowed = (x.to(DEV) for x in random_problem(1, 16, 16, S=3, seed=17))
        q, k, v = (x.requires_grad_() for x in qkv(1, 1, 16, 16, 16, torch.float32))
        ba.block_attention(q, k, v, seg_q, seg_k, allowed, block_m=16, block_n=16).sum().backward()
    finally:
        mp.undo()
    assert entered == [q.device, q.device]


def test_device_guard_names_the_tensors_device(monkeypatch):
    class OnSecondGpu:
        is_cuda = True
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", lambda d: ("guard", d))
    assert ba._device_guard(OnSecondGpu()) == ("guard", torch.device("cuda", 1))


@pytest.mark.parametrize("layout", ["random", "shifted_training"])
def test_partial_tiles_at_the_production_tile_size_fp16(layout):
    # 64-tiles, as the model launches them, with segment boundaries inside tiles (PARTIAL) and
    # rows past N: what real layouts hit once a batch pads or a query subset starts mid-tile.
    if layout == "random":
        seg_q, seg_k, allowed = random_problem(1, 150, 200, S=5, seed=21)
    else:  # the n_ctx=1 training layout (SNAC geometry / 4), shifted off the 64-grid by 9
        batch = collate((1,), frames_per_chunk=(16, 32, 64, 128))
        seg_q = seg_k = batch.seg_id[:, 9:]
        allowed = batch.allowed
    plan = ba.plan_block_attention(seg_q, seg_k, allowed, 64, 64)
    assert (plan.tile_class == ba.PARTIAL).any()
    q, k, v = qkv(1, 1, seg_q.shape[1], seg_k.shape[1], 64, torch.float16, seed=22)
    check_against_reference(q, k, v, seg_q, seg_k, allowed, block_m=64, block_n=64)


# ----------------------------------------------------------------------------- tuning hooks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_kv_forward_equals_the_reference(dtype, splits):
    # Short query set, long key list with PARTIAL tiles, padding and a segment that sees nothing:
    # every split boundary lands somewhere inside the PARTIAL-then-FULL tile list.
    split_kv = importlib.import_module("model.kernels.split_kv")
    if not torch.cuda.is_available() and not isinstance(
            split_kv._fwd_split_kernel, importlib.import_module(
                "triton.runtime.interpreter").InterpretedFunction):
        split_kv = importlib.reload(split_kv)
    seg_q, seg_k, allowed = (x.to(DEV) for x in random_problem(2, 24, 120, S=5, seed=23))
    q, k, v = qkv(2, 2, 24, 120, 16, dtype, seed=24)
    plan = ba.plan_block_attention(seg_q, seg_k, allowed, 16, 16)
    with torch.no_grad():
        got = split_kv.split_kv_attention(q, k, v, plan, 0.25, splits)
        via_public = ba.block_attention(q, k, v, seg_q, seg_k, allowed, scale=0.25, plan=plan,
                                        split_kv=splits)
        one_pass = ba.block_attention(q, k, v, seg_q, seg_k, allowed, scale=0.25, plan=plan,
                                      split_kv=1)
    want = attention_ref(q.double(), k.double(), v.double(), seg_q, seg_k, allowed, scale=0.25)
    err_one = (one_pass.double() - want).abs().max().item()
    assert got.dtype == dtype and (got.double() - want).abs().max().item() <= 2 * err_one + \
        FLOOR[dtype]
    assert torch.equal(got, via_public)
    dead = ~dense_mask(seg_q, seg_k, allowed).any(-1)
    assert dead.any() and (got.transpose(1, 2)[dead.to(got.device)] == 0).all()


def test_autotune_hook_times_each_candidate_once_per_shape(monkeypatch):
    tune = importlib.import_module("model.kernels.autotune")
    timed = []

    def fake_timer(fn):  # pretends 128-query tiles with 8 warps are fastest
        fn()
        c = timed_config[-1]
        timed.append(c)
        return 1.0 - 0.5 * (c.block_m == 128) - 0.1 * (c.num_warps == 8)

    timed_config = []
    real_run = ba._run
    monkeypatch.setattr(ba, "_run", lambda *a: timed_config.append(a[7]) or real_run(*a))
    monkeypatch.setattr(ba.torch.Tensor, "is_cuda", property(lambda self: True))  # hook is CUDA-only
    tune.set_autotune(True, timer=fake_timer)
    try:
        seg_q, seg_k, allowed = random_problem(1, 40, 40, S=3, seed=25)
        q, k, v = qkv(1, 1, 40, 40, 16, torch.float32, device="cpu")
        monkeypatch.setattr(ba, "_check_inputs", lambda *a: None)
        monkeypatch.setattr(ba, "_device_guard", lambda t: __import__("contextlib").nullcontext())
        with torch.no_grad():
            out = ba.block_attention(q, k, v, seg_q, seg_k, allowed, split_kv=1)
            again = ba.block_attention(q, k, v, seg_q, seg_k, allowed, split_kv=1)
        best = tune.tuner().best[tune.shape_key(q, k, False)]
    finally:
        tune.set_autotune(False)
    assert len(timed) == len(tune.candidates(16))  # every candidate once, the second call none
    assert (best.block_m, best.num_warps) == (128, 8)
    want = attention_ref(q, k, v, seg_q, seg_k, allowed)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(again, want)


_COMPILE_SCRIPT = r"""
import subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import model.kernels.block_attention as ba
import model.kernels.split_kv as sk
from model.kernels.autotune import LaunchConfig

cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
scalars = dict(LSE="*fp32", DELTA="*fp32", QBITS="*i64", KBITS="*i64", IDX="*i32", CNT="*i32",
               O_PART="*fp32", LSE_PART="*fp32", qk_scale="fp32", scale="fp32")
D = 64
for fn, bm, warps, stages in [(sk._fwd_split_kernel, 64, 4, 2), (ba._fwd_kernel, 128, 8, 3),
                              (ba._bwd_dq_kernel, 128, 8, 2), (ba._bwd_dkdv_kernel, 128, 8, 2)]:
    consts = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=64, DOT_PREC="tf32")
    cs = {n: c for n, c in consts.items() if n in fn.arg_names}
    def desc(name):
        tile = 64 if name.startswith(("k_", "v_", "dk_", "dv_")) else bm
        return f"tensordesc<bf16[1,1,{tile},{D}]>"
    sig = {n: "constexpr" if n in cs else desc(n) if n.endswith("_desc") else scalars.get(n, "i32")
           for n in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cs),
                       target=GPUTarget("cuda", 90, 32),
                       options=ba.launch_options(D, LaunchConfig(bm, warps, stages)))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True).stdout
    stack = [f for f in usage.split() if f.startswith("STACK:")]
    print(fn.__name__, bm, "wgmma" if "warp_group_dot" in k.asm["ttgir"] else "no-wgmma", *stack)
"""


def test_split_kv_and_128_tile_builds_compile_for_hopper():
    # The new launch shapes build for sm_90 with Triton's own toolchain (no GPU needed): the
    # split-KV forward at 64-tiles, and the 128-query-tile candidates the tuner may pick.
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton build ships no NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 4, run.stdout
    assert lines[0].startswith("_fwd_split_kernel 64 wgmma") and "STACK:0" in lines[0], lines[0]
    assert all(" wgmma" in ln for ln in lines), lines
