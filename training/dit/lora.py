"""Low-rank adapters (LoRA) for fine-tuning a DiT: `[lora] rank = 8` in a training config.

Each targeted `nn.Linear` W becomes W x + (alpha / rank) B A x with A (rank, in) and B (out,
rank) the only trained weights; B starts at zero, so training starts from the base model
exactly. Everything else is frozen. The checkpoints hold base + adapters; `merge_state` folds
the adapters into plain linears (W + (alpha / rank) B A), so evaluation and the exported model
use an ordinary DiT that the engine serves like any other; `adapter_state` is what the
adapters alone weigh.

Targets are module-name suffixes inside the transformer blocks (`blocks.N.`): by default the
attention projections, the MLP and the per-segment modulation (adaLN, whose gates decide how
much each block contributes). A target that names a top-level module adapts every linear in
it: `heads` adds the per-level output heads (`heads.N`), the only level-specific linears. The
token embeddings (not linears) always stay as the base model has them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "adaLN")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_a.t()) @ self.lora_b.t())


def _targets(model: nn.Module, targets) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear):
                continue
            in_blocks = full.startswith("blocks.")
            if (in_blocks and any(full.endswith(t) for t in targets)
                    or not in_blocks and full.split(".")[0] in targets):
                found.append((module, child_name, child))
    return found


def add_lora(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS) -> int:
    """Freeze `model` and wrap its targeted linears in adapters, in place; returns the number
    of trainable (adapter) parameters. ValueError when no module matches."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    found = _targets(model, targets)
    if not found:
        raise ValueError(f"no nn.Linear matches the lora targets {list(targets)}")
    model.requires_grad_(False)
    for parent, child_name, child in found:
        setattr(parent, child_name, LoRALinear(child, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_state(state: dict, scale: float) -> dict:
    """A state_dict of a model with adapters -> the base architecture's state_dict, each
    adapter folded in (W + scale B A), so a plain DiT loads it and computes what the adapted
    model computes (up to rounding). `scale` is alpha / rank."""
    out = {}
    for key, value in state.items():
        if key.endswith(".lora_a") or key.endswith(".lora_b"):
            continue
        if ".base." in key:
            prefix, _, leaf = key.rpartition(".base.")
            if leaf == "weight":
                a, b = state[f"{prefix}.lora_a"], state[f"{prefix}.lora_b"]
                value = value + scale * (b.to(value.dtype) @ a.to(value.dtype))
            key = f"{prefix}.{leaf}"
        out[key] = value
    return out


def adapter_state(state: dict) -> dict:
    """The adapter tensors of a state_dict (what an adapter alone would be written as)."""
    return {k: v for k, v in state.items() if ".lora_" in k}
