"""Inference speed levers for serving on a CPU (issue 38), each named and each switchable.

    report = apply_fast_path(engine, FastPath(int8=True))   # what serves, for /info and the log

| lever | what it does | the music |
|---|---|---|
| maskless | SDPA without a mask where every query sees every key (`model/attention.py`): every pass of a single unguided request | the same attention (tested against the masked path and a full recompute) |
| int8 | the DiT trunk's Linear layers (qkv, proj, MLP) as dynamic int8: weights per output channel, activations per call (fbgemm / oneDNN) | changed: masked CE within noise, a rougher seam (docs/benchmarks.md): opt-in |
| inplace_snake | the codec's Snake activations (x + sin(a x)^2 / a, where SNAC's encoder and decoder spend much of their time at full rate) computed in one buffer instead of five fresh ones (the codec's share of /continue fell 40 % on 2 AVX2 cores, docs/benchmarks.md) | the same operations in the same order: bit for bit the same (tested) |
| threads | torch's intra-op threads (0 = torch's default, one per core) | the same |

The heads, adaLN and the t embedding stay fp32: the heads make the logits the sampler ranks by,
and the others run per segment (a handful of rows), where int8 saves nothing. int8 that cannot
apply (a GPU, a non-fp32 DiT) is reported as off with the reason, never half-applied.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model import attention

log = logging.getLogger(__name__)

INT8_LAYERS = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")  # per block: the per-token matmuls


@dataclass(frozen=True)
class FastPath:
    maskless: bool = True       # exact: on by default
    inplace_snake: bool = True  # exact: on by default
    int8: bool = False          # changes the numbers: opt-in
    threads: int = 0            # 0 = torch's default

    def __post_init__(self):
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0, got {self.threads!r}")

    @classmethod
    def from_names(cls, names: str, threads: int = 0) -> FastPath:
        """"maskless,int8" (the levers on; "none" = all off), as the bench scripts take them."""
        on = {n.strip() for n in names.split(",") if n.strip()} - {"none"}
        unknown = on - {"maskless", "inplace_snake", "int8"}
        if unknown:
            raise ValueError(f"unknown lever(s) {sorted(unknown)}: choose from maskless, "
                             "inplace_snake, int8, or none")
        return cls(maskless="maskless" in on, inplace_snake="inplace_snake" in on,
                   int8="int8" in on, threads=threads)


def quantize_int8(dit: nn.Module) -> nn.Module:
    """A copy of `dit` whose trunk Linear layers are dynamic int8 (per-channel weights).
    torch.ao's eager quantisation is deprecated in favour of torchao but still ships (torch
    2.13); where it is gone, `_int8_unsupported` reports int8 off instead."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = {f"blocks.{i}.{layer}": per_channel_dynamic_qconfig
             for i in range(len(dit.blocks)) for layer in INT8_LAYERS}
    with warnings.catch_warnings():  # its deprecation notices, once per layer
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
        return quantize_dynamic(copy.deepcopy(dit), names, dtype=torch.qint8).eval()


def apply_fast_path(engine, fast: FastPath) -> dict:
    """Switch `engine`'s levers to `fast` and return `describe(engine)`. Reversible: the exact
    DiT is kept (`engine.dit_exact`), snac's own Snake comes back when switched off."""
    attention.set_maskless(fast.maskless)
    exact = engine.__dict__.setdefault("dit_exact", engine.dit)
    why = _int8_unsupported(engine) if fast.int8 else None
    if why:
        log.warning("int8 requested but not applied: %s", why)
    if fast.int8 and not why:
        if engine.dit is exact:
            engine.dit = quantize_int8(exact)
    else:
        engine.dit = exact
    engine.int8_refused = why
    for m in _snakes(engine.codec):
        # An instance forward: the state_dict keeps its keys (and the codec its fingerprints).
        if fast.inplace_snake:
            m.forward = functools.partial(inplace_snake, alpha=m.alpha)
        else:
            m.__dict__.pop("forward", None)
    if fast.threads:
        torch.set_num_threads(fast.threads)
    return describe(engine)


def describe(engine) -> dict:
    """{lever: {"on", "exact", "detail"}}: what serves now (read from the engine's state)."""
    int8 = not isinstance(engine.dit.blocks[0].attn.qkv, nn.Linear)
    refused = getattr(engine, "int8_refused", None)
    snakes = _snakes(engine.codec)
    inplace = bool(snakes) and all("forward" in m.__dict__ for m in snakes)
    on = attention.get_maskless()
    return dict(
        maskless=dict(on=on, exact=True, detail="SDPA without a mask where every query sees "
                      "every key" if on else "off: the dense mask on every pass"),
        int8=dict(on=int8, exact=False,
                  detail=f"DiT trunk Linear layers dynamic int8 "
                         f"({torch.backends.quantized.engine} engine)" if int8
                  else f"off: {refused}" if refused else "off: fp32 Linear layers"),
        inplace_snake=dict(on=inplace, exact=True,
                           detail="the codec's Snake activations in one buffer each" if inplace
                           else "off: snac's own Snake" if snakes else "off: no Snake in the codec"),
        threads=dict(on=True, exact=True, detail=f"{torch.get_num_threads()} intra-op threads"),
    )


def inplace_snake(x: Tensor, alpha: Tensor) -> Tensor:
    """snac's Snake, x + (alpha + 1e-9)^-1 * sin(alpha x)^2 on (B, C, T), with the same
    operations in the same order (IEEE products and sums commute) but one output buffer: snac's
    allocates five at the codec's full rate. Inference only (it writes its own buffer in place)."""
    y = alpha * x
    return y.sin_().square_().mul_((alpha + 1e-9).reciprocal()).add_(x)


def _snakes(codec) -> list[nn.Module]:
    from snac.layers import Snake1d

    return [m for m in codec.snac.modules() if isinstance(m, Snake1d)]


def _int8_unsupported(engine) -> str | None:
    if engine.device.type != "cpu":
        return f"int8 Linear layers are a CPU lever (the DiT is on {engine.device.type})"
    if engine.dtype != torch.float32:
        return f"int8 quantises an fp32 DiT (this one is {engine.dtype})"
    if not {"x86", "fbgemm", "onednn"} & set(torch.backends.quantized.supported_engines):
        return "this torch build has no x86 quantized engine"
    if importlib.util.find_spec("torch.ao.quantization") is None:
        return "this torch has no torch.ao.quantization (dynamic int8 moved to torchao)"
    return None
