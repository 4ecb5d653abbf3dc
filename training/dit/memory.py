"""Will a training step fit on the device? Counted before the run starts, not hours into it.

The curriculum's last stages draw the longest layouts (two context chunks plus, for an editing
model, the chunk after the target: 4,288 tokens with the SNAC geometry), so a batch that trains
for hours can run out of memory only when they begin. This module counts what a step holds at
the worst layout of the curriculum:

  static       fp32 weights, grads, AdamW's two moments and the EMA copy: 20 bytes a parameter
  activations  what autograd saves for the backward, counted on the meta device (no memory, no
               compute) by running the DiT's forward and the loss's logits under a
               saved-tensors hook, with attention stood in by what a flash-style kernel saves
               (q, k, v, out, log-sum-exp; never the (N, N) probabilities)

in fp32, an upper bound for bf16 autocast. Per block it is counted as the difference of a 2- and
a 1-block model; with per-block activation checkpointing a block keeps only its input, and one
block's activations live again while it is recomputed. `plan_memory` decides checkpointing
("auto": only when the batch does not fit without) and raises `ConfigError` naming the batch
that fits when none does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import model.dit as dit_module
from model.dit import DiT
from model.layout import NOISED, collate
from training.run.config import ConfigError

STATIC_BYTES_PER_PARAM = 20  # fp32 weight + grad + two Adam moments + EMA
HEADROOM = 0.85  # of the device's memory: allocator fragmentation, workspaces, the CUDA context


class _FlashLike(torch.autograd.Function):
    """Stands in for the attention kernel while counting: saves what it saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _counting_attention():
    real = dit_module.attention
    dit_module.attention = lambda q, k, v, *a, **kw: _FlashLike.apply(q, k, v)
    try:
        yield
    finally:
        dit_module.attention = real


def _saved_bytes(model_cfg, n_layers: int, n_ctx: int, n_after: int) -> int:
    """Bytes autograd saves for one sample's training forward (meta device, fp32)."""
    cfg = dataclasses.replace(model_cfg, n_layers=n_layers)
    seen: dict[tuple, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            # Views of one tensor share its storage: count each (base, size) once.
            base = t if t._base is None else t._base
            seen[(id(base), base.numel())] = base.numel() * base.element_size()
        return t

    with torch.device("meta"):
        net = DiT(cfg)
    batch = collate((n_ctx,), cfg.frames_per_chunk, cfg.strides,
                    (n_after,) if n_after else None).to("meta")
    tokens = torch.zeros(batch.shape, dtype=torch.long, device="meta")
    seg_t = torch.zeros(batch.seg_role.shape, device="meta")
    with _counting_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = net(tokens, batch, seg_t)
        for lvl, f in enumerate(cfg.frames_per_chunk):  # the loss: fp32 logits of noised tokens
            del f
            idx = batch.target_index(NOISED, lvl)
            logits = net.logits(h.gather(1, idx[:, :, None].expand(-1, -1, h.shape[-1])), lvl)
            F.cross_entropy(logits.float().transpose(1, 2), torch.zeros(
                idx.shape, dtype=torch.long, device="meta"))
    return sum(seen.values())


@dataclass
class MemoryEstimate:
    static: int  # bytes: weights, grads, optimiser, EMA
    outside: int  # bytes per sample saved outside the blocks (embeddings, rope, heads, loss)
    per_block: int  # bytes per sample saved inside one block
    block_input: int  # bytes per sample of one block's input (what a checkpointed block keeps)
    n_layers: int
    n_tokens: int  # of the layout counted

    def per_sample(self, checkpoint: bool) -> int:
        if checkpoint:
            return self.outside + self.n_layers * self.block_input + self.per_block
        return self.outside + self.n_layers * self.per_block

    def total(self, batch: int, checkpoint: bool) -> int:
        return self.static + batch * self.per_sample(checkpoint)

    def max_batch(self, capacity: int, checkpoint: bool) -> int:
        return max(0, int((capacity * HEADROOM - self.static) // self.per_sample(checkpoint)))


def estimate(model_cfg, n_params: int, n_ctx: int, n_after: int) -> MemoryEstimate:
    """The count of the module docstring for one layout."""
    one = _saved_bytes(model_cfg, 1, n_ctx, n_after)
    two = _saved_bytes(model_cfg, 2, n_ctx, n_after)
    n_tokens = collate((n_ctx,), model_cfg.frames_per_chunk, model_cfg.strides,
                       (n_after,) if n_after else None).shape[1]
    return MemoryEstimate(static=STATIC_BYTES_PER_PARAM * n_params, outside=one - (two - one),
                          per_block=two - one, block_input=n_tokens * model_cfg.d_model * 4,
                          n_layers=model_cfg.n_layers, n_tokens=n_tokens)


def worst_layout(stages, max_after_chunks: int) -> tuple[int, int]:
    """(n_ctx, n_after) of the longest layout any stage draws."""
    n_ctx = max(max(i for i, w in enumerate(s.n_ctx) if w > 0) for s in stages)
    n_after = int(max_after_chunks > 0 and any(s.n_after > 0 for s in stages))
    return n_ctx, n_after


def plan_memory(est: MemoryEstimate, batch: int, capacity: int, mode: str,
                where: str) -> bool:
    """Whether to checkpoint blocks (mode auto / on / off) so that `batch` rows fit in
    `capacity` bytes; ConfigError naming the batch that fits when they cannot."""
    gb = 1e9
    fits = {ck: est.total(batch, ck) <= capacity * HEADROOM for ck in (False, True)}
    if mode == "off" and fits[False] or mode == "on" and fits[True]:
        return mode == "on"
    if mode == "auto" and (fits[False] or fits[True]):
        return not fits[False]
    ck = mode == "on" or mode == "auto"
    raise ConfigError(
        f"data.batch_size {batch} does not fit {where} ({capacity / gb:.0f} GB): at the "
        f"curriculum's longest layout ({est.n_tokens} tokens) a step needs ~"
        f"{est.total(batch, ck) / gb:.0f} GB ({est.static / gb:.1f} GB weights and optimiser, "
        f"{batch * est.per_sample(ck) / gb:.0f} GB activations"
        f"{', blocks checkpointed' if ck else ''}). Batch {est.max_batch(capacity, ck)} fits"
        + ("" if ck else f"; with activation_checkpointing = \"on\" batch "
           f"{est.max_batch(capacity, True)} does")
        + "; use optim.grad_accum for a larger effective batch.")


def checkpoint_blocks(cfg, model_cfg, n_params: int, device: torch.device, say=print) -> bool:
    """The trainer's start-up check: whether to checkpoint blocks (cfg.activation_checkpointing)
    and, on CUDA, ConfigError when the batch cannot fit at the curriculum's longest layout."""
    mode = cfg.activation_checkpointing
    if device.type != "cuda":
        return mode == "on"
    n_ctx, n_after = worst_layout(cfg.curriculum.stages, model_cfg.max_after_chunks)
    est = estimate(model_cfg, n_params, n_ctx, n_after)
    props = torch.cuda.get_device_properties(device)
    batch = cfg.data.batch_size
    on = plan_memory(est, batch, props.total_memory, mode, f"on {props.name}")
    say(f"memory: ~{est.total(batch, on) / 1e9:.0f} GB of {props.total_memory / 1e9:.0f} GB at "
        f"the longest layout ({est.n_tokens} tokens); activation checkpointing "
        f"{'on' if on else 'off'}")
    return on
