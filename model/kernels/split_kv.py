"""Split-KV forward of the block-attention kernel: more programs for short query sets.

Why. The forward runs one program per (query tile, batch x head). The sampler's level-A queries
are 64 tokens: at batch 1 and 10 heads that is 10 programs on a GPU with 132 SMs, each walking
every key tile of the cache alone. Here each query tile's key-tile list (PARTIAL first, then
FULL: the plan's `fwd_idx`) is cut into `splits` contiguous parts, one program per part; each
writes its normalised partial output and log-sum-exp (base 2, -inf where its part shows a row
nothing), and a small PyTorch step merges them:

    lse = log2 Σ_s 2^lse_s,    out = Σ_s 2^(lse_s - lse) · out_s        (0 where every lse_s = -inf)

Forward only (sampling runs without gradients); `block_attention` routes here when no gradient
is needed and `auto_splits` (or its `split_kv` argument) asks for more than one part. The
partial outputs are fp32, so the result matches the one-pass kernel to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels.autotune import LaunchConfig
from model.kernels.block_attention import (
    _LOG2E,
    BlockPlan,
    _desc,
    _device_guard,
    _dot_precision,
    _fwd_tiles,
    _tma_ready,
    launch_options,
)

MAX_SPLITS = 16
SHORT_QUERIES = 128  # at most this many queries per row: the sampler's shapes, not training's


@triton.jit
def _fwd_split_kernel(q_desc, k_desc, v_desc, O_PART, LSE_PART, QBITS, KBITS, IDX, CNT,
                      H, N_Q, N_K, T_Q, T_K, BH, qk_scale, per_split,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    sp = tl.program_id(2)
    b = bh // H
    h = bh % H
    start_m = qt * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    in_q = rows < N_Q
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    q_bits = tl.load(QBITS + b.to(tl.int64) * N_Q + rows, mask=in_q, other=0)
    row = b.to(tl.int64) * T_Q + qt
    n_partial = tl.load(CNT + row * 2)
    n_all = n_partial + tl.load(CNT + row * 2 + 1)
    idx_ptr = IDX + row * T_K
    kbits_base = KBITS + b.to(tl.int64) * N_K
    lo = sp * per_split
    hi = tl.minimum(lo + per_split, n_all)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_bits, k_desc, v_desc, kbits_base, idx_ptr,
                               lo, tl.minimum(hi, n_partial), b, h, N_K, qk_scale,
                               BLOCK_N, HEAD_DIM, True, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_bits, k_desc, v_desc, kbits_base, idx_ptr,
                               tl.maximum(lo, n_partial), hi, b, h, N_K, qk_scale,
                               BLOCK_N, HEAD_DIM, False, DOT_PREC)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    part = (sp.to(tl.int64) * BH + bh) * N_Q  # this program's (split, batch x head) slab
    cols = tl.arange(0, HEAD_DIM)
    tl.store(O_PART + (part + rows)[:, None] * HEAD_DIM + cols[None, :], out,
             mask=in_q[:, None])
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(LSE_PART + part + rows, lse, mask=in_q)


def auto_splits(q: torch.Tensor, plan: BlockPlan) -> int:
    """How many parts to cut each key-tile list into: enough programs for two per SM, for
    short query sets on CUDA only; 1 (no split) otherwise."""
    if not q.is_cuda or q.shape[2] > SHORT_QUERIES:
        return 1
    B, H, Nq, _ = q.shape
    programs = triton.cdiv(Nq, plan.block_m) * B * H
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    n_key_tiles = triton.cdiv(plan.n_k, plan.block_n)
    return max(1, min(triton.cdiv(2 * sms, programs), n_key_tiles, MAX_SPLITS))


def merge(o_part: torch.Tensor, lse_part: torch.Tensor) -> torch.Tensor:
    """(S, ..., N, D) fp32 partial outputs and (S, ..., N) base-2 log-sum-exps -> (..., N, D)."""
    top = lse_part.max(0).values
    seen = top > float("-inf")
    w = torch.exp2(lse_part - torch.where(seen, top, 0.0))  # 0 for empty parts
    out = (w[..., None] * o_part).sum(0) / w.sum(0).clamp(min=1e-30)[..., None]
    return torch.where(seen[..., None], out, 0.0)


@torch.no_grad()
def split_kv_attention(q, k, v, plan: BlockPlan, scale: float, splits: int,
                       launch: LaunchConfig | None = None) -> torch.Tensor:
    """The forward of `block_attention` with each key-tile list cut into `splits` parts."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    BM, BN = plan.block_m, plan.block_n
    Tq, Tk = triton.cdiv(Nq, BM), triton.cdiv(Nk, BN)
    splits = max(1, min(splits, Tk))
    per_split = triton.cdiv(Tk, splits)
    q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    o_part = torch.empty((splits, B * H, Nq, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((splits, B * H, Nq), dtype=torch.float32, device=q.device)
    with _device_guard(q):
        _fwd_split_kernel[(Tq, B * H, splits)](
            _desc(q, BM), _desc(k, BN), _desc(v, BN), o_part, lse_part,
            plan.q_bits, plan.k_bits, plan.fwd_idx, plan.fwd_cnt,
            H, Nq, Nk, Tq, Tk, B * H, scale * _LOG2E, per_split,
            HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, DOT_PREC=_dot_precision(q.dtype),
            **launch_options(D, launch),
        )
    return merge(o_part, lse_part).view(B, H, Nq, D).to(q.dtype)
