"""Segment-masked attention: the one function every attention call in the model goes through.

Position i (query) sees position j (key) iff `allowed[seg_q[i], seg_k[j]]`; segment id -1 is
padding, which sees nothing and is seen by nothing. Rows that see nothing output 0 (not NaN).

Backends:
  "sdpa"   — reference: PyTorch scaled_dot_product_attention with a dense (B, 1, Nq, Nk) bool mask.
  "triton" — `model.kernels.block_attention.block_attention`, a block-sparse kernel with the same
             signature (written separately; imported lazily so CPU users never need it).
  "auto"   — Triton on CUDA tensors when that module imports, SDPA otherwise.
Switch with `set_backend(name)` or `with attention_backend(name): ...`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "triton")
_backend = "auto"
_triton_fn = None  # cached kernel entry point once imported
_triton_error: Exception | None = None  # why it could not be imported, for "triton" errors


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def attention_backend(name: str):
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _load_triton():
    global _triton_fn, _triton_error
    if _triton_fn is None and _triton_error is None:
        try:
            from model.kernels.block_attention import block_attention

            _triton_fn = block_attention
        except Exception as e:  # ImportError, or triton failing to initialise without a GPU
            _triton_error = e
    return _triton_fn


def dense_mask(seg_q: Tensor, seg_k: Tensor, allowed: Tensor) -> Tensor:
    """(B, Nq, Nk) bool: allowed[b, seg_q[b, i], seg_k[b, j]], False where either is padding."""
    B, Nq = seg_q.shape
    Nk = seg_k.shape[1]
    S = allowed.shape[-1]
    table = allowed.expand(B, S, S) if allowed.ndim == 2 else allowed
    q = seg_q.clamp(min=0)
    k = seg_k.clamp(min=0)
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


def _check(q, k, v, seg_q, seg_k, allowed) -> None:
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"bad q/k/v shapes {tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}")
    B, _, Nq, _ = q.shape
    if seg_q.shape != (B, Nq) or seg_k.shape != (B, k.shape[2]):
        raise ValueError(f"seg ids {tuple(seg_q.shape)}/{tuple(seg_k.shape)} do not match q/k")
    if allowed.dtype != torch.bool or allowed.ndim not in (2, 3):
        raise ValueError("allowed must be a bool (S, S) or (B, S, S) table")


def attention(q, k, v, seg_q, seg_k, allowed, scale: float | None = None) -> Tensor:
    """Segment-masked attention through the selected backend (see module docstring)."""
    _check(q, k, v, seg_q, seg_k, allowed)
    backend = _backend
    if backend == "auto":
        backend = "triton" if q.is_cuda and _load_triton() is not None else "sdpa"
    if backend == "triton":
        fn = _load_triton()
        if fn is None:
            raise RuntimeError(f"triton attention backend unavailable: {_triton_error!r}")
        return fn(q, k, v, seg_q, seg_k, allowed, scale=scale)
    return attention_ref(q, k, v, seg_q, seg_k, allowed, scale=scale)
