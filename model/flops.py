"""Model FLOPs of the DiT: the matmuls it really runs, per training sample (what MFU divides).

The PaLM-style `6 * params` count does not fit this model: the embedding is a lookup, adaLN and
the timestep MLP run once per segment (not per token), only the noised target tokens go through
one of the four 4096-way heads, and a query sees only the keys its segment may (DESIGN §2), not
the whole sequence. So, per sample of layout (n_ctx, n_after), forward (one multiply-add = 2):

    per layer, per token:   2 * d * (3d + d + 2 * mlp_ratio * d)        qkv, proj, MLP
    per layer, attention:   4 * d * pairs                                q·k and p·v over visible pairs
    per layer, per segment: 2 * d * 6d                                   adaLN
    per segment:            2 * (t_freq * d + d * d) + 2 * d * 2d        t MLP, final adaLN
    per noised token:       2 * d * codebook_size                        its level's head

where pairs = Σ allowed (query, key) pairs of the layout (exact, from segment sizes). Training
is forward + backward = 3x forward. Activation-checkpoint recomputation is not model work and is
not counted (MFU's convention); padding is not either.
"""

from __future__ import annotations

from functools import lru_cache

from model.layout import NOISED, build_layout


@lru_cache(maxsize=256)
def _forward_parts(d: int, n_layers: int, mlp_ratio: float, vocab: int, t_freq: int,
                   fpc: tuple[int, ...], strides: tuple[int, ...], n_ctx: int,
                   n_after: int) -> tuple[tuple[str, float], ...]:
    lay = build_layout(n_ctx, fpc, strides, n_after=n_after)
    sizes = lay.seg_id.bincount(minlength=len(lay.segments)).double()  # tokens per segment
    pairs = float(sizes @ lay.allowed.double() @ sizes)
    n_tok, n_seg = lay.n_tokens, len(lay.segments)
    noised = sum(s.length for s in lay.segments if s.role == NOISED)
    return (
        ("linear", n_layers * n_tok * 2.0 * d * (4 * d + 2 * mlp_ratio * d)),
        ("attention", n_layers * 4.0 * d * pairs),
        ("conditioning", n_seg * (n_layers * 12.0 * d * d + 2.0 * (t_freq * d + d * d)
                                  + 4.0 * d * d)),
        ("heads", noised * 2.0 * d * vocab),
    )


def forward_flops(cfg, n_ctx: int, n_after: int = 0) -> dict[str, float]:
    """Forward FLOPs of one sample by part (module docstring), plus "total" and "pairs"-free
    "tokens" (the sample's sequence length) for per-token figures. `cfg`: a DiTConfig."""
    parts = dict(_forward_parts(cfg.d_model, cfg.n_layers, float(cfg.mlp_ratio),
                                cfg.codebook_size, cfg.t_freq_dim, tuple(cfg.frames_per_chunk),
                                tuple(cfg.strides), int(n_ctx), int(n_after)))
    parts["total"] = sum(parts.values())
    return parts


def train_flops(cfg, n_ctx, n_after=None) -> float:
    """Training FLOPs (forward + backward) of a batch whose rows have these layouts."""
    n_after = [0] * len(n_ctx) if n_after is None else n_after
    return sum(3.0 * forward_flops(cfg, c, a)["total"] for c, a in zip(n_ctx, n_after,
                                                                          strict=True))


def mean_keys_per_query(cfg, n_ctx: int, n_after: int = 0) -> float:
    """Visible keys per query of a layout, averaged over its tokens (attention's true width)."""
    attention = forward_flops(cfg, n_ctx, n_after)["attention"]
    return attention / (cfg.n_layers * 4.0 * cfg.d_model) / build_layout(
        n_ctx, cfg.frames_per_chunk, cfg.strides, n_after=n_after).n_tokens
