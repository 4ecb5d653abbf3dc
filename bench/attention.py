"""Block-structured attention kernel vs FlexAttention, SDPA + dense mask and unmasked SDPA.

    python bench/attention.py                      # H100/H200: training + inference shapes
    python bench/attention.py --dry-run            # any machine: layouts, tile plans, FLOPs only
    python bench/attention.py --compile-report     # any machine: build for sm_90, registers/spills

Shapes (defaults = the `base` DiT preset: 10 heads x 64 head dim, bf16):
  train      batch 8 of the n_ctx=2 training layout, 3328 tokens, self-attention;
  prefill    the sampler's context pass: 2 context chunks (1920 tokens), all visible;
  infer_X    staged sampling of level X: X's noised queries (64..512) against the cache
             (context + finished clean levels) plus themselves.
Methods, all timed with the mask/plan prebuilt (one build serves every layer):
  kernel      model/kernels/block_attention.py with its tile plan;
  flex        torch FlexAttention (compiled) with a BlockMask built from the same tile lists;
  flex_128    the same at 128-tiles, Flex's default block size (default kernel options);
  sdpa_mask   F.scaled_dot_product_attention with the dense (B, 1, Nq, Nk) bool mask;
  sdpa_dense  F.scaled_dot_product_attention with no mask: computes every pair (upper bound).
Effective TFLOP/s count only the allowed (query, key) pairs: 4*D flops per pair forward, 3.5x
that forward+backward (FlashAttention's convention: backward = 2.5 forward), so every method's
TFLOP/s and time ratios agree. Raw results (JSON) go to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import model.kernels.block_attention as ba  # noqa: E402
from model.attention_rule import dense_mask  # noqa: E402
from model.kernels.block_attention import (  # noqa: E402
    FULL,
    PARTIAL,
    BlockPlan,
    block_attention,
    plan_block_attention,
)
from model.layout import CLEAN, CONTEXT, NOISED, build_layout, collate  # noqa: E402

LEVELS = "ABCD"


# ----------------------------------------------------------------------------- shapes


def training_case(n_ctx_rows, fpc):
    batch = collate(n_ctx_rows, frames_per_chunk=fpc)
    return batch.seg_id, batch.seg_id, batch.allowed


def inference_cases(n_ctx: int, batch: int, fpc, cfg: bool = False) -> dict[str, tuple]:
    """What the staged sampler attends: the context pass, then each level's queries. With cfg
    the second half of the rows is the unconditional branch: its context is padding."""
    lay = build_layout(n_ctx, frames_per_chunk=fpc)
    seg = lay.seg_id
    is_ctx = torch.tensor([s.role == CONTEXT for s in lay.segments])

    def ids(keep):  # (batch, n) segment ids of the segments `keep` selects, in sequence order
        m = torch.tensor([keep(s) for s in lay.segments])[seg]
        out = seg[m][None].repeat(batch, 1)
        if cfg:
            out[batch // 2:][is_ctx[out[batch // 2:]]] = -1
        return out

    cases = {}
    if n_ctx:
        ctx = ids(lambda s: s.role == CONTEXT)
        cases["prefill"] = (ctx, ctx, lay.allowed)
    for lvl in range(len(fpc)):
        q = ids(lambda s, lvl=lvl: s.role == NOISED and s.level == lvl)
        k = ids(lambda s, lvl=lvl: s.role == CONTEXT or (s.role == CLEAN and s.level < lvl)
                or (s.role == NOISED and s.level == lvl))
        cases[f"infer_{LEVELS[lvl]}"] = (q, k, lay.allowed)
    return cases


def allowed_pairs(seg_q, seg_k, allowed) -> int:
    """Number of visible (query, key) pairs over the batch, from segment histograms."""
    S = allowed.shape[-1]
    B = seg_q.shape[0]

    def hist(seg):  # (B, S) tokens per segment (padding, -1, matches no segment)
        return (seg[..., None] == torch.arange(S, device=seg.device)).to(torch.float64).sum(1)

    a = allowed.expand(B, S, S).to(torch.float64)
    return int(torch.einsum("bs,bst,bt->", hist(seg_q), a, hist(seg_k)).item())


def flops(pairs: int, heads: int, head_dim: int, backward: bool) -> float:
    return 4.0 * head_dim * pairs * heads * (3.5 if backward else 1.0)


# ----------------------------------------------------------------------------- masks


def flex_block_mask(plan: BlockPlan, seg_q, seg_k, allowed):
    """A FlexAttention BlockMask from the kernel's tile lists (same tiles, same skipping)."""
    from torch.nn.attention.flex_attention import BlockMask

    cls = plan.tile_class  # (B, Tq, Tk)
    # partial tiles first (the plan's forward order), then full tiles first (a second sort)
    full_first = torch.sort((cls != FULL).to(torch.int8), dim=-1, stable=True).indices
    B = seg_q.shape[0]
    S = allowed.shape[-1]
    table = allowed.expand(B, S, S)
    sq, sk = seg_q.clamp(min=0), seg_k.clamp(min=0)
    vq, vk = seg_q >= 0, seg_k >= 0

    def mask_mod(b, h, q_idx, kv_idx):
        return table[b, sq[b, q_idx], sk[b, kv_idx]] & vq[b, q_idx] & vk[b, kv_idx]

    return BlockMask.from_kv_blocks(
        (cls == PARTIAL).sum(-1).to(torch.int32)[:, None],  # (B, 1, Tq): broadcast over heads
        plan.fwd_idx[:, None],
        (cls == FULL).sum(-1).to(torch.int32)[:, None],
        full_first.to(torch.int32)[:, None],
        BLOCK_SIZE=(plan.block_m, plan.block_n),
        mask_mod=mask_mod,
        seq_lengths=(seg_q.shape[1], seg_k.shape[1]),
    )


def sdpa_mask(seg_q, seg_k, allowed):
    """(B, 1, Nq, Nk) bool for SDPA; rows that see nothing opened (their output is discarded)."""
    m = dense_mask(seg_q, seg_k, allowed)
    return (m | ~m.any(-1, keepdim=True))[:, None]


def methods(seg_q, seg_k, allowed, block: int, with_flex: bool = True):
    """name -> (setup seconds, fn(q, k, v) -> out). Setup is measured once, outside timing."""
    out = {}
    t = time.perf_counter()
    plan = plan_block_attention(seg_q, seg_k, allowed, block, block)
    _sync()
    out["kernel"] = (time.perf_counter() - t,
                     lambda q, k, v: block_attention(q, k, v, seg_q, seg_k, allowed, plan=plan))
    if with_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        t = time.perf_counter()
        bm = flex_block_mask(plan, seg_q, seg_k, allowed)
        _sync()
        # Flex's default tiles (128 on H100) must divide the sparse blocks: ask for `block`.
        opts = {name: block for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1",
                                          "BLOCK_M2", "BLOCK_N2")}
        out["flex"] = (time.perf_counter() - t,
                       lambda q, k, v: flex(q, k, v, block_mask=bm, kernel_options=opts))
        if block != 128:  # also Flex at its native 128-blocks (more PARTIAL tiles, bigger tiles)
            t = time.perf_counter()
            bm128 = flex_block_mask(plan_block_attention(seg_q, seg_k, allowed, 128, 128),
                                    seg_q, seg_k, allowed)
            _sync()
            out["flex_128"] = (time.perf_counter() - t,
                               lambda q, k, v: flex(q, k, v, block_mask=bm128))
    t = time.perf_counter()
    mask = sdpa_mask(seg_q, seg_k, allowed)
    _sync()
    out["sdpa_mask"] = (time.perf_counter() - t,
                        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    out["sdpa_dense"] = (0.0, lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timing


def time_case(name, seg_q, seg_k, allowed, args, dtype) -> list[dict]:
    from triton.testing import do_bench

    dev = "cuda"
    seg_q, seg_k, allowed = seg_q.to(dev), seg_k.to(dev), allowed.to(dev)
    B, Nq, Nk = seg_q.shape[0], seg_q.shape[1], seg_k.shape[1]
    H, D = args.heads, args.head_dim
    pairs = allowed_pairs(seg_q, seg_k, allowed)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, Nq, D, device=dev, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, H, Nk, D, device=dev, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, H, Nk, D, device=dev, dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(B, H, Nq, D, device=dev, dtype=dtype, generator=g)
    seen = dense_mask(seg_q, seg_k, allowed).any(-1)[:, None, :, None]  # rows with any key
    ref, rows = None, []
    for method, (setup_s, fn) in methods(seg_q, seg_k, allowed, args.block,
                                         with_flex=not args.no_flex).items():
        row = dict(case=name, method=method, B=B, H=H, D=D, Nq=Nq, Nk=Nk, pairs=pairs,
                   density=pairs / (B * Nq * Nk), setup_ms=setup_s * 1e3)
        try:
            out = fn(q, k, v)  # warm-up / compile, and a numerics check vs the kernel
            if method != "sdpa_dense":
                got = (out.float() * seen).detach()
                if ref is None:
                    ref = got
                row["max_abs_diff_vs_kernel"] = (got - ref).abs().max().item()

            def fwd_bwd(fn=fn):
                torch.autograd.grad(fn(q, k, v), (q, k, v), do)

            fwd_bwd()
            with torch.no_grad():
                row["fwd_ms"] = do_bench(lambda fn=fn: fn(q, k, v), warmup=args.warmup,
                                         rep=args.rep, return_mode="median")
            row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=args.warmup, rep=args.rep,
                                         return_mode="median")
            row["fwd_tflops"] = flops(pairs, H, D, False) / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = flops(pairs, H, D, True) / row["fwd_bwd_ms"] / 1e9
        except Exception as e:  # report and go on: one method failing should not lose the rest
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    kern = next(r for r in rows if r["method"] == "kernel")
    for r in rows:
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if key in r and key in kern:
                r[f"kernel_speedup_{key[:-3]}"] = r[key] / kern[key]
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'case':<10} {'method':<11} {'fwd ms':>8} {'TF/s':>6} {'x kern':>6} "
            f"{'f+b ms':>8} {'TF/s':>6} {'x kern':>6}  setup ms  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<10} {r['method']:<11} ERROR {r['error'][:80]}")
            continue
        lines.append(
            f"{r['case']:<10} {r['method']:<11} {r['fwd_ms']:8.3f} {r['fwd_tflops']:6.0f} "
            f"{r['kernel_speedup_fwd']:6.2f} {r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_tflops']:6.0f} "
            f"{r['kernel_speedup_fwd_bwd']:6.2f}  {r['setup_ms']:8.2f}  "
            f"Nq={r['Nq']} Nk={r['Nk']} dens={r['density']:.2f}"
            + (f" diff={r['max_abs_diff_vs_kernel']:.1e}" if "max_abs_diff_vs_kernel" in r else ""))
    lines.append("x kern = method time / kernel time (> 1: the kernel is faster); "
                 "TF/s count only the allowed pairs")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compile report


def compile_report(dtypes=("bf16", "fp16"), head_dims=(32, 64, 128), block=64, arch=90):
    """Compile every kernel ahead of time for sm_<arch> (no GPU needed: Triton ships ptxas) with
    the launch options the kernel uses, and read registers / spill stack from the cubin."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        raise SystemExit("--compile-report needs TRITON_INTERPRET unset")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    kernels = (ba._fwd_kernel, ba._bwd_delta_kernel, ba._bwd_dkdv_kernel, ba._bwd_dq_kernel)
    scalars = dict(LSE="*fp32", DELTA="*fp32", QBITS="*i64", KBITS="*i64", IDX="*i32",
                   CNT="*i32", qk_scale="fp32", scale="fp32")
    rows = []
    for dt in dtypes:
        for D in head_dims:
            consts = dict(HEAD_DIM=D, BLOCK_M=block, BLOCK_N=block,
                          DOT_PREC="ieee" if dt == "fp32" else "tf32")
            desc = f"tensordesc<{dt}[1,1,{block},{D}]>"
            for fn in kernels:
                cs = {n: c for n, c in consts.items() if n in fn.arg_names}
                sig = {n: "constexpr" if n in cs else
                       desc if n.endswith("_desc") else scalars.get(n, "i32")
                       for n in fn.arg_names}
                t = time.perf_counter()
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cs),
                                   target=GPUTarget("cuda", arch, 32),
                                   options=ba.launch_options(D))
                row = dict(arch=arch, dtype=dt, D=D, kernel=fn.__name__,
                           shared_bytes=k.metadata.shared,
                           wgmma="warp_group_dot" in k.asm["ttgir"],
                           compile_s=round(time.perf_counter() - t, 1))
                with tempfile.TemporaryDirectory() as tmp:
                    cubin = Path(tmp) / "kernel.cubin"
                    cubin.write_bytes(k.asm["cubin"])
                    usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                                           capture_output=True, text=True).stdout
                for field in usage.split():
                    if field.startswith(("REG:", "STACK:")):
                        key, val = field.split(":")
                        row[key.lower()] = int(val)
                rows.append(row)
                print(f"sm_{arch} {dt:<5} D={D:<4} {fn.__name__:<18} regs={row.get('reg')} "
                      f"spill_stack={row.get('stack')} shared={row['shared_bytes']} "
                      f"wgmma={row['wgmma']}", flush=True)
    return rows


# ----------------------------------------------------------------------------- main


def all_cases(args) -> dict[str, tuple]:
    fpc = tuple(args.frames_per_chunk)
    n_ctx = args.n_ctx if len(args.n_ctx) > 1 else args.n_ctx * args.batch
    cases = {"train": training_case(n_ctx, fpc)}
    cases.update(inference_cases(max(args.n_ctx), args.infer_batch, fpc, args.cfg))
    return cases


def describe(cases: dict, args) -> list[dict]:
    """CPU-side facts of every case: sizes, tile classes, allowed pairs, FLOPs."""
    rows = []
    for name, (seg_q, seg_k, allowed) in cases.items():
        plan = plan_block_attention(seg_q, seg_k, allowed, args.block, args.block)
        pairs = allowed_pairs(seg_q, seg_k, allowed)
        B, Nq, Nk = seg_q.shape[0], seg_q.shape[1], seg_k.shape[1]
        rows.append(dict(case=name, B=B, Nq=Nq, Nk=Nk, pairs=pairs,
                         density=pairs / (B * Nq * Nk), tiles=plan.density(),
                         gflop_fwd=flops(pairs, args.heads, args.head_dim, False) / 1e9,
                         gflop_fwd_bwd=flops(pairs, args.heads, args.head_dim, True) / 1e9))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="training batch (rows)")
    p.add_argument("--infer-batch", type=int, default=8, help="rows of an inference batch")
    p.add_argument("--cfg", action="store_true",
                   help="inference: half the rows unconditional (context keys are padding)")
    p.add_argument("--n-ctx", type=int, nargs="+", default=[2],
                   help="one value for every row, or one per row (mixed, padded)")
    p.add_argument("--heads", type=int, default=10, help="base preset: 640 = 10 x 64")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--block", type=int, default=64, help="tile size (segments are x64)")
    p.add_argument("--frames-per-chunk", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--cases", nargs="*", help="subset of case names (default: all)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetitions, ms")
    p.add_argument("--dry-run", action="store_true", help="no GPU: print the shapes and FLOPs")
    p.add_argument("--compile-report", action="store_true",
                   help="no GPU: compile the kernels for sm_90, print registers and spills")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], help="--compile-report")
    p.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128],
                   help="--compile-report")
    p.add_argument("--out", type=Path, help="raw JSON results (default bench/results/"
                   "attention_<gpu>.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compile_report:
        return dict(compile=compile_report(args.dtypes, args.head_dims, args.block))
    cases = all_cases(args)
    if args.cases:
        unknown = set(args.cases) - set(cases)
        if unknown:
            raise SystemExit(f"unknown cases {sorted(unknown)}; have {sorted(cases)}")
        cases = {k: v for k, v in cases.items() if k in args.cases}
    shapes = describe(cases, args)
    for s in shapes:
        t = s["tiles"]
        print(f"{s['case']:<10} B={s['B']} Nq={s['Nq']:<5} Nk={s['Nk']:<5} "
              f"allowed={s['density']:.3f} tiles full={t['full']:.3f} partial={t['partial']:.3f} "
              f"empty={t['empty']:.3f}  GFLOP fwd={s['gflop_fwd']:.1f} f+b={s['gflop_fwd_bwd']:.1f}")
    result = dict(args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  shapes=shapes, torch=torch.__version__, python=platform.python_version())
    if args.dry_run:
        return result
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU-side parts")
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gpu = torch.cuda.get_device_name()
    result.update(gpu=gpu, triton=triton.__version__, rows=[])
    for name, case in cases.items():
        print(f"timing {name} ...", flush=True)
        result["rows"] += time_case(name, *case, args, dtype)
    text = table(result["rows"])
    result["table"] = text
    out = args.out or (Path(__file__).parent / "results" /
                       f"attention_{'_'.join(gpu.split()).replace('/', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{gpu}, {args.dtype}, H={args.heads} D={args.head_dim}, block {args.block}")
    print(text)
    print(f"raw results: {out}")
    return result


if __name__ == "__main__":
    main()
