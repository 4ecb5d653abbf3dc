"""One training step's pieces: the loss module DDP wraps, per-step seeds, token counts.

Host syncs: a CUDA step should queue work and never wait for it. The layouts of a batch are
built on the host (they depend on each row's n_ctx), so the context dropout that decides them is
drawn here on a host generator when the model is on CUDA; drawn on the device generator it would
be copied back, a sync every micro-batch. On CPU the device generator draws it, as before.

Style actions (issue 37, `DiTConfig.style_actions` > 0): each row's style vector is computed
from its target chunk's clean tokens (all levels; the target is never in the context, so the
style carries what the context cannot), zeroed for a `style_dropout` share of rows (drawn on the
step's device generator: no host sync, and a resumed run draws the same), and given to every
DiT call of the loss. The softmax over styles is dense until `style_warmup` steps, top-k after.
A model without style actions draws nothing extra: its runs are unchanged bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from model.diffusion import MaskedDiffusion
from model.dit import DiT


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively, where bf16 autocast pays (~1.9x on Zen 4)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers: absent in some torch builds
        return False


class _Styled:
    """The DiT seen by the diffusion loss, with a fixed style per row."""

    def __init__(self, dit: DiT, style: torch.Tensor):
        self.dit, self.style, self.config = dit, style, dit.config

    def __call__(self, tokens, layout, seg_t):
        return self.dit(tokens, layout, seg_t, style=self.style)

    def logits(self, h, level):
        return self.dit.logits(h, level)


def target_style(dit: DiT, windows, generator, sparse: bool, after: bool):
    """(B, d) style vectors of the windows' target chunks, a `style_dropout` share zeroed, and
    their (B, K) mixing weights over the actions."""
    cfg = dit.config
    fpc = cfg.frames_per_chunk
    W = windows[0].shape[1] // fpc[0] - 1 - int(after)  # context chunks before the target
    target = [w[:, W * f:(W + 1) * f] for w, f in zip(windows, fpc, strict=True)]
    weights = dit.style_weights(target, sparse=sparse)
    style = weights @ dit.style.styles
    B = style.shape[0]
    keep = torch.rand(B, generator=generator, device=generator.device if generator is not None
                      else style.device).to(style.device) >= cfg.style_dropout
    return style * keep[:, None].to(style.dtype), weights


class LossModule(nn.Module):
    """DiT + diffusion process as one module, so DDP sees every parameter use in its forward."""

    def __init__(self, dit: DiT, diffusion: MaskedDiffusion):
        super().__init__()
        self.dit, self.diffusion = dit, diffusion
        self._no_dropout = MaskedDiffusion(dataclasses.replace(diffusion.config,
                                                               context_dropout=0.0))

    def forward(self, windows, n_ctx, generator, n_after=None, host_generator=None,
                step: int = 0):
        """step: the optimizer step, for the style warm-up (dense softmax before it)."""
        diffusion = self.diffusion
        if host_generator is not None and diffusion.config.context_dropout > 0:
            A = 0 if n_after is None else 1
            W = windows[0].shape[1] // self.dit.config.frames_per_chunk[0] - 1 - A
            n_ctx, after = diffusion._n_ctx(n_ctx, len(n_ctx), W, host_generator, n_after, A)
            n_after = after if n_after is not None else None
            diffusion = self._no_dropout
        if self.dit.config.style_actions:
            sparse = step >= self.dit.config.style_warmup
            style, weights = target_style(self.dit, windows, generator, sparse,
                                          n_after is not None)
            terms = diffusion.loss(_Styled(self.dit, style), windows, n_ctx=n_ctx,
                                   generator=generator, n_after=n_after)
            # How many actions the batch's chunks use (exp of the entropy of their mean mix):
            # K = every action used alike, 1 = all collapsed onto one. Logged with the loss.
            m = weights.detach().float().mean(0)
            terms["style_usage"] = torch.exp(-(m * m.clamp(min=1e-12).log()).sum())
            return terms
        return diffusion.loss(self.dit, windows, n_ctx=n_ctx, generator=generator,
                              n_after=n_after)


def sequence_tokens(n_ctx: int, frames_per_chunk, n_after: int = 0) -> int:
    """Tokens in one row's layout: context chunks (before and after) + clean target (all but
    finest) + noised target."""
    per_chunk = sum(frames_per_chunk)
    return (n_ctx + n_after) * per_chunk + (per_chunk - frames_per_chunk[-1]) + per_chunk


def step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])
