"""Segment-masked attention: the one function every attention call in the model goes through.

Position i (query) sees position j (key) iff `allowed[seg_q[i], seg_k[j]]`; segment id -1 is
padding, which sees nothing and is seen by nothing. Rows that see nothing output 0 (not NaN).

Backends:
  "sdpa"   — reference: PyTorch scaled_dot_product_attention with a dense (B, 1, Nq, Nk) mask
             (`model.attention_rule.attention_ref`), built once per forward; where a leading
             block sees exactly itself (the context of a training batch) that block runs without
             a mask and only the rows after it use the dense mask (`context_prefix`).
  "triton" — `model.kernels.block_attention.block_attention`, a block-sparse kernel with the same
             signature (written separately; imported lazily so CPU users never need it).
  "auto"   — Triton on CUDA tensors when that module imports, SDPA otherwise.
Switch with `set_backend(name)` or `with attention_backend(name): ...`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention_rule import LastInputsCache, attention_ref, check_inputs, sdpa_mask

BACKENDS = ("auto", "sdpa", "triton")
_backend = "auto"
_triton_fn = None  # cached kernel entry point once imported
_triton_error: Exception | None = None  # why it could not be imported, for "triton" errors
_mask_cache = LastInputsCache()  # the dense mask, built once per forward instead of per layer


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


def attention(q, k, v, seg_q, seg_k, allowed, scale: float | None = None) -> Tensor:
    """Segment-masked attention through the selected backend (see module docstring)."""
    check_inputs(q, k, v, seg_q, seg_k, allowed)
    backend = _backend
    if backend == "auto":
        backend = "triton" if q.is_cuda and _load_triton() is not None else "sdpa"
    if backend == "triton":
        fn = _load_triton()
        if fn is None:
            raise RuntimeError(f"triton attention backend unavailable: {_triton_error!r}")
        return fn(q, k, v, seg_q, seg_k, allowed, scale=scale)
    mask, split = _mask_cache.get((seg_q, seg_k, allowed), (q.dtype,),
                                  lambda: (sdpa_mask(seg_q, seg_k, allowed, q.dtype),
                                           context_prefix(seg_q, seg_k, allowed)))
    if not split:
        return attention_ref(q, k, v, seg_q, seg_k, allowed, scale=scale, mask=mask)
    # The context block attends to itself alone: SDPA without a mask on that square (its
    # fastest path), the dense mask only for the rows after it. The same attention exactly.
    attn_mask, sees = mask
    head = F.scaled_dot_product_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split],
                                          scale=scale)
    tail = attention_ref(q[:, :, split:], k, v, None, None, None, scale=scale,
                         mask=(attn_mask[:, :, split:], sees[:, :, split:]))
    return torch.cat([head, tail], dim=2)


def context_prefix(seg_q: Tensor, seg_k: Tensor, allowed: Tensor) -> int:
    """Length P of a leading block that sees exactly itself, or 0: for self-attention where
    every row of the batch has the same segments, positions [0, P) hold exactly the segments
    that see precisely those segments (the context of a training layout, DESIGN section 2;
    clean A when there is no context), and some position follows them. Then rows [0, P) attend
    to keys [0, P) with no mask at all, and `attention` splits the work there."""
    if seg_q.shape != seg_k.shape or not torch.equal(seg_q, seg_k):
        return 0
    seg = seg_q[0]
    table = allowed if allowed.ndim == 2 else allowed[0]
    if (seg_q != seg).any() or (allowed.ndim == 3 and (allowed != table).any()):
        return 0
    first = int(seg[0])
    if first < 0:
        return 0
    row = table[first]  # what the first segment sees: the block must see exactly that
    members = (table == row).all(dim=1) & row  # segments seeing the same, and seen by it
    if not torch.equal(members, row):
        return 0
    inside = members[seg.clamp(min=0)] & (seg >= 0)  # per position
    size = int(inside.sum())
    if size == 0 or size >= seg.numel() or not bool(inside[:size].all()):
        return 0
    return size
