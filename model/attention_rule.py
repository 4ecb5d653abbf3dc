"""The attention rule stated once, densely: the mask, the reference attention, the input contract.

Position i (query) sees position j (key) iff `allowed[seg_q[i], seg_k[j]]`; segment id -1 is
padding, which sees nothing and is seen by nothing. Rows that see nothing output 0 (not NaN).
`model.attention` dispatches to a backend (this reference, or the Triton kernel in
`model.kernels.block_attention`); both check `check_inputs`, and the kernel's tests compare
against `attention_ref`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def dense_mask(seg_q: Tensor, seg_k: Tensor, allowed: Tensor) -> Tensor:
    """(B, Nq, Nk) bool: allowed[b, seg_q[b, i], seg_k[b, j]], False where either is padding.

    The one dense statement of the rule: the "sdpa" backend and the Triton kernel's tests use it.
    Segment ids may be any integer dtype."""
    B, Nq = seg_q.shape
    Nk = seg_k.shape[1]
    S = allowed.shape[-1]
    table = allowed.expand(B, S, S) if allowed.ndim == 2 else allowed
    q = seg_q.long().clamp(min=0)  # gather wants int64 indices
    k = seg_k.long().clamp(min=0)
    rows = table.gather(1, q[:, :, None].expand(B, Nq, S))  # (B, Nq, S)
    mask = rows.gather(2, k[:, None, :].expand(B, Nq, Nk))  # (B, Nq, Nk)
    return mask & (seg_q >= 0)[:, :, None] & (seg_k >= 0)[:, None, :]


def attention_ref(q, k, v, seg_q, seg_k, allowed, scale: float | None = None) -> Tensor:
    """Reference: SDPA with a dense bool mask. q (B,H,Nq,D), k/v (B,H,Nk,D) -> (B,H,Nq,D)."""
    mask = dense_mask(seg_q, seg_k, allowed)  # (B, Nq, Nk)
    sees = mask.any(dim=-1, keepdim=True)  # (B, Nq, 1)
    # A fully masked row makes softmax NaN; let it attend everywhere, then zero its output.
    mask = (mask | ~sees)[:, None]  # (B, 1, Nq, Nk), broadcast over heads
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out * sees[:, None].to(out.dtype)


def check_inputs(q, k, v, seg_q, seg_k, allowed) -> None:
    """Shapes and types of the contract every backend shares (the kernel adds its own limits)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Nq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k and v must be (B={B}, H={H}, Nk, D={D}); got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if seg_q.shape != (B, Nq) or seg_k.shape != (B, k.shape[2]):
        raise ValueError(f"seg_q must be (B, Nq)={(B, Nq)} and seg_k (B, Nk)={(B, k.shape[2])}; "
                         f"got {tuple(seg_q.shape)}, {tuple(seg_k.shape)}")
    if allowed.dtype != torch.bool or allowed.ndim not in (2, 3):
        raise ValueError(f"allowed must be a bool (S, S) or (B, S, S) table; got {allowed.dtype} "
                         f"{tuple(allowed.shape)}")
