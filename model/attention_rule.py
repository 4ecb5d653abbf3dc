"""The attention rule stated once, densely: the mask, the reference attention, the input contract.

Position i (query) sees position j (key) iff `allowed[seg_q[i], seg_k[j]]`; segment id -1 is
padding, which sees nothing and is seen by nothing. Rows that see nothing output 0 (not NaN).
`model.attention` dispatches to a backend (this reference, or the Triton kernel in
`model.kernels.block_attention`); both check `check_inputs`, and the kernel's tests compare
against `attention_ref`.
"""

from __future__ import annotations

import math
import weakref

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


def sdpa_mask(seg_q: Tensor, seg_k: Tensor, allowed: Tensor,
              dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """What `attention_ref` hands SDPA: the (B, 1, Nq, Nk) mask, in which a row that sees
    nothing may see everything (a fully masked row makes softmax NaN), and the (B, 1, Nq, 1)
    bool of rows that see something, whose outputs are kept. The mask is bool, or with a
    `dtype` additive (0 where allowed, -inf elsewhere): the same attention, and SDPA's CPU
    kernel runs ~14 % faster with it (docs/benchmarks.md)."""
    mask = dense_mask(seg_q, seg_k, allowed)  # (B, Nq, Nk)
    sees = mask.any(dim=-1, keepdim=True)  # (B, Nq, 1)
    mask = (mask | ~sees)[:, None]
    if dtype is not None:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, float("-inf"))
    return mask, sees[:, None]


def attention_ref(q, k, v, seg_q, seg_k, allowed, scale: float | None = None,
                  mask: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Reference: SDPA with a dense bool mask. q (B,H,Nq,D), k/v (B,H,Nk,D) -> (B,H,Nq,D).
    `mask`: `sdpa_mask(seg_q, seg_k, allowed)` when the caller already has it."""
    attn_mask, sees = mask if mask is not None else sdpa_mask(seg_q, seg_k, allowed)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return out * sees.to(out.dtype)


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


class LastInputsCache:
    """Remembers the last value built from some tensors, keyed by their identity and version.

    The model passes the same seg/allowed tensors to every layer, so this turns per-layer work
    on them (the dense mask here, the kernel's block plan) into per-forward work without
    changing `attention()`'s signature. A tensor is identified by its base tensor (held by
    weakref, so a freed one can never match) plus its view geometry and version counter, which
    views share with their base: fresh slices of one KV-cache tensor hit, and any in-place
    write through any view invalidates. Inference-mode tensors have no version counter, so they
    are never cached (correct, just slower)."""

    def __init__(self):
        self._bases: tuple = ()
        self._key: tuple | None = None
        self._value = None

    @staticmethod
    def _identify(tensors, extra):
        try:
            key = tuple((t.storage_offset(), tuple(t.shape), t.stride(), t._version)
                        for t in tensors) + tuple(extra)
        except RuntimeError:  # inference tensor
            return None, None
        return tuple(t if t._base is None else t._base for t in tensors), key

    def get(self, tensors: tuple, extra: tuple, build):
        """`build()`'s value for these tensors (and the hashable `extra`), built at most once
        while they stay the same tensors, unmodified."""
        bases, key = self._identify(tensors, extra)
        if (key is not None and key == self._key
                and all(r() is b for r, b in zip(self._bases, bases, strict=True))):
            return self._value
        value = build()
        if key is not None:
            self._bases, self._key, self._value = tuple(weakref.ref(b) for b in bases), key, value
        return value
