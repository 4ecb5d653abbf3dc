"""Segment-masked attention: the one function every attention call in the model goes through.

Position i (query) sees position j (key) iff `allowed[seg_q[i], seg_k[j]]`; segment id -1 is
padding, which sees nothing and is seen by nothing. Rows that see nothing output 0 (not NaN).

Backends:
  "sdpa"   — reference: PyTorch scaled_dot_product_attention with a dense (B, 1, Nq, Nk) mask
             (`model.attention_rule.attention_ref`), built once per forward; where a leading
             block sees exactly itself (the context of a training batch) that block runs without
             a mask and only the rows after it use the dense mask (`context_prefix`).
  "triton" — `model.kernels.block_attention.block_attention`, a block-sparse kernel with the same
             signature (written separately; imported lazily so CPU users never need it). Asked
             for by name it runs or raises; it never falls back.
  "auto"   — per call: the kernel where it serves (`kernel_unsupported` says why not: CPU
             tensors, fp32, a head dim that is not a power of two in [16, 256], Triton missing or
             older than 3.4), SDPA otherwise. Each choice and its reason is logged once; a Triton
             that fails to import is a warning with the error, never silently skipped.
Switch with `set_backend(name)` or `with attention_backend(name): ...`.

Maskless SDPA (issue 38): on a CPU, where the mask lets every query see every key (a single
request's sampling passes against the KV cache: each pass's keys are exactly what it may see),
"sdpa" calls SDPA without a mask, its fastest path, with the same attention (bit for bit on the
demo DiT). Decided once per forward with the mask; `set_maskless(False)` turns it off.

Dtypes: every backend computes in one dtype, `compute_dtype(q, k, v)`: the autocast dtype inside
an autocast region, else v's. Under CUDA autocast rms_norm is an fp32 op, so the model's normed
q/k arrive in fp32 beside a bf16 v; they are cast rather than rejected (the kernel needs one
dtype) and the SDPA mask is built in the same dtype. The output is in the compute dtype.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention_rule import (
    LastInputsCache,
    attention_ref,
    check_inputs,
    dense_mask,
    sdpa_mask,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "triton")
MIN_TRITON = (3, 4)  # the kernel's tensor descriptors (triton.tools.tensor_descriptor)
_backend = "auto"
_triton_fn = None  # cached kernel entry point once imported
_triton_error: Exception | None = None  # why it could not be imported, for "triton" errors
_mask_cache = LastInputsCache()  # the dense mask, built once per forward instead of per layer
_logged: set[tuple[str, str]] = set()  # (backend, reason) choices already logged
_maskless = True  # module docstring: SDPA without a mask where the mask allows everything


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def set_maskless(enabled: bool) -> None:
    """Whether "sdpa" drops a mask that allows every pair (CPU only; module docstring)."""
    global _maskless
    _maskless = bool(enabled)


def get_maskless() -> bool:
    return _maskless


@contextlib.contextmanager
def attention_backend(name: str):
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _load_triton():
    """The kernel's entry point, or None with `_triton_error` saying why (logged once)."""
    global _triton_fn, _triton_error
    if _triton_fn is None and _triton_error is None:
        try:
            import triton

            if _version(triton.__version__) < MIN_TRITON:
                raise ImportError(f"Triton {triton.__version__} is installed; the attention "
                                  f"kernel needs Triton >= {'.'.join(map(str, MIN_TRITON))} "
                                  "(triton.tools.tensor_descriptor)")
            from model.kernels.block_attention import block_attention

            _triton_fn = block_attention
        except Exception as e:  # ImportError, or triton failing to initialise without a GPU
            _triton_error = e
            log.warning("Triton attention kernel unavailable (%r); attention runs on SDPA", e)
    return _triton_fn


def kernel_unsupported(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why "auto" sends these (already dtype-normalised) inputs to SDPA, or None for the kernel.
    Host-side checks of shapes and dtypes only: no sync."""
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        return f"head dim {D} is not a power of two in [16, 256]"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} inputs (the kernel's fp32 mode is a slow correctness check)"
    if not q.is_cuda:
        return f"{q.device.type} tensors"
    if _load_triton() is None:
        return f"Triton unavailable: {_triton_error}"
    return None


def choose_backend(q: Tensor, k: Tensor, v: Tensor) -> tuple[str, str]:
    """(backend, reason) for this call under the selected backend."""
    if _backend != "auto":
        return _backend, "selected"
    why = kernel_unsupported(q, k, v)
    return ("sdpa", why) if why else ("triton", "CUDA, 16-bit, head dim a power of two")


def compute_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """The one dtype attention computes in (module docstring)."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return v.dtype


def attention(q, k, v, seg_q, seg_k, allowed, scale: float | None = None) -> Tensor:
    """Segment-masked attention through the selected backend (see module docstring)."""
    check_inputs(q, k, v, seg_q, seg_k, allowed)
    dtype = compute_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    backend, why = choose_backend(q, k, v)
    if (backend, why) not in _logged:
        _logged.add((backend, why))
        log.info("attention backend %s: %s (%s, head dim %d)", backend, why, dtype,
                 q.shape[-1])
    if backend == "triton":
        fn = _load_triton()
        if fn is None:
            raise RuntimeError(f"triton attention backend unavailable: {_triton_error!r}"
                               ) from _triton_error
        return fn(q, k, v, seg_q, seg_k, allowed, scale=scale)
    mask, split, full = _mask_cache.get((seg_q, seg_k, allowed), (dtype, _maskless),
                                        lambda: _sdpa_plan(seg_q, seg_k, allowed, dtype))
    if full:  # every query sees every key: no mask, no rows to zero
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
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


def _sdpa_plan(seg_q: Tensor, seg_k: Tensor, allowed: Tensor, dtype) -> tuple:
    """(mask, context prefix, full) for "sdpa"; full: every query sees every key, so SDPA runs
    without a mask (checked on CPU only: on CUDA it would cost a host sync per forward)."""
    if (_maskless and seg_q.device.type == "cpu"
            and bool(dense_mask(seg_q, seg_k, allowed).all())):  # padding is never allowed
        return None, 0, True
    return sdpa_mask(seg_q, seg_k, allowed, dtype), context_prefix(seg_q, seg_k, allowed), False


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
