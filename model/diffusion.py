"""Absorbing-state (masked) discrete diffusion per level (DESIGN §3). Drives any denoiser.

Forward process: at time t in [0, 1] each target token of level l is independently replaced by
that level's [MASK] id with probability gamma_l(t) (gamma(0) = 0 clean, gamma(1) = 1 all masked).
Every sample draws its own t per level (diffusion-forcing style), so one training pass sees level
A nearly clean while D is nearly masked, and so on: the staged sampler's situations all occur.

The model contract is small: `model.config` (n_levels, codebook_size, frames_per_chunk, strides),
`model(tokens, layout, seg_t) -> (B, N, d)` and `model.logits(h, level)`.

    diffusion = MaskedDiffusion(DiffusionConfig())
    terms = diffusion.loss(model, windows, n_ctx=None)   # {"loss", "ce_A", .., "acc_A", ..}
    terms["loss"].backward()
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from model.layout import NOISED, collate, fill_tokens

LEVEL_NAMES = "ABCDEFGH"

# gamma(t): fraction masked at time t; and gamma'(t) for the ELBO weighting.
SCHEDULES = {
    # MaskGIT's cosine: few tokens are committed in the first sampling steps (when the
    # prediction is least informed), many at the end.
    "cosine": (
        lambda t: torch.sin(0.5 * math.pi * t),
        lambda t: 0.5 * math.pi * torch.cos(0.5 * math.pi * t),
    ),
    "linear": (lambda t: t, lambda t: torch.ones_like(t)),
    "square": (lambda t: t * t, lambda t: 2 * t),
    "sqrt": (lambda t: t.sqrt(), lambda t: 0.5 / t.clamp(min=1e-6).sqrt()),
}


# t(gamma): the time at which a schedule masks a given fraction (the inverses of SCHEDULES).
INVERSES = {
    "cosine": lambda f: torch.asin(f.clamp(0, 1)) * (2 / math.pi),
    "linear": lambda f: f.clamp(0, 1),
    "square": lambda f: f.clamp(0, 1).sqrt(),
    "sqrt": lambda f: f.clamp(0, 1) ** 2,
}


def mask_time(schedule: str, fraction: Tensor) -> Tensor:
    """The t at which `schedule` masks `fraction` of a level, elementwise (gamma^-1)."""
    if schedule not in INVERSES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {sorted(INVERSES)}")
    return INVERSES[schedule](fraction)


def mask_fraction(schedule: str, t: Tensor) -> Tensor:
    """gamma(t) of a named schedule, elementwise."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[schedule][0](t)


@dataclass
class DiffusionConfig:
    # One schedule per level; cosine everywhere by default (MaskGIT's finding for token grids).
    schedules: tuple[str, ...] = ("cosine", "cosine", "cosine", "cosine")
    # Per-level weights of the per-level CE in the total; the total is their weighted mean so
    # its scale stays that of one token's CE whatever the weights.
    loss_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    # Probability that a sample's whole context is removed (n_ctx -> 0): trains the
    # unconditional branch used by classifier-free guidance on the context.
    context_dropout: float = 0.1
    # "mean": plain CE averaged over masked tokens (MaskGIT/MUSE). The default because the
    # sampler decodes by confidence, not ancestrally, so the ELBO's weighting buys nothing, while
    # its gamma'/gamma weight explodes at small t (a handful of masked tokens, huge weight) and
    # makes the gradient noisy. "elbo": the MDLM bound, per token weight gamma'(t)/gamma(t).
    weighting: str = "mean"
    # Stratify each level's t over the batch (low-discrepancy, as in MDLM): less loss variance.
    stratified_t: bool = True

    def __post_init__(self):
        self.schedules = tuple(str(s) for s in self.schedules)
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        for s in self.schedules:
            if s not in SCHEDULES:
                raise ValueError(f"unknown schedule {s!r}; choose from {sorted(SCHEDULES)}")
        if len(self.schedules) != len(self.loss_weights):
            raise ValueError("schedules and loss_weights need one entry per level")
        if any(w < 0 for w in self.loss_weights) or sum(self.loss_weights) <= 0:
            raise ValueError("loss_weights must be >= 0 with a positive sum")
        if not 0.0 <= self.context_dropout <= 1.0:
            raise ValueError("context_dropout must lie in [0, 1]")
        if self.weighting not in ("mean", "elbo"):
            raise ValueError("weighting must be 'mean' or 'elbo'")

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown DiffusionConfig fields {sorted(set(d) - known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _rand(shape, generator, device) -> Tensor:
    """Uniform [0, 1) drawn from `generator` (on its device) or the global RNG of `device`."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def corrupt(batch, tokens: Tensor, masks: list[Tensor], t: Tensor, mask_id: int):
    """Mask the noised target segments of `tokens` (B, N) in place.

    masks[l]: (B, F_l) bool, True = replaced by `mask_id`; t: (B, L) diffusion time per level,
    written to the noised segments' conditioning. Returns (seg_t (B, S) with 0 for every clean
    segment, idx[l] (B, F_l) sequence positions of noised level l, clean[l] (B, F_l) its tokens).
    """
    seg_t = torch.zeros(batch.seg_role.shape, device=tokens.device)  # (B, S)
    idx, clean = [], []
    for lvl, m in enumerate(masks):
        i = batch.target_index(NOISED, lvl)  # (B, F_l)
        x0 = tokens.gather(1, i)
        tokens.scatter_(1, i, torch.where(m, mask_id, x0))
        seg_t.scatter_(1, batch.segment_index(NOISED, lvl)[:, None], t[:, lvl : lvl + 1].to(seg_t))
        idx.append(i), clean.append(x0)
    return seg_t, idx, clean


def target_logits(model, tokens: Tensor, batch, seg_t: Tensor, idx: list[Tensor]) -> list[Tensor]:
    """One forward; fp32 logits (B, F_l, V) of each noised target level at positions idx[l]."""
    h = model(tokens, batch, seg_t)  # (B, N, d)
    return [
        model.logits(h.gather(1, i[:, :, None].expand(-1, -1, h.shape[-1])), lvl).float()
        for lvl, i in enumerate(idx)
    ]


class MaskedDiffusion:
    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config or DiffusionConfig()

    @staticmethod
    def _rows(value, B: int, hi: int, name: str) -> list[int]:
        if value is None:
            rows = [hi] * B
        elif isinstance(value, int):
            rows = [value] * B
        else:
            rows = [int(n) for n in (value.tolist() if isinstance(value, Tensor) else value)]
        if len(rows) != B or any(not 0 <= n <= hi for n in rows):
            raise ValueError(f"{name} must give {B} values in [0, {hi}], got {value!r}")
        return rows

    def _n_ctx(self, n_ctx, B: int, W: int, generator, n_after=None, A: int = 0):
        """Per-row (n_ctx, n_after) after context dropout, which removes a row's whole context
        (before and after: the unconditional branch has none)."""
        rows = self._rows(n_ctx, B, W, "n_ctx")
        after = self._rows(n_after, B, A, "n_after") if A else [0] * B
        p = self.config.context_dropout
        if p > 0:
            drop = (
                _rand((B,), generator, "cpu") < p
            ).tolist()  # host ints: layouts are built on the host
            rows = [0 if d else n for n, d in zip(rows, drop, strict=True)]
            after = [0 if d else a for a, d in zip(after, drop, strict=True)]
        return rows, after

    def loss(
        self, model, windows: list[Tensor], n_ctx=None, generator: torch.Generator | None = None,
        n_after=None,
    ) -> dict[str, Tensor]:
        """Named loss terms for a batch of clean token windows.

        windows[l]: (B, (W+1) * F_l) int64 — W context chunks followed by the target chunk, at
          every level l; with `n_after` given, one more chunk after the target (the
          after-context). n_ctx: None (all W chunks), an int, or one int per row (<= W): rows keep
          their most recent n_ctx chunks; rows may differ (padded batching). n_after: None (no
          after chunk in the windows), or an int / one 0-or-1 per row: whether the row sees the
          after chunk. Context dropout then removes a random fraction of rows' whole context.
        generator: optional torch.Generator for reproducible t / masks / dropout.
        Returns {"loss": weighted mean of per-level CE, "ce_A".., "acc_A"..} (acc detached).
        """
        cfg, mcfg = self.config, model.config
        L, V, fpc = mcfg.n_levels, mcfg.codebook_size, mcfg.frames_per_chunk
        if len(cfg.schedules) != L:
            raise ValueError(f"diffusion config has {len(cfg.schedules)} levels, model {L}")
        if len(windows) != L:
            raise ValueError(f"expected {L} levels of tokens, got {len(windows)}")
        B = windows[0].shape[0]
        if windows[0].ndim != 2 or windows[0].shape[1] % fpc[0]:
            raise ValueError(
                f"level 0 tokens must be (B, k * {fpc[0]}), got {tuple(windows[0].shape)}"
            )
        A = 0 if n_after is None else 1
        W = windows[0].shape[1] // fpc[0] - 1 - A
        if A > mcfg.max_after_chunks:
            raise ValueError(f"windows hold an after-context chunk; the model config allows "
                             f"{mcfg.max_after_chunks} (DiTConfig.max_after_chunks)")
        if W < 0:
            raise ValueError("windows must hold the target chunk (and the after chunk)")
        if W > mcfg.max_ctx_chunks:
            raise ValueError(
                f"{W} context chunks given; the model takes at most {mcfg.max_ctx_chunks}"
            )
        for w in windows:
            if w.dtype != torch.long:
                raise ValueError(f"token windows must be int64, got {w.dtype}")
            if not w.is_cuda and w.numel() and (w.min() < 0 or w.max() >= V):
                raise ValueError(f"token ids must lie in [0, {V})")
        device = windows[0].device

        rows, after = self._n_ctx(n_ctx, B, W, generator, n_after, A)
        batch = collate(rows, fpc, mcfg.strides, after).to(device)
        tokens = fill_tokens(batch, windows, A)  # (B, N), noised segments still clean

        t = _rand((B, L), generator, device)  # independent t per sample and level
        if cfg.stratified_t:  # one t in each of B strata, strata shuffled per level
            gdev = generator.device if generator is not None else "cpu"
            perm = torch.stack(
                [torch.randperm(B, generator=generator, device=gdev) for _ in range(L)], dim=1
            )
            t = (t[:1] + perm.to(device) / B) % 1.0  # (B, L)
        masks = []
        for lvl in range(L):
            u = _rand((B, fpc[lvl]), generator, device)
            m = u < mask_fraction(cfg.schedules[lvl], t[:, lvl])[:, None]
            m |= u == u.min(dim=1, keepdim=True).values  # >= 1 masked token: no empty level
            masks.append(m)
        seg_t, idx, clean = corrupt(batch, tokens, masks, t, mask_id=V)
        logits_per_level = target_logits(model, tokens, batch, seg_t, idx)
        terms, total = {}, 0.0
        for lvl, logits in enumerate(logits_per_level):
            name = LEVEL_NAMES[lvl]
            ce = F.cross_entropy(logits.transpose(1, 2), clean[lvl], reduction="none")  # (B, F_l)
            m = masks[lvl].float()
            if cfg.weighting == "mean":
                ce_l = (ce * m).sum() / m.sum()
            else:
                tl = t[:, lvl].clamp(min=1e-3)
                gamma, dgamma = (f(tl) for f in SCHEDULES[cfg.schedules[lvl]])
                ce_l = ((dgamma / gamma) * (ce * m).sum(1) / ce.shape[1]).mean()
            terms[f"ce_{name}"] = ce_l
            with torch.no_grad():
                hit = (logits.argmax(-1) == clean[lvl]).float()
                terms[f"acc_{name}"] = (hit * m).sum() / m.sum()
            total = total + cfg.loss_weights[lvl] * ce_l
        terms["loss"] = total / sum(cfg.loss_weights)
        return terms
