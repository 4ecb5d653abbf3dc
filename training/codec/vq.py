"""Keeping every codebook level alive: input centring, data initialisation, dead-code restart.

Trained from random initialisation on real music, the SNAC encoder's outputs all point one way
(cosine to their mean ~0.99 at init), so the cosine lookup picks a handful of codes and both VQ
losses are then minimised by sitting on one code per level: measured, the unmodified trainer
reached exactly one code per level by step ~116 while the mel loss still fell. Three standard
remedies, all applied to the factorised (codebook_dim) space the lookup runs in:

- **centring the quantiser input** (`codec_model.quantize(centre="batch")`): the lookup
  compares directions (cosine), and the encoder's output carries a large common offset (Snake's
  sin^2 term only ever adds), so all vectors point one way. Worse, AdamW moves every weight
  by ~lr per step, and against that offset the moves add up coherently: measured on real
  music, one step shifted the projected vectors by 3-5x their spread, so codes placed on the
  data one step were off it the next. Centring on a lagged estimate does not keep up (a
  one-step lag and a 0.9-momentum running mean both still collapsed, measured); training
  therefore subtracts each level's detached *batch* mean from its input before in_proj. For
  validation, checkpoints and export the mean over fixed calibration batches is folded into
  the projection instead (in_proj.bias -= W m, `codec_model.fold_input_means`), so an export
  is a plain snac model with nothing added to the architecture. (Like BatchNorm, training
  sees batch statistics and inference a population mean; the calibration uses 64 segments
  because one batch's mean moved the folded codec's level-A perplexity between 14 and 101.)
- **data init** (from scratch only): before the first update every code is set to an encoder
  output of the first batch (plus 1 % noise), so all codes start inside the cone the data
  occupies instead of on random directions that nothing maps to;
- **dead-code restart** (EnCodec's `threshold_ema_dead_code`, SoundStream's codebook
  re-initialisation): a code that no vector of its level picked during the last `window`
  steps is overwritten with a random encoder output of the current batch (plus noise), and its
  AdamW moments are zeroed so stale momentum does not drag it away.

Early in training one optimiser step moves the encoder's outputs further than their spread, so
the restart has to act within steps, not thousands of vectors: with a window of 10 steps a
batch of 8 x 1.152 s feeds level A only 960 vectors per window, so most of A's 4096 codes are
re-placed on current data at every check. Only unused codes move; a used code is never touched.
(Measured on real music: a 10-step restart took the codes in use on held-out audio from 1 per
level to hundreds within 200 steps, see docs/codec-training.md.)

Everything is a pure function of (seed, step) and the state returned by `state_dict`, so an
exact resume stays exact.
"""

from __future__ import annotations

import torch
from torch import nn


class CodebookKeeper:
    def __init__(self, quantizers: nn.ModuleList, window: int = 10, noise: float = 0.01,
                 seed: int = 0):
        self.quantizers = quantizers
        self.window, self.noise, self.seed = int(window), float(noise), int(seed)
        n_levels = len(quantizers)
        self.codebook_size = int(quantizers[0].codebook_size)
        device = quantizers[0].codebook.weight.device
        # Steps observed so far, and per level the step at which each code was last picked. Kept
        # on the codebooks' device, so observing a step needs no host sync.
        self.seen = torch.zeros(n_levels, dtype=torch.int64, device=device)
        self.last_used = torch.zeros(n_levels, self.codebook_size, dtype=torch.int64,
                                     device=device)

    # ------------------------------------------------------------ bookkeeping
    def observe(self, codes: list[torch.Tensor]) -> None:
        """Record one step's codes: per level (B, n) tensors."""
        for level, c in enumerate(codes):
            self.seen[level] += 1
            self.last_used[level].index_fill_(0, c.detach().reshape(-1).to(self.seen.device),
                                              self.seen[level])

    def dead_mask(self, level: int) -> torch.Tensor:
        return (self.seen[level] - self.last_used[level]) >= self.window

    # ------------------------------------------------------------ interventions
    def _generator(self, step: int) -> torch.Generator:
        # Own generator: drawing from the global RNG would shift SNAC's decoder noise stream.
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def _samples(self, latent: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        """n random vectors of a level's (B, d, T) encoder outputs, with relative noise."""
        pool = latent.detach().float().transpose(1, 2).reshape(-1, latent.shape[1]).cpu()
        picked = pool[torch.randint(len(pool), (n,), generator=g)]
        scale = picked.norm(dim=1, keepdim=True) / picked.shape[1] ** 0.5
        return picked + self.noise * scale * torch.randn(picked.shape, generator=g)

    @torch.no_grad()
    def init_from_data(self, latents: list[torch.Tensor], step: int = 0, levels=None) -> None:
        """Every code of every level (of `levels`) := an encoder output of this batch + noise."""
        g = self._generator(step)
        for level, (vq, latent) in enumerate(zip(self.quantizers, latents, strict=True)):
            if levels is not None and level not in levels:
                continue
            weight = vq.codebook.weight
            weight.copy_(self._samples(latent, weight.shape[0], g).to(weight))

    @torch.no_grad()
    def revive(self, latents: list[torch.Tensor], step: int,
               optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """Restart the dead codes of every level from this batch; returns how many per level."""
        g = self._generator(step)
        revived = []
        for level, (vq, latent) in enumerate(zip(self.quantizers, latents, strict=True)):
            dead = self.dead_mask(level)
            n = int(dead.sum())
            revived.append(n)
            if n == 0:
                continue
            weight = vq.codebook.weight
            idx = dead.nonzero().squeeze(1)
            weight[idx] = self._samples(latent, n, g).to(weight)
            self.last_used[level, dead] = self.seen[level]     # a grace period to be picked
            state = optimizer.state.get(weight, {}) if optimizer is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][idx] = 0
        return revived

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"seen": self.seen.cpu().clone(), "last_used": self.last_used.cpu().clone()}

    def load_state_dict(self, sd: dict) -> None:
        if sd["last_used"].shape != self.last_used.shape:
            raise ValueError(f"codebook keeper state has shape {tuple(sd['last_used'].shape)}, "
                             f"this codec needs {tuple(self.last_used.shape)}")
        self.seen.copy_(sd["seen"].to(self.seen.device))
        self.last_used.copy_(sd["last_used"].to(self.last_used.device))
