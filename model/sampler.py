"""Staged A -> B -> C -> D generation with an exact context cache (DESIGN §5).

1. The context runs once; its keys/values are cached per layer (`StagedDenoiser`).
2. Level l starts fully masked; each of `steps[l]` iterations predicts the masked tokens
   (queries: this level's noised segment; keys: cache + itself), applies classifier-free
   guidance on the context, ranks the masked positions by confidence (the top log-prob + Gumbel
   noise annealed with the schedule), and samples (temperature, top-p) and commits the most
   confident ones so that the masked fraction follows the level's schedule gamma_l. Then the
   finished level runs once as a clean segment and its keys/values are appended to the cache.
3. The segment ids and `allowed` table are the training layout's, so every cached pass computes
   exactly what a full recompute with the training layout computes (tested).

Batching: requests with different parameters run together. Rows with fewer steps at a level
finish early inside the max-steps loop (their later iterations commit nothing). Guidance adds one
unconditional row per request (no context: the n_ctx = 0 layout) to the same forward.
Reproducibility: each request owns torch.Generators seeded from (seed, chunk, level), and draws
only its own row's noise, so its output does not depend on its batch mates (up to floating-point
differences of batched matmuls, which do not move sampled tokens in practice).
Style (issue 37, models with `style_actions` > 0): `style` gives each row a style vector (a
reference clip's, `DiT.style_of`, or a chosen action's, `DiT.style_action`; zeros = none). With
`style_scale` != 1 a row is guided on it: "cfg" adds one row per request without the style (the
path style dropout trained), "icg" (independent condition guidance) one with a random action
instead, which needs no dropout in training. Which of the two serves by default waits for the
measurement (docs/model.md). Without a style, generation runs exactly as before (tested).
Editing (DESIGN §5.5) uses the same loop: `after` adds a context chunk after the target (the
model must have been trained with one: `DiTConfig.max_after_chunks`), and `given` fixes target
tokens, so only the masked positions are denoised: a time span at every level (inpaint), or
whole coarse levels (a variation keeps A or A and B). With fixed tokens the model is told the
time at which its schedule masks the fraction really still masked, as in training.
Static shapes: every index, step schedule and commit count is prepared on the host before the
step loop, so shapes depend on the requests' parameters only, never on data (the number of
positions sampled per step, k, follows the plan); the loop itself only launches device work
(no `.item()`, no host sync).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from model.diffusion import mask_fraction, mask_time
from model.layout import CLEAN, NOISED, collate, fill_tokens

MAX_STEPS = 1024  # more steps than tokens commit nothing new; this bounds the work per request
# Scale of the Gumbel noise added to the confidences, times the request's temperature and the
# schedule's t (MaskGIT-style annealing: random order early, pure confidence at the end).
CONFIDENCE_NOISE = 1.0
CONFIDENCES = ("top", "sampled")
STYLE_GUIDANCE = ("cfg", "icg")  # classifier-free / independent condition guidance on the style


def _levels(name: str, value, n_levels: int, cast) -> tuple:
    values = value if isinstance(value, (tuple, list)) else (value,) * n_levels
    if len(values) != n_levels:
        raise ValueError(f"{name} needs {n_levels} values (one per level), got {len(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} values must be numbers, got {v!r}")
        if cast is int and float(v) != int(v):
            raise ValueError(f"{name} values must be integers, got {v!r}")
        out.append(cast(v))
    return tuple(out)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters, one value per level (A, B, C, D)."""

    steps: tuple[int, ...] = (16, 12, 8, 8)  # coarse levels carry the structure: more steps
    temperature: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)  # 0 = greedy
    top_p: tuple[float, ...] = (0.95, 0.95, 0.95, 0.95)
    guidance: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)  # 1.0 = no classifier-free guidance
    seed: int | None = None  # None: a fresh random seed per request
    # Which masked positions a step commits: the most confident, where confidence is the
    # model's top log-prob there ("top", temperature-free) or the log-prob of the token just
    # sampled there ("sampled", MaskGIT's), plus Gumbel noise of this scale x temperature x t.
    confidence: str = "top"
    gumbel: tuple[float, ...] = (CONFIDENCE_NOISE,) * 4
    # Guidance on the style (rows that have one): 1.0 = conditioned, no guidance; 0 = ignore
    # it (cfg); > 1 pushes away from the unstyled (cfg) or a random style's (icg) prediction.
    style_scale: float = 1.0
    style_guidance: str = "cfg"

    def validated(self, n_levels: int) -> SamplingParams:
        """Normalised copy (scalars broadcast to all levels); ValueError naming the bad field."""
        steps = _levels("steps", self.steps, n_levels, int)
        temperature = _levels("temperature", self.temperature, n_levels, float)
        top_p = _levels("top_p", self.top_p, n_levels, float)
        guidance = _levels("guidance", self.guidance, n_levels, float)
        if any(not 1 <= s <= MAX_STEPS for s in steps):
            raise ValueError(f"steps must lie in [1, {MAX_STEPS}], got {steps}")
        if any(not (0.0 <= x <= 100.0) for x in temperature):
            raise ValueError(f"temperature must lie in [0, 100], got {temperature}")
        if any(not (0.0 < x <= 1.0) for x in top_p):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if any(not (0.0 <= x <= 100.0) for x in guidance):
            raise ValueError(f"guidance must lie in [0, 100], got {guidance}")
        gumbel = _levels("gumbel", self.gumbel, n_levels, float)
        if any(not (0.0 <= x <= 100.0) for x in gumbel):
            raise ValueError(f"gumbel must lie in [0, 100], got {gumbel}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {', '.join(CONFIDENCES)}, "
                             f"got {self.confidence!r}")
        scale = self.style_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
                0.0 <= scale <= 100.0):
            raise ValueError(f"style_scale must be a number in [0, 100], got {scale!r}")
        if self.style_guidance not in STYLE_GUIDANCE:
            raise ValueError(f"style_guidance must be one of {', '.join(STYLE_GUIDANCE)}, "
                             f"got {self.style_guidance!r}")
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63
        ):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
        return SamplingParams(steps, temperature, top_p, guidance, seed, self.confidence, gumbel,
                              float(scale), self.style_guidance)


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or a fresh one from torch's global RNG (honours torch.manual_seed)."""
    return int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed for one (chunk, level, ...) stream of a request: streams never overlap."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StagedDenoiser:
    """Context cached once; noised passes of one level against the cache; clean passes append.

    context[l]: (R, W * F_l) tokens of W context chunks; n_ctx[r] <= W chunks are used by row r
    (the most recent ones; 0 = unconditional row). after[l]: (R, F_l) tokens of the chunk after
    the target, seen by the rows with n_after[r] = 1 (None: no row has one). style: (R, d)
    style vectors of the target (zeros = none), or None: the model is called without one.
    """

    def __init__(self, model, context: list[Tensor], n_ctx: Sequence[int],
                 after: list[Tensor] | None = None, n_after: Sequence[int] | None = None,
                 style: Tensor | None = None):
        cfg = self.config = model.config
        self.model = model
        self.style = style
        fpc = cfg.frames_per_chunk
        R = context[0].shape[0]
        dev = model.tok_emb.weight.device
        # Context chunks, a placeholder target, the after chunk: fill_tokens wants whole windows.
        windows = [
            torch.cat([c.to(dev), torch.zeros(R, f, dtype=torch.long, device=dev)]
                      + ([after[lvl].to(dev)] if after is not None else []), 1)
            for lvl, (c, f) in enumerate(zip(context, fpc, strict=True))
        ]
        self.batch = collate(n_ctx, fpc, cfg.strides, n_after).to(dev)
        ctx_idx, ctx_valid = self.batch.context_index()  # (R, C)
        self.cache = model.new_cache(R, ctx_idx.shape[1] + sum(fpc))
        self.seg_t = torch.zeros(self.batch.seg_role.shape, device=dev)  # (R, S)
        # Per-level token subsets and the segment each level's t goes to, prepared up front.
        self.noised = [
            self.batch.select(self.batch.target_index(NOISED, lvl)) for lvl in range(cfg.n_levels)
        ]
        self.noised_seg = [
            self.batch.segment_index(NOISED, lvl)[:, None] for lvl in range(cfg.n_levels)
        ]
        self.clean = [
            self.batch.select(self.batch.target_index(CLEAN, lvl))
            for lvl in range(cfg.n_levels - 1)
        ]
        self.level = 0
        self.forwards = 0
        if ctx_idx.shape[1]:
            tokens = fill_tokens(self.batch, windows, int(after is not None)).gather(1, ctx_idx)
            self._run(tokens, self.batch.select(ctx_idx, ctx_valid), self.seg_t, commit=True)

    def _run(self, tokens, layout, seg_t, commit: bool) -> Tensor:
        self.forwards += 1
        if self.style is None:
            return self.model(tokens, layout, seg_t, cache=self.cache, commit=commit)
        return self.model(tokens, layout, seg_t, cache=self.cache, commit=commit,
                          style=self.style)

    def logits(self, level: int, x: Tensor, t: Tensor) -> Tensor:
        """(R, F_l, V) float logits of the noised level-`level` tokens x (R, F_l) at times t (R,)."""
        if level != self.level:
            raise RuntimeError(f"levels run in order: expected level {self.level}, got {level}")
        seg_t = self.seg_t.scatter(1, self.noised_seg[level], t[:, None].to(self.seg_t.dtype))
        h = self._run(x, self.noised[level], seg_t, commit=False)
        return self.model.logits(h, level).float()

    def finish_level(self, level: int, x: Tensor) -> None:
        """Append the finished level (R, F_l) to the cache as a clean segment."""
        if level != self.level:
            raise RuntimeError(f"levels run in order: expected level {self.level}, got {level}")
        if level < self.config.n_levels - 1:  # the finest level is never context for another
            self._run(x, self.clean[level], self.seg_t, commit=True)
        self.level += 1


def sample_tokens(
    logp: Tensor, temperature: Tensor, top_p: Tensor, u: Tensor, use_top_p: bool
) -> Tensor:
    """Sample (B, K) ids from log-probs (B, K, V) with per-row temperature/top_p (B,) by inverse
    CDF with uniforms u (B, K): one uniform per token keeps each request's stream independent."""
    V = logp.shape[-1]
    probs = torch.softmax(logp / temperature.clamp(min=1e-5)[:, None, None], dim=-1)
    if use_top_p:
        probs, order = probs.sort(dim=-1, descending=True)
        keep = (probs.cumsum(-1) - probs) < top_p[:, None, None]  # the top token always stays
        probs = probs * keep
        best = torch.zeros_like(u, dtype=torch.long)
    else:
        order, best = None, probs.argmax(-1)
    cdf = probs.cumsum(-1)  # (B, K, V)
    j = torch.searchsorted(cdf, u[..., None] * cdf[..., -1:], right=True).clamp(max=V - 1)
    # Rounding can land on a zero-probability entry when u ~ 1: take the mode instead.
    j = torch.where(probs.gather(-1, j)[..., 0] > 0, j[..., 0], best)
    return j if order is None else order.gather(-1, j[..., None])[..., 0]


def step_plan(steps: Sequence[int], n_tokens, schedule: str) -> tuple[Tensor, Tensor, Tensor]:
    """Host-side plan of one level for rows with `steps` (B,) iterations: (t_in, t_next, commit),
    each (max steps, B). t_in is the time fed to the model, t_next the time after the step and
    commit the number of tokens committed: down to floor(n * gamma(t_next)) still masked, at
    least one per step while any is masked. n_tokens: the masked tokens at the start, one int
    for all rows or one per row. The counts do not depend on the data, so they are known before
    the loop (static shapes, no host sync)."""
    s = torch.arange(max(steps), dtype=torch.float64)[:, None]
    st = torch.tensor(steps, dtype=torch.float64)[None, :]
    t_in = (1 - s / st).clamp(min=0)
    t_next = (1 - (s + 1) / st).clamp(min=0)
    n = torch.as_tensor(n_tokens, dtype=torch.long).expand(len(steps))
    keep_target = (n * mask_fraction(schedule, t_next)).floor().long()
    commit = torch.zeros_like(keep_target)
    masked = n.clone()
    for i in range(s.shape[0]):
        keep = torch.minimum(keep_target[i], (masked - 1).clamp(min=0))
        commit[i] = masked - keep
        masked = keep
    return t_in.float(), t_next.float(), commit


@torch.no_grad()
def generate(
    model,
    context: list[Tensor],
    params: SamplingParams | Sequence[SamplingParams],
    schedules: Sequence[str] | None = None,
    chunk_index: int = 0,
    on_step: Callable | None = None,
    n_ctx: Sequence[int] | None = None,
    after: list[Tensor] | None = None,
    given: list[Tensor] | None = None,
    style: Tensor | None = None,
) -> list[Tensor]:
    """Generate the chunk that follows `context` (and precedes `after`).

    context[l]: (B, W * F_l) int64 tokens of W <= max_ctx_chunks chunks (W may be 0).
    n_ctx: per row, how many of the W chunks (the most recent) it uses; default all W.
    after[l]: (B, F_l) int64 tokens of the chunk after the target (editing); needs a model
    trained with after-context (`max_after_chunks` = 1).
    given[l]: (B, F_l) int64 target tokens to keep, -1 where a token is to be generated (None:
    generate everything). Kept tokens are returned unchanged.
    style: (B, d_model) float style vectors (`DiT.style_of` / `style_action`), zeros where a
    row has none; needs a model with `style_actions` > 0. None: no style (as before).
    params: one SamplingParams per row (or one for all). schedules: the per-level mask schedules
    the model was trained with (DiffusionConfig.schedules; default cosine).
    chunk_index: which chained chunk this is (seeds a different stream per chunk).
    on_step(level, step, x_in (R, F), t_in (R,), logits (R, F, V)): test/inspection hook.
    Returns [(B, F_l) int64] per level, on the model's device.
    """
    cfg = model.config
    L, V, fpc = cfg.n_levels, cfg.codebook_size, cfg.frames_per_chunk
    if len(context) != L:
        raise ValueError(f"expected {L} levels of context tokens, got {len(context)}")
    B = context[0].shape[0]
    W = context[0].shape[1] // fpc[0] if context[0].ndim == 2 else -1
    for lvl, c in enumerate(context):
        if c.ndim != 2 or c.shape != (B, W * fpc[lvl]) or c.dtype != torch.long:
            raise ValueError(
                f"context level {lvl}: expected int64 ({B}, {W * fpc[lvl]}), got {c.dtype} {tuple(c.shape)}"
            )
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= V):  # host check, before the loop
            raise ValueError(f"context token ids must lie in [0, {V})")
    if not 0 <= W <= cfg.max_ctx_chunks:
        raise ValueError(f"context must hold 0..{cfg.max_ctx_chunks} chunks, got {W}")
    params = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(params) != B:
        raise ValueError(f"{len(params)} SamplingParams for {B} rows")
    params = [p.validated(L) for p in params]
    seeds = [resolve_seed(p.seed) for p in params]
    schedules = tuple(schedules or ("cosine",) * L)
    if len(schedules) != L:
        raise ValueError(f"need {L} schedules, got {len(schedules)}")

    n_ctx = [W] * B if n_ctx is None else [int(n) for n in n_ctx]
    if len(n_ctx) != B or any(not 0 <= n <= W for n in n_ctx):
        raise ValueError(f"n_ctx must give 0..{W} chunks for each of the {B} rows, got {n_ctx}")
    if after is not None:
        if cfg.max_after_chunks < 1:
            raise ValueError("this model was trained without after-context (max_after_chunks "
                             "= 0), so it cannot fill in before given audio: train it with "
                             "after-context for inpainting and loops")
        _check_chunk(after, "after", B, fpc, V)
    if given is not None:
        _check_chunk(given, "given", B, fpc, V, allow_free=True)

    dev = model.tok_emb.weight.device
    n_after = [int(after is not None)] * B
    cfg_rows = (any(n_ctx) or after is not None) and any(
        g != 1.0 for p in params for g in p.guidance)
    style_rows, style_uncond, s_scale = False, None, None
    if style is not None:
        if not getattr(cfg, "style_actions", 0):
            raise ValueError("this model has no style actions (style_actions = 0)")
        if style.shape != (B, cfg.d_model) or not style.is_floating_point():
            raise ValueError(f"style must be float ({B}, {cfg.d_model}), got {style.dtype} "
                             f"{tuple(style.shape)}")
        style = style.to(dev, model.tok_emb.weight.dtype)
        has = style.ne(0).any(1).tolist()  # host bools, before the loop
        scales = [p.style_scale if h else 1.0 for p, h in zip(params, has, strict=True)]
        style_rows = any(x != 1.0 for x in scales)
        s_scale = torch.tensor(scales, device=dev)[:, None, None]
        if style_rows:  # the reference prediction guidance pushes away from, per row
            icg = [p.style_guidance == "icg" for p in params]
            k = torch.tensor([torch.randint(cfg.style_actions, (1,), generator=torch.Generator()
                              .manual_seed(derive_seed(sd, chunk_index, "icg"))).item()
                              for sd in seeds], device=dev)
            style_uncond = torch.where(torch.tensor(icg, device=dev)[:, None],
                                       model.style_action(k).to(style.dtype),
                                       torch.zeros_like(style))
    # Rows: the requests; with context guidance, each again without context; with style
    # guidance, each again with its reference style (none, or a random action).
    groups = [(n_ctx, n_after, style)]
    if cfg_rows:
        groups.append(([0] * B, [0] * B, style))
    if style_rows:
        groups.append((n_ctx, n_after, style_uncond))
    n_rep = len(groups)
    rows_ctx = [torch.cat([c] * n_rep) for c in context]
    rows_after = None if after is None else [torch.cat([a] * n_rep) for a in after]
    runner = StagedDenoiser(model, rows_ctx, [n for g in groups for n in g[0]], rows_after,
                            [a for g in groups for a in g[1]],
                            None if style is None else torch.cat([g[2] for g in groups]))
    dup = (lambda x: torch.cat([x] * n_rep)) if n_rep > 1 else (lambda x: x)  # noqa: E731

    out = []
    for lvl in range(L):
        F = fpc[lvl]
        keep = None if given is None else given[lvl].to(dev)
        n_free = F if keep is None else (keep < 0).sum(1).tolist()   # host ints, before the loop
        t_in, t_next, commit = step_plan([p.steps[lvl] for p in params], n_free, schedules[lvl])
        if keep is not None:
            # The model was trained with t and the masked fraction tied by the schedule; with
            # fixed tokens the fraction still masked is lower, so tell it that fraction's t.
            masked_before = torch.tensor(n_free)[None, :] - commit.cumsum(0) + commit
            t_in = mask_time(schedules[lvl], masked_before / F).float()
        k_max = commit.max(dim=1).values.tolist()  # host ints: tokens sampled per step
        t_in, t_next, commit = t_in.to(dev), t_next.to(dev), commit.to(dev)
        temp = torch.tensor([p.temperature[lvl] for p in params], device=dev)
        top_p = torch.tensor([p.top_p[lvl] for p in params], device=dev)
        g = torch.tensor([p.guidance[lvl] for p in params], device=dev)[:, None, None]
        use_top_p = any(p.top_p[lvl] < 1.0 for p in params)
        gscale = torch.tensor([p.gumbel[lvl] for p in params], device=dev)[:, None]
        any_sampled = any(p.confidence == "sampled" for p in params)
        by_sampled = torch.tensor([p.confidence == "sampled" for p in params], device=dev)[:, None]
        gens = [torch.Generator(dev).manual_seed(derive_seed(sd, chunk_index, lvl)) for sd in seeds]

        x = torch.full((B, F), V, dtype=torch.long, device=dev)  # all [MASK]
        if keep is not None:
            x = torch.where(keep >= 0, keep, x)                       # the given tokens stay
        for step, k in enumerate(k_max):
            if k == 0:  # every row already finished (steps > tokens): nothing left to do
                continue
            x_in, t_rows = dup(x), dup(t_in[step])
            logits = runner.logits(lvl, x_in, t_rows)  # (R, F, V)
            logp = torch.log_softmax(logits, dim=-1)
            if n_rep > 1:
                cond, plain = logp[:B], torch.ones_like(g, dtype=torch.bool)
                guided = cond
                if cfg_rows:
                    guided = guided + (g - 1) * (cond - logp[B: 2 * B])
                    plain = plain & (g == 1.0)
                if style_rows:
                    guided = guided + (s_scale - 1) * (cond - logp[(n_rep - 1) * B:])
                    plain = plain & (s_scale == 1.0)
                # Rows without guidance keep the conditional log-probs bit for bit: re-normalising
                # them would move them by rounding and could flip a near-tie, making a request's
                # tokens depend on whether a guided request shares its batch.
                logp = torch.where(plain, cond, torch.log_softmax(guided, dim=-1))
            # Each row draws its own uniforms: one per position for the order, one per
            # position for the token (used only where a token is sampled).
            u_pos = torch.stack([torch.rand(F, generator=gb, device=dev) for gb in gens])
            u_tok = torch.stack([torch.rand(F, generator=gb, device=dev) for gb in gens])
            # Confidence of a position: the model's (guided) top log-prob there, temperature-
            # free so greedy decoding orders by it too, plus Gumbel noise annealed with t.
            gumbel = -torch.log(-torch.log(u_pos.clamp(1e-10, 1 - 1e-7)))
            conf = logp.max(dim=-1).values
            if any_sampled:  # MaskGIT rows: a token at every position first, then its log-prob
                tok_all = sample_tokens(logp, temp, top_p, u_tok, use_top_p)  # (B, F)
                conf = torch.where(by_sampled, logp.gather(2, tok_all[..., None])[..., 0], conf)
            conf = conf + gscale * temp[:, None] * t_next[step][:, None] * gumbel
            conf = conf.masked_fill(x != V, -math.inf)
            # The k most confident masked positions (k = the most any row commits now); sampling
            # only there costs ~F samples per level instead of F per step.
            pos = conf.topk(k, dim=1).indices  # (B, k), most confident first
            if any_sampled:  # sampling is per position, so these are the tokens drawn there
                tok = tok_all.gather(1, pos)
            else:
                lp = logp.gather(1, pos[..., None].expand(-1, -1, V))  # (B, k, V)
                tok = sample_tokens(lp, temp, top_p, u_tok.gather(1, pos), use_top_p)  # (B, k)
            take = torch.arange(k, device=dev) < commit[step][:, None]  # row's own count
            x = x.scatter(1, pos, torch.where(take, tok, x.gather(1, pos)))
            if on_step is not None:
                on_step(lvl, step, x_in, t_rows, logits)
        runner.finish_level(lvl, dup(x))
        out.append(x)
    return out


def _check_chunk(tokens: list[Tensor], name: str, B: int, fpc, V: int,
                 allow_free: bool = False) -> None:
    if len(tokens) != len(fpc):
        raise ValueError(f"{name}: expected {len(fpc)} levels, got {len(tokens)}")
    lo = -1 if allow_free else 0
    for lvl, (t, f) in enumerate(zip(tokens, fpc, strict=True)):
        if t.ndim != 2 or t.shape != (B, f) or t.dtype != torch.long:
            raise ValueError(f"{name} level {lvl}: expected int64 ({B}, {f}), got {t.dtype} "
                             f"{tuple(t.shape)}")
        if t.numel() and (int(t.min()) < lo or int(t.max()) >= V):
            raise ValueError(f"{name} token ids must lie in [{lo}, {V})")


def slide_window(context: list[Tensor], new: list[Tensor], max_chunks: int) -> list[Tensor]:
    """Append the new chunk to the context and keep the last `max_chunks` chunks (token space)."""
    out = []
    for c, n in zip(context, new, strict=True):
        f = n.shape[1]
        keep = min(c.shape[1] // f + 1, max_chunks) * f
        out.append(torch.cat([c.to(n.device), n], dim=1)[:, c.shape[1] + f - keep :])
    return out


def extend(
    model,
    context: list[Tensor],
    n_chunks: int,
    params: SamplingParams | Sequence[SamplingParams],
    schedules: Sequence[str] | None = None,
    style: Tensor | None = None,
) -> Iterator[list[Tensor]]:
    """Yield `n_chunks` chained chunks ([(B, F_l)] each); the window slides in token space.
    style: (B, d_model) as in `generate`, the same for every chunk."""
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks must be a positive int, got {n_chunks!r}")
    B = context[0].shape[0]
    params = [params] * B if isinstance(params, SamplingParams) else list(params)
    params = [p.validated(model.config.n_levels) for p in params]
    # Resolve seeds once so every chunk of a request draws from the same seeded family.
    params = [replace(p, seed=resolve_seed(p.seed)) for p in params]
    for k in range(n_chunks):
        new = generate(model, context, params, schedules, chunk_index=k, style=style)
        yield new
        context = slide_window(context, new, model.config.max_ctx_chunks)
