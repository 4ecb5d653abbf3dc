"""Block-structured attention: a Triton flash-attention kernel that skips what the layout masks.

What it computes (same contract as `model.attention.attention`, whose `attention_ref` is
the reference):
    q (B, H, Nq, D), k/v (B, H, Nk, D); seg_q (B, Nq), seg_k (B, Nk) integer segment ids,
    negative = padding; allowed (B, S, S) or (S, S) bool.
    Query i may see key j iff allowed[b, seg_q[b, i], seg_k[b, j]]; padding sees nothing and is
    seen by nothing. out = softmax(scale * q kᵀ restricted to the visible keys) v, and rows that
    see nothing output 0 (not NaN), with zero gradients.

Algorithm.
  1. Plan (`plan_block_attention`, pure torch, vectorised, no host sync). Tile queries by
     BLOCK_M and keys by BLOCK_N and classify every (query tile, key tile) pair of each batch row:
       FULL    every (i, j) in the tile is allowed  -> no per-element mask, no bounds checks;
       PARTIAL some are                             -> per-element mask;
       EMPTY   none are                             -> never loaded.
     The count of allowed pairs in a tile is cnt_q @ allowed @ cnt_kᵀ, with cnt_* the per-tile
     histogram of segment ids, so classification costs O(T·S²), not O(N²). Each query tile gets
     a list of its key tiles sorted PARTIAL first, then FULL (EMPTY dropped); each key tile the
     transposed list, for the dK/dV pass. The plan depends only on (seg_q, seg_k, allowed), so
     one plan serves every layer and head of a forward (see `model.attention_rule.LastInputsCache`).
     The per-element mask is a bit test: q_bits[i] = the allowed row of i's segment packed into
     an int64, k_bits[j] = 1 << seg_k[j]; (i, j) is visible iff q_bits[i] & k_bits[j] != 0.
     Hence at most 64 segments (our layouts have <= 15).
  2. Forward, one program per (query tile, batch*head): online softmax in base 2 over the
     PARTIAL tiles, then the FULL tiles (a constexpr switch compiles the loop twice, the FULL
     copy without masks); saves the log-sum-exp (base 2, +inf for rows that see nothing so the
     backward's exp2(s - lse) is exactly 0 there).
  3. Backward: delta = rowsum(dO * O); dK/dV programs (one per key tile) walk the transposed
     lists, dQ programs (one per query tile) walk the forward lists. Every output element is
     written by exactly one program in a fixed order: deterministic, no atomics.

Constraints and caveats.
  - dtypes fp16 / bf16 (fp32 accumulation) and fp32 (dots in IEEE fp32, not TF32, so the CPU
    interpreter and GPU agree with the fp32 reference; on GPU that is a slow correctness mode
    without tensor cores). D a power of two in [16, 256].
  - q/k/v/o/dO and the gradients move through 4-D tensor descriptors (TMA on Hopper): rows past
    N are zero-filled on load and clipped on store, and no per-element pointer tiles occupy
    registers (with pointer tiles the sm_90 build spilled at D >= 64). Any strides work
    ((B, N, H, D) views need no copy) as long as the last is 1 and the base and other strides
    are 16-byte aligned; other inputs are copied first.
  - The plan's tile lists and bit vectors use int64 row offsets; TMA coordinates are int32
    (N < 2**31 per head).
  - Tile sizes are plan parameters (tests use 4..16; real segments are multiples of 64, so with
    64-tiles almost every tile is FULL or EMPTY). tl.dot needs tiles >= 16 on GPU.
  - On CPU this runs only under TRITON_INTERPRET=1 (set before this module is imported), in
    fp32/fp16: the interpreter computes bf16 wrongly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from model.attention_rule import LastInputsCache, check_inputs
from model.kernels.autotune import LaunchConfig, candidates, default_config, shape_key, tuner

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile classes
MAX_SEGMENTS = 64  # q_bits is one int64 per query

# ----------------------------------------------------------------------------- reference
# The pure-PyTorch reference is `model.attention_rule.attention_ref` (SDPA with the dense mask of
# `model.attention_rule.dense_mask`), the model's own "sdpa" backend: the rule is stated once, there,
# and the tests compare this kernel against it.


# ----------------------------------------------------------------------------- the plan


@dataclass
class BlockPlan:
    """Tile lists for one (seg_q, seg_k, allowed); shared by all layers and heads."""

    block_m: int
    block_n: int
    n_q: int
    n_k: int
    tile_class: torch.Tensor  # (B, Tq, Tk) int8: EMPTY / PARTIAL / FULL
    q_bits: torch.Tensor  # (B, Nq) int64: allowed key segments of each query, as bits
    k_bits: torch.Tensor  # (B, Nk) int64: 1 << segment of each key (0 for padding)
    fwd_idx: torch.Tensor  # (B, Tq, Tk) int32: key tiles of each query tile, PARTIAL then FULL
    fwd_cnt: torch.Tensor  # (B, Tq, 2) int32: [n_partial, n_full]
    bwd_idx: torch.Tensor  # (B, Tk, Tq) int32: query tiles of each key tile, PARTIAL then FULL
    bwd_cnt: torch.Tensor  # (B, Tk, 2) int32

    def density(self) -> dict[str, float]:
        """Fractions of tile pairs per class (for benchmarks and docs; syncs)."""
        c = self.tile_class
        return {name: (c == v).float().mean().item() for name, v in
                (("full", FULL), ("partial", PARTIAL), ("empty", EMPTY))}


def _segment_histogram(seg: torch.Tensor, n_seg: int, block: int) -> torch.Tensor:
    """(B, N) ids -> (B, T, S) float64: how many positions of each tile are in each segment."""
    B, N = seg.shape
    T = triton.cdiv(N, block)
    # a comparison, not F.one_hot: one_hot range-checks its input, a host sync on GPU
    onehot = (seg.long()[..., None] == torch.arange(n_seg, device=seg.device)).to(torch.float64)
    onehot = F.pad(onehot, (0, 0, 0, T * block - N))  # out-of-range positions count as padding
    return onehot.view(B, T, block, n_seg).sum(2)  # (B, T, S)


def classify_tiles(seg_q, seg_k, allowed, block_m: int, block_n: int) -> torch.Tensor:
    """(B, Tq, Tk) int8 tile classes. Exact: counts are integers < 2**53 in float64."""
    B = seg_q.shape[0]
    S = allowed.shape[-1]
    allowed = allowed.expand(B, S, S).to(torch.float64)
    cq = _segment_histogram(seg_q, S, block_m)  # (B, Tq, S)
    ck = _segment_histogram(seg_k, S, block_n)  # (B, Tk, S)
    n_allowed = cq @ allowed @ ck.transpose(1, 2)  # (B, Tq, Tk) allowed pairs per tile
    # n_allowed <= valid_q * valid_k <= block_m * block_n, so equality means every pair of a
    # full-size, padding-free tile is allowed.
    cls = torch.where(n_allowed == 0, EMPTY, PARTIAL)  # torch.where: no host sync
    return torch.where(n_allowed == block_m * block_n, FULL, cls).to(torch.int8)


def _tile_lists(cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, U) classes -> per-row lists (B, T, U) int32 (PARTIAL, then FULL, then EMPTY) and
    counts (B, T, 2) int32."""
    rank = torch.tensor([2, 0, 1], dtype=torch.int8, device=cls.device)[cls.long()]
    idx = torch.sort(rank, dim=-1, stable=True).indices.to(torch.int32)
    cnt = torch.stack([(cls == PARTIAL).sum(-1), (cls == FULL).sum(-1)], -1).to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


def plan_block_attention(seg_q, seg_k, allowed, block_m: int = 64, block_n: int = 64) -> BlockPlan:
    """Classify tiles and build the tile lists and mask bits. Vectorised; no host sync."""
    B, Nq = seg_q.shape
    Nk = seg_k.shape[1]
    S = allowed.shape[-1]
    if S > MAX_SEGMENTS:
        raise ValueError(f"block_attention supports at most {MAX_SEGMENTS} segments, got {S}")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 1 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two, got {blk}")
    cls = classify_tiles(seg_q, seg_k, allowed, block_m, block_n)
    fwd_idx, fwd_cnt = _tile_lists(cls)
    bwd_idx, bwd_cnt = _tile_lists(cls.transpose(1, 2))
    # Pack each segment's allowed row into int64 bits (bit 63 lands on the sign: harmless, only
    # bitwise & reads it).
    bits = torch.arange(S, device=seg_q.device)
    rows = (allowed.expand(B, S, S).long() << bits).sum(-1)  # (B, S): bit j = may see seg j
    sq, sk = seg_q.long(), seg_k.long()
    q_bits = torch.where(sq >= 0, rows.gather(1, sq.clamp(min=0)), 0)  # (B, Nq)
    k_bits = torch.where(sk >= 0, torch.ones_like(sk) << sk.clamp(min=0), 0)  # (B, Nk)
    return BlockPlan(block_m, block_n, Nq, Nk, cls, q_bits.contiguous(), k_bits.contiguous(),
                     fwd_idx, fwd_cnt, bwd_idx, bwd_cnt)


_plan_cache = LastInputsCache()  # per-layer planning becomes per-forward

# ----------------------------------------------------------------------------- kernels
# q/k/v/o/do/dq/dk/dv are read and written through 4-D tensor descriptors (B, H, N, D) with
# blocks (1, 1, tile, D): on Hopper these are TMA copies, which zero-fill rows past N and clip
# stores, and keep no per-element pointers in registers (pointer tiles spilled at D >= 64).


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, q_bits, k_desc, v_desc, kbits_base, idx_ptr, start, stop, b, h,
               N_K, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(start, stop):
        start_n = tl.load(idx_ptr + i) * BLOCK_N
        k = k_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BM, BN), log2 units
        if MASKED:
            cols = start_n + tl.arange(0, BLOCK_N)
            k_bits = tl.load(kbits_base + cols, mask=cols < N_K, other=0)
            s = tl.where((q_bits[:, None] & k_bits[None, :]) != 0, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf; subtract 0 there to avoid inf - inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # FULL tiles: every pair visible, every row and column in range
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, QBITS, KBITS, IDX, CNT,
                H, N_Q, N_K, T_Q, T_K, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PREC: tl.constexpr):
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = qt * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    in_q = rows < N_Q
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    q_bits = tl.load(QBITS + b.to(tl.int64) * N_Q + rows, mask=in_q, other=0)
    row = b.to(tl.int64) * T_Q + qt  # this query tile's entry in the tile lists
    n_partial = tl.load(CNT + row * 2)
    n_full = tl.load(CNT + row * 2 + 1)
    idx_ptr = IDX + row * T_K
    kbits_base = KBITS + b.to(tl.int64) * N_K

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_bits, k_desc, v_desc, kbits_base, idx_ptr,
                               0, n_partial, b, h, N_K, qk_scale,
                               BLOCK_N, HEAD_DIM, True, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_bits, k_desc, v_desc, kbits_base, idx_ptr,
                               n_partial, n_partial + n_full, b, h, N_K, qk_scale,
                               BLOCK_N, HEAD_DIM, False, DOT_PREC)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_desc.store([b, h, start_m, 0], out.to(q.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * N_Q + rows, lse, mask=in_q)


@triton.jit
def _bwd_delta_kernel(o_desc, do_desc, DELTA, H, N_Q,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = qt * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    o = o_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM).to(tl.float32)
    do = do_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + rows, tl.sum(o * do, 1), mask=rows < N_Q)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, k_bits, q_desc, do_desc, lse_base, delta_base, qbits_base,
                    idx_ptr, start, stop, b, h, N_Q, qk_scale, BLOCK_M: tl.constexpr,
                    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(start, stop):
        start_m = tl.load(idx_ptr + i) * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        do = do_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        if MASKED:
            in_q = rows < N_Q
            lse = tl.load(lse_base + rows, mask=in_q, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=in_q, other=0.0)
            q_bits = tl.load(qbits_base + rows, mask=in_q, other=0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BN, BM)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where((k_bits[:, None] & q_bits[None, :]) != 0, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BN, BM)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, LSE, DELTA, QBITS,
                     KBITS, IDX, CNT, H, N_Q, N_K, T_Q, T_K, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    kt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_n = kt * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    k = k_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    v = v_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    k_bits = tl.load(KBITS + b.to(tl.int64) * N_K + cols, mask=cols < N_K, other=0)
    row = b.to(tl.int64) * T_K + kt  # this key tile's entry in the transposed lists
    n_partial = tl.load(CNT + row * 2)
    n_full = tl.load(CNT + row * 2 + 1)
    idx_ptr = IDX + row * T_Q
    lse_base = LSE + bh.to(tl.int64) * N_Q
    delta_base = DELTA + bh.to(tl.int64) * N_Q
    qbits_base = QBITS + b.to(tl.int64) * N_Q

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, k_bits, q_desc, do_desc, lse_base, delta_base,
                             qbits_base, idx_ptr, 0, n_partial, b, h, N_Q, qk_scale,
                             BLOCK_M, HEAD_DIM, True, DOT_PREC)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, k_bits, q_desc, do_desc, lse_base, delta_base,
                             qbits_base, idx_ptr, n_partial, n_partial + n_full, b, h, N_Q,
                             qk_scale, BLOCK_M, HEAD_DIM, False, DOT_PREC)
    dk_desc.store([b, h, start_n, 0], (dk * scale).to(k.dtype).reshape(1, 1, BLOCK_N, HEAD_DIM))
    dv_desc.store([b, h, start_n, 0], dv.to(v.dtype).reshape(1, 1, BLOCK_N, HEAD_DIM))


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, q_bits, k_desc, v_desc, kbits_base, idx_ptr, start,
                  stop, b, h, N_K, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(start, stop):
        start_n = tl.load(idx_ptr + i) * BLOCK_N
        k = k_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BM, BN)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            cols = start_n + tl.arange(0, BLOCK_N)
            k_bits = tl.load(kbits_base + cols, mask=cols < N_K, other=0)
            p = tl.where((q_bits[:, None] & k_bits[None, :]) != 0, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(q_desc, k_desc, v_desc, do_desc, dq_desc, LSE, DELTA, QBITS, KBITS, IDX, CNT,
                   H, N_Q, N_K, T_Q, T_K, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = qt * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    in_q = rows < N_Q
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    do = do_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    lse = tl.load(LSE + bh.to(tl.int64) * N_Q + rows, mask=in_q, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + rows, mask=in_q, other=0.0)
    q_bits = tl.load(QBITS + b.to(tl.int64) * N_Q + rows, mask=in_q, other=0)
    row = b.to(tl.int64) * T_Q + qt
    n_partial = tl.load(CNT + row * 2)
    n_full = tl.load(CNT + row * 2 + 1)
    idx_ptr = IDX + row * T_K
    kbits_base = KBITS + b.to(tl.int64) * N_K

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, q_bits, k_desc, v_desc, kbits_base, idx_ptr, 0,
                       n_partial, b, h, N_K, qk_scale, BLOCK_N, HEAD_DIM, True, DOT_PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, q_bits, k_desc, v_desc, kbits_base, idx_ptr,
                       n_partial, n_partial + n_full, b, h, N_K, qk_scale, BLOCK_N, HEAD_DIM,
                       False, DOT_PREC)
    dq_desc.store([b, h, start_m, 0], (dq * scale).to(q.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))


# ----------------------------------------------------------------------------- autograd

_LOG2E = 1.4426950408889634


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise run as TF32 on GPU (~1e-3 error); 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_options(head_dim: int, launch: LaunchConfig | None = None) -> dict:
    """num_warps/num_stages of every kernel: `launch`'s, else the untuned default
    (model/kernels/autotune.py)."""
    launch = launch or default_config(head_dim)
    return dict(num_warps=launch.num_warps, num_stages=launch.num_stages)


def _desc(t: torch.Tensor, block: int) -> TensorDescriptor:
    """(B, H, N, D) tensor -> descriptor of (1, 1, block, D) tiles."""
    # A size-1 dim may carry any stride (even 0); only coordinate 0 is ever used there, so give
    # it the contiguous stride, which meets TMA's alignment rule.
    dense = [math.prod(t.shape[i + 1:]) for i in range(t.dim())]
    strides = [s if n > 1 else c for s, n, c in zip(t.stride(), t.shape, dense, strict=True)]
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, block, t.shape[3]])


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device, not the tensors': with inputs on cuda:1 and
    cuda:0 current it would run (and fail) on the wrong GPU. Launch under the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """TMA needs a 16-byte aligned base, 16-byte aligned non-zero strides and a unit last
    stride (an expanded gradient, stride 0, is copied)."""
    size = t.element_size()
    if (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s > 0 and s * size % 16 == 0
                    for s, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan, scale: float, launch: LaunchConfig | None = None):
        B, H, Nq, D = q.shape
        Nk = k.shape[2]
        assert k.shape == v.shape == (B, H, Nk, D) and q.dtype == k.dtype == v.dtype
        assert plan.n_q == Nq and plan.n_k == Nk and plan.q_bits.shape[0] == B
        BM, BN = plan.block_m, plan.block_n
        Tq, Tk = triton.cdiv(Nq, BM), triton.cdiv(Nk, BN)
        q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
        with _device_guard(q):
            _fwd_kernel[(Tq, B * H)](
                _desc(q, BM), _desc(k, BN), _desc(v, BN), _desc(o, BM), lse,
                plan.q_bits, plan.k_bits, plan.fwd_idx, plan.fwd_cnt,
                H, Nq, Nk, Tq, Tk, scale * _LOG2E,
                HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, DOT_PREC=_dot_precision(q.dtype),
                **launch_options(D, launch),
            )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale, ctx.launch = plan, scale, launch
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        with _device_guard(q):
            grads = _BlockAttention._backward(q, k, v, o, lse, ctx.plan, ctx.scale,
                                              _tma_ready(do), ctx.launch)
        return (*grads, None, None, None)

    @staticmethod
    def _backward(q, k, v, o, lse, plan, scale, do, launch):
        B, H, Nq, D = q.shape
        Nk = k.shape[2]
        BM, BN = plan.block_m, plan.block_n
        Tq, Tk = triton.cdiv(Nq, BM), triton.cdiv(Nk, BN)
        delta = torch.empty_like(lse)  # (B, H, Nq) fp32
        _bwd_delta_kernel[(Tq, B * H)](_desc(o, BM), _desc(do, BM), delta, H, Nq,
                                       HEAD_DIM=D, BLOCK_M=BM)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        common = dict(HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, DOT_PREC=_dot_precision(q.dtype),
                      **launch_options(D, launch))
        q_d, k_d, v_d, do_d = _desc(q, BM), _desc(k, BN), _desc(v, BN), _desc(do, BM)
        _bwd_dkdv_kernel[(Tk, B * H)](
            q_d, k_d, v_d, do_d, _desc(dk, BN), _desc(dv, BN), lse, delta,
            plan.q_bits, plan.k_bits, plan.bwd_idx, plan.bwd_cnt,
            H, Nq, Nk, Tq, Tk, scale * _LOG2E, scale, **common,
        )
        _bwd_dq_kernel[(Tq, B * H)](
            q_d, k_d, v_d, do_d, _desc(dq, BM), lse, delta,
            plan.q_bits, plan.k_bits, plan.fwd_idx, plan.fwd_cnt,
            H, Nq, Nk, Tq, Tk, scale * _LOG2E, scale, **common,
        )
        return dq, dk, dv


# ----------------------------------------------------------------------------- public


def _check_inputs(q, k, v, seg_q, seg_k, allowed):
    """The shared contract (`model.attention_rule.check_inputs`) plus this kernel's limits."""
    check_inputs(q, k, v, seg_q, seg_k, allowed)
    B, D = q.shape[0], q.shape[3]
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16,
                                                               torch.float32):
        raise ValueError(f"q, k, v must share one dtype of fp16/bf16/fp32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {D}")
    if seg_q.dtype.is_floating_point or seg_k.dtype.is_floating_point or seg_q.dtype == torch.bool:
        raise ValueError(f"segment ids must be integers, got {seg_q.dtype}, {seg_k.dtype}")
    if allowed.shape[-1] != allowed.shape[-2] or (allowed.dim() == 3 and allowed.shape[0] != B):
        raise ValueError(f"allowed must be bool (S, S) or (B={B}, S, S); got {allowed.dtype} "
                         f"{tuple(allowed.shape)}")
    devices = {t.device for t in (q, k, v, seg_q, seg_k, allowed)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def block_attention(q, k, v, seg_q, seg_k, allowed, scale=None, *, plan: BlockPlan | None = None,
                    block_m: int | None = None, block_n: int = 64,
                    launch: LaunchConfig | None = None, split_kv: int | None = None):
    """Masked attention over segment-structured sequences; see the module docstring.

    q (B, H, Nq, D), k/v (B, H, Nk, D), seg_q (B, Nq), seg_k (B, Nk), allowed (S, S) or (B, S, S)
    -> (B, H, Nq, D) in q's dtype. `plan` (from `plan_block_attention`) may be passed to reuse
    tile lists explicitly; otherwise the last plan is reused while the same unmodified
    seg/allowed tensors come back (every layer of one forward). `launch`: the query tile and
    launch options (model/kernels/autotune.py): given, tuned per shape when tuning is on, else
    the default; `block_m` alone overrides its query tile (tests). `split_kv`: forward-only
    split over the key tiles (model/kernels/split_kv.py) into this many parts; None = automatic
    on CUDA for short query sets without gradients, 1 = never."""
    _check_inputs(q, k, v, seg_q, seg_k, allowed)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if plan is not None and (plan.q_bits.shape != seg_q.shape or plan.k_bits.shape != seg_k.shape):
        raise ValueError("plan was built for other segment shapes")
    if 0 in q.shape[:3] or k.shape[2] == 0:  # nothing to attend: all rows see nothing
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    D = q.shape[-1]
    if plan is not None:
        launch = launch or replace(default_config(D), block_m=plan.block_m)
    elif launch is None and block_m is not None:
        launch = replace(default_config(D), block_m=block_m)
    elif launch is None and tuner() is not None and q.is_cuda:
        launch = tuner().choose(shape_key(q, k, grad), candidates(D), lambda c: _run(
            q, k, v, seg_q, seg_k, allowed, scale, c, block_n, grad))
    launch = launch or default_config(D)
    if plan is None:
        plan = _plan(seg_q, seg_k, allowed, launch.block_m, block_n)
    if plan.q_bits.device != q.device:
        raise ValueError(f"plan is on {plan.q_bits.device}, q on {q.device}")
    if q.is_cuda and min(plan.block_m, plan.block_n) < 16:
        raise ValueError("tl.dot needs tiles of at least 16 on GPU; got "
                         f"{plan.block_m}x{plan.block_n}")
    if not grad:
        from model.kernels.split_kv import auto_splits, split_kv_attention

        splits = auto_splits(q, plan) if split_kv is None else split_kv
        if splits > 1:
            return split_kv_attention(q, k, v, plan, scale, splits, launch)
    return _BlockAttention.apply(q, k, v, plan, scale, launch)


def _plan(seg_q, seg_k, allowed, block_m: int, block_n: int) -> BlockPlan:
    return _plan_cache.get((seg_q, seg_k, allowed), (block_m, block_n),
                           lambda: plan_block_attention(seg_q, seg_k, allowed, block_m, block_n))


def _run(q, k, v, seg_q, seg_k, allowed, scale, launch: LaunchConfig, block_n: int, grad: bool):
    """One call with `launch` (what the tuner times): forward, and backward when training."""
    plan = plan_block_attention(seg_q, seg_k, allowed, launch.block_m, block_n)
    with torch.enable_grad() if grad else torch.no_grad():
        xs = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        out = _BlockAttention.apply(*xs, plan, scale, launch)
        if grad:
            torch.autograd.grad(out, xs, torch.ones_like(out))
    return out


if __name__ == "__main__":
    # The benchmark lives in bench/attention.py (it needs a GPU and FlexAttention).
    import runpy
    import sys
    from pathlib import Path

    sys.argv[0] = str(Path(__file__).resolve().parents[2] / "bench" / "attention.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
