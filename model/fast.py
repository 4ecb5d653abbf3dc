"""Inference speed levers for serving on a CPU (issue 38), each named and each switchable.

    report = apply_fast_path(engine, FastPath(int8=True))   # what serves, for /info and the log

| lever | what it does | the music |
|---|---|---|
| maskless | SDPA without a mask where every query sees every key (`model/attention.py`): every pass of a single unguided request | the same attention (tested against the masked path and a full recompute) |
| int8 | the DiT trunk's Linear layers (qkv, proj, MLP) as dynamic int8: weights per output channel, activations per call (fbgemm / oneDNN) | changed: opt-in; the measured check is docs/benchmarks.md |
| compile_codec | the codec encoder's forward compiled by inductor (a compile per input length, paid at warm-up; needs a C++ compiler) | the same tokens where measured, not guaranteed bit for bit: opt-in |
| threads | torch's intra-op threads (0 = torch's default, one per core) | the same |

The heads, adaLN and the t embedding stay fp32: the heads make the logits the sampler ranks by,
and the others run per segment (a handful of rows), where int8 saves nothing. int8 that cannot
apply (a GPU, a non-fp32 DiT) is reported as off with the reason, never half-applied.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from model import attention

log = logging.getLogger(__name__)

LEVERS = ("maskless", "int8", "compile_codec", "threads")
INT8_LAYERS = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")  # per block: the per-token matmuls


@dataclass(frozen=True)
class FastPath:
    maskless: bool = True        # exact: on by default
    int8: bool = False           # changes the numbers: opt-in
    compile_codec: bool = False  # compile time at warm-up, same tokens where measured: opt-in
    threads: int = 0             # 0 = torch's default

    def __post_init__(self):
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0, got {self.threads!r}")

    @classmethod
    def from_names(cls, names: str, threads: int = 0) -> FastPath:
        """"maskless,int8" (the levers on; "none" = all off), as the bench scripts take them."""
        on = {n.strip() for n in names.split(",") if n.strip()} - {"none"}
        unknown = on - {"maskless", "int8", "compile_codec"}
        if unknown:
            raise ValueError(f"unknown lever(s) {sorted(unknown)}: choose from maskless, int8, "
                             "compile_codec, or none")
        return cls(maskless="maskless" in on, int8="int8" in on,
                   compile_codec="compile_codec" in on, threads=threads)


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
    DiT is kept (`engine.dit_exact`), a compiled forward is dropped when switched off."""
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
    encoder = engine.codec.snac.encoder
    if fast.compile_codec and "forward" not in encoder.__dict__:
        # Compiling the bound forward in place keeps the state_dict's keys (and so the codec's
        # fingerprints), which wrapping the module in torch.compile's OptimizedModule would not.
        encoder.forward = torch.compile(encoder.forward, dynamic=False)
    elif not fast.compile_codec:
        encoder.__dict__.pop("forward", None)
    if fast.threads:
        torch.set_num_threads(fast.threads)
    return describe(engine)


def describe(engine) -> dict:
    """{lever: {"on", "exact", "detail"}}: what serves now (read from the engine's state)."""
    int8 = not isinstance(engine.dit.blocks[0].attn.qkv, nn.Linear)
    refused = getattr(engine, "int8_refused", None)
    compiled = "forward" in engine.codec.snac.encoder.__dict__
    on = attention.get_maskless()
    return dict(
        maskless=dict(on=on, exact=True, detail="SDPA without a mask where every query sees "
                      "every key" if on else "off: the dense mask on every pass"),
        int8=dict(on=int8, exact=False,
                  detail=f"DiT trunk Linear layers dynamic int8 "
                         f"({torch.backends.quantized.engine} engine)" if int8
                  else f"off: {refused}" if refused else "off: fp32 Linear layers"),
        compile_codec=dict(on=compiled, exact=False,
                           detail="codec encoder compiled by inductor" if compiled
                           else "off: eager codec"),
        threads=dict(on=True, exact=True, detail=f"{torch.get_num_threads()} intra-op threads"),
    )


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
