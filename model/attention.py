"""Segment-masked attention: the one function every attention call in the model goes through.

Position i (query) sees position j (key) iff `allowed[seg_q[i], seg_k[j]]`; segment id -1 is
padding, which sees nothing and is seen by nothing. Rows that see nothing output 0 (not NaN).

Backends:
  "sdpa"   — reference: PyTorch scaled_dot_product_attention with a dense (B, 1, Nq, Nk) bool mask
             (`model.attention_rule.attention_ref`).
  "triton" — `model.kernels.block_attention.block_attention`, a block-sparse kernel with the same
             signature (written separately; imported lazily so CPU users never need it).
  "auto"   — Triton on CUDA tensors when that module imports, SDPA otherwise.
Switch with `set_backend(name)` or `with attention_backend(name): ...`.
"""

from __future__ import annotations

import contextlib

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
    mask = _mask_cache.get((seg_q, seg_k, allowed), (q.dtype,),
                           lambda: sdpa_mask(seg_q, seg_k, allowed, q.dtype))
    return attention_ref(q, k, v, seg_q, seg_k, allowed, scale=scale, mask=mask)
