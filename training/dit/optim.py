"""Optimizer pieces of the DiT: AdamW param groups, warmup + cosine LR, weight EMA.

Everything here is plain state that round-trips through a checkpoint exactly (the resume test
compares parameters bit for bit).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.dit.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; decay on matrices only (norm gains, biases and 1-d tables keep their scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Embedding tables are 2-d but decaying them shrinks rarely seen tokens toward zero.
        is_embedding = "emb" in name.split(".")[-2] if "." in name else False
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused AdamW: one kernel per step on CUDA. On CPU the foreach path is the tested default.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused,
        foreach=None if fused else True,
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    start: int = 0):
    """The schedule from step `start` on. start > 0 (a warm start mid-run with a fresh optimiser)
    scales it by a linear ramp over `cfg.rewarm_steps` steps."""
    # LambdaLR multiplies the group's initial lr; the lambda is a pure function of the step, so
    # the scheduler's state is just its step counter (counted from `start`).
    def factor(s: int) -> float:
        ramp = min(1.0, (s + 1) / cfg.rewarm_steps) if start and cfg.rewarm_steps else 1.0
        return ramp * lr_at(start + s, cfg, total_steps) / cfg.lr

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers (fp32)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        # Ramp (1+n)/(10+n): early on the average forgets the random init quickly.
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        shadows, values = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                shadows.append(self.shadow[k])
                values.append(v.detach().float())
            else:
                self.shadow[k].copy_(v)
        if shadows:  # one fused launch per step instead of one per tensor
            torch._foreach_lerp_(shadows, values, 1.0 - d)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict, num_updates: int) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)
        self.num_updates = num_updates
