"""The denoiser: one transformer trunk over all SNAC levels (DESIGN §4). It has no schedule.

Input: a packed sequence of segments (see `model/layout.py`) — token ids per level, the layout
tensors (segment ids, fractional positions, per-segment level/role, the allowed table) and a
per-segment t. Conditioning (level, role, t) is computed once per segment and broadcast to its
tokens through adaLN-Zero; positions enter through RoPE on the fractional finest-frame positions.

    h = dit(tokens (B,N), layout: LayoutBatch, seg_t (B,S))   -> (B, N, d_model)
    logits = dit.logits(h_l, level)                             -> (..., codebook_size)

Only the caller knows which tokens it needs logits for (the noised segments), so the four
4096-way heads are applied separately. With a `KVCache` the same forward runs on a token subset
whose keys/values are appended after the cached prefix (staged sampling, `model/sampler.py`);
the attention table is the training one, so cached inference equals a full recompute.

With `style_actions` > 0 the model also takes a style vector per row (model/style.py): it joins
the (level, role, t) conditioning of the target segments only, so a cached context is shared by
every style, and a row of zeros (style dropout) is exactly the model without a style.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from model.attention import attention
from model.layout import CONTEXT, SNAC_FRAMES, SNAC_STRIDES, LayoutBatch, check_geometry
from model.style import StyleActions


@dataclass
class DiTConfig:
    # Codec geometry: must match the codec the tokens come from (the engine checks).
    n_levels: int = 4  # SNAC 32 kHz has four VQ levels, A (coarse) .. D (fine)
    codebook_size: int = 4096  # ids per level; id `codebook_size` is that level's [MASK]
    frames_per_chunk: tuple[int, ...] = SNAC_FRAMES  # tokens per 6.144 s chunk, per level
    strides: tuple[int, ...] = SNAC_STRIDES  # finest frames per token, per level (time alignment)
    max_ctx_chunks: int = 2  # 12.288 s of context; layouts with 0..this many chunks are trained
    # 1 = also trained with a context chunk after the target (editing: inpaint, loop; DESIGN
    # §2). A model with 0 never saw that layout, and the engine refuses to edit with it.
    max_after_chunks: int = 0
    # Trunk.
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8  # head dim d_model / n_heads; 64 suits the attention kernel best
    mlp_ratio: float = 4.0
    qk_norm: bool = True  # RMS-normalised q/k keep attention logits bounded (bf16 training)
    rope_base: float = 10000.0  # positions reach ~1.5k finest frames; the usual base suffices
    t_freq_dim: int = 256  # sinusoidal features of t before its MLP (as in DiT)
    # Style actions (model/style.py, issue 37). 0 = no style path: every model before it, and
    # what a checkpoint without these fields loads as.
    style_actions: int = 0  # K learned style embeddings; a run sets it (e.g. 8: few knobs)
    style_topk: int = 2  # after the warm-up a chunk mixes at most this many styles
    # Training steps of a dense softmax over the K styles before top-k: every style first gets
    # a gradient from every chunk, so none dies before it means something.
    style_warmup: int = 2000
    # Share of training rows whose style is dropped (all zeros = no style): trains the
    # unconditioned path the model serves without a style and classifier-free guidance uses.
    style_dropout: float = 0.2

    def __post_init__(self):
        self.frames_per_chunk, self.strides = check_geometry(self.frames_per_chunk, self.strides)
        if len(self.frames_per_chunk) != self.n_levels:
            raise ValueError(
                f"frames_per_chunk has {len(self.frames_per_chunk)} levels, n_levels={self.n_levels}"
            )
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model {self.d_model} must split into {self.n_heads} even-sized heads"
            )
        if self.codebook_size < 2 or self.max_ctx_chunks < 0:
            raise ValueError("codebook_size must be >= 2 and max_ctx_chunks >= 0")
        if self.max_after_chunks not in (0, 1):
            raise ValueError("max_after_chunks must be 0 or 1")
        if self.style_actions < 0 or self.style_warmup < 0:
            raise ValueError("style_actions and style_warmup must be >= 0")
        if self.style_actions and not 1 <= self.style_topk <= self.style_actions:
            raise ValueError(f"style_topk must lie in [1, style_actions = {self.style_actions}]")
        if not 0.0 <= self.style_dropout <= 1.0:
            raise ValueError(f"style_dropout must lie in [0, 1], got {self.style_dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> DiTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        """Inverse of `asdict` (JSON turns tuples into lists); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DiTConfig fields {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# Parameter counts (codebook 4096, four levels) are in docs/model.md and tests/test_dit.py.
PRESETS: dict[str, dict] = {
    "debug": dict(d_model=64, n_layers=2, n_heads=2),  # CPU tests in seconds
    "small": dict(d_model=256, n_layers=6, n_heads=4),  # ~16 M, servable on a CPU
    "base": dict(d_model=640, n_layers=12, n_heads=10),  # ~109 M
    "large": dict(d_model=1024, n_layers=24, n_heads=16),  # ~490 M
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


# adaLN modulation is per segment (B, S+1, d) and broadcast to tokens through seg_idx (B, N).
# Gathering it to (B, N, 6d) first would keep that tensor alive for the backward in every block
# (24·d bytes per token per layer in fp32); these functions gather inside and save only the
# per-segment tables, the index and the one per-token operand the gradient needs. Forward values
# are bit-identical to gather-then-modulate; the tables' gradients are scatter-adds, as gather's.


def _rows(table: Tensor, idx: Tensor) -> Tensor:
    """table (B, S', C), idx (B, N) -> (B, N, C); idx (B, 1) gives (B, 1, C), which broadcasts."""
    return table.gather(1, idx[:, :, None].expand(-1, -1, table.shape[-1]))


def _segment_sum(values: Tensor, idx: Tensor, n_seg: int) -> Tensor:
    """values (B, N, C) summed per segment -> (B, n_seg, C)."""
    out = values.new_zeros(values.shape[0], n_seg, values.shape[-1])
    return out.scatter_add_(1, idx[:, :, None].expand(-1, -1, values.shape[-1]), values)


class _SegmentModulate(torch.autograd.Function):
    """x * (1 + scale[seg]) + shift[seg]; saves x, the scale table and the index."""

    @staticmethod
    def forward(ctx, x, shift, scale, idx):
        ctx.save_for_backward(x, scale, idx)
        ctx.shift_dtype = shift.dtype
        return x * (1 + _rows(scale, idx)) + _rows(shift, idx)

    @staticmethod
    def backward(ctx, g):
        x, scale, idx = ctx.saved_tensors
        S = scale.shape[1]
        gx = g * (1 + _rows(scale, idx)) if ctx.needs_input_grad[0] else None
        gshift = _segment_sum(g, idx, S).to(ctx.shift_dtype) if ctx.needs_input_grad[1] else None
        gscale = _segment_sum(g * x, idx, S).to(scale.dtype) if ctx.needs_input_grad[2] else None
        return gx.to(x.dtype) if gx is not None else None, gshift, gscale, None


class _SegmentGatedAdd(torch.autograd.Function):
    """x + gate[seg] * y (the gated residual); saves y, the gate table and the index."""

    @staticmethod
    def forward(ctx, x, y, gate, idx):
        ctx.save_for_backward(y, gate, idx)
        ctx.x_dtype = x.dtype
        return x + _rows(gate, idx) * y

    @staticmethod
    def backward(ctx, g):
        y, gate, idx = ctx.saved_tensors
        gx = g.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gy = (g * _rows(gate, idx)).to(y.dtype) if ctx.needs_input_grad[1] else None
        ggate = (_segment_sum(g * y, idx, gate.shape[1]).to(gate.dtype)
                 if ctx.needs_input_grad[2] else None)
        return gx, gy, ggate, None


def segment_modulate(x: Tensor, shift: Tensor, scale: Tensor, idx: Tensor) -> Tensor:
    """modulate(x, shift[seg], scale[seg]) with shift/scale (B, S', d) per segment, idx (B, N)."""
    return _SegmentModulate.apply(x, shift, scale, idx)


def segment_gated_add(x: Tensor, y: Tensor, gate: Tensor, idx: Tensor) -> Tensor:
    """x + gate[seg] * y with gate (B, S', d) per segment, idx (B, N)."""
    return _SegmentGatedAdd.apply(x, y, gate, idx)


def rope_tables(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin (B, 1, N, head_dim/2) for fractional positions pos (B, N), computed in fp32."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim
    )
    ang = pos.float()[:, None, :, None] * inv_freq  # (B, 1, N, D/2)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)  # rotate-half pairing, (B, H, N, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (…, d): sinusoidal features then an MLP (DiT)."""

    def __init__(self, d: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        arg = (t.float() * 1000.0)[..., None] * freqs  # DiT scales t to [0, 1000]
        emb = torch.cat([arg.cos(), arg.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class KVCache:
    """Preallocated per-layer keys/values of already-processed tokens (static shapes).

    `length` is a Python int: every offset is known on the host, so filling and reading the
    cache never syncs with the device. A forward with a cache writes its own K/V after the
    committed prefix and attends to prefix + itself; `commit=True` keeps them.
    """

    def __init__(self, config: DiTConfig, batch: int, max_len: int, device, dtype):
        shape = (config.n_layers, batch, config.n_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.seg = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()

    def forward(self, x, rope, seg_q, allowed, cache: KVCache | None, layer: int) -> Tensor:
        B, N, d = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh) each
        # Under CUDA autocast rms_norm runs in fp32, so normed and rotated q/k come back fp32
        # while v is in the autocast dtype: attention runs in v's dtype.
        q = apply_rope(self.q_norm(q), *rope).to(v.dtype)
        k = apply_rope(self.k_norm(k), *rope).to(v.dtype)
        seg_k = seg_q
        if cache is not None:
            end = cache.length + N
            cache.k[layer, :, :, cache.length : end] = k
            cache.v[layer, :, :, cache.length : end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]  # (B, H, end, Dh)
            seg_k = cache.seg[:, :end]
        out = attention(q, k, v, seg_q, seg_k, allowed)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, d))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero; modulation per segment (`segment_modulate`)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)
        )
        self.adaLN = nn.Linear(d, 6 * d)  # applied to SiLU(cond) per segment, not per token

    def forward(self, x, cond, seg_idx, rope, seg_q, allowed, cache=None, layer=0) -> Tensor:
        mod = self.adaLN(cond)  # (B, S+1, 6d): per segment, broadcast to tokens by seg_idx
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        h = segment_modulate(self.norm1(x), shift1, scale1, seg_idx)
        x = segment_gated_add(x, self.attn(h, rope, seg_q, allowed, cache, layer), gate1, seg_idx)
        h = segment_modulate(self.norm2(x), shift2, scale2, seg_idx)
        return segment_gated_add(x, self.mlp(h), gate2, seg_idx)


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        d, L, V = cfg.d_model, cfg.n_levels, cfg.codebook_size
        # One table holds every level's ids plus its [MASK]: row = level * (V + 1) + id.
        self.tok_emb = nn.Embedding(L * (V + 1), d)
        self.level_emb = nn.Embedding(L, d)  # conditioning, per segment
        self.role_emb = nn.Embedding(3, d)  # context / clean / noised
        self.t_emb = TimestepEmbedder(d, cfg.t_freq_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Linear(d, 2 * d)
        self.heads = nn.ModuleList(nn.Linear(d, V) for _ in range(L))
        if cfg.style_actions:
            self.style = StyleActions(d, cfg.style_actions, cfg.style_topk)
            # Bias-free: a style of zeros adds exactly nothing (the unconditioned model).
            self.style_proj = nn.Linear(d, d, bias=False)
        # Per-block activation checkpointing (a run-time switch, not architecture: the trainer
        # sets it): a training forward keeps only each block's input and recomputes the block in
        # the backward, ~1/3 more compute for a fraction of the activation memory.
        self.checkpoint_blocks = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Plain transformer init for the trunk (DiT): xavier linears, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Embeddings small so the first LayerNorm sees similar scales for every level.
        for emb in (self.tok_emb, self.level_emb, self.role_emb):
            nn.init.normal_(emb.weight, std=0.02)
        for lin in (self.t_emb.mlp[0], self.t_emb.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        # adaLN-Zero: every gate (and shift/scale) starts at 0, so each block is the identity at
        # init and the network starts as a per-token embedding -> head map (tested).
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN.weight)
            nn.init.zeros_(blk.adaLN.bias)
        nn.init.zeros_(self.final_adaLN.weight)
        nn.init.zeros_(self.final_adaLN.bias)
        if self.config.style_actions:
            self.style.initialize_weights()
            # Zero projection: at init a style changes nothing, so adding the style path to a
            # trained model starts from that model exactly (tested).
            nn.init.zeros_(self.style_proj.weight)
        # Zero heads: uniform predictions at init, loss starts at exactly log(codebook_size).
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, batch, max_len, p.device, p.dtype)

    def forward(
        self,
        tokens: Tensor,
        layout: LayoutBatch,
        seg_t: Tensor,
        cache: KVCache | None = None,
        commit: bool = False,
        style: Tensor | None = None,
    ) -> Tensor:
        """Hidden states (B, N, d) of `tokens` (B, N), ready for `logits(h, level)`.

        tokens: ids in their level's vocabulary, `codebook_size` = [MASK]; ignored at padding.
        layout: the LayoutBatch of these tokens (possibly `select`ed from a full batch).
        seg_t: (B, S) diffusion time per segment (0 for context / clean segments).
        cache: attend to its prefix too and write this call's K/V after it; `commit` keeps them.
        style: (B, d_model) style vectors (`style_of`, `style_action`) conditioning the target
        segments (clean and noised; context never sees it, so a cached context serves every
        style); a row of zeros is no style. None = no style at all (the model without one).
        """
        cfg = self.config
        B, N = tokens.shape
        if layout.seg_id.shape != (B, N) or seg_t.shape != layout.seg_role.shape:
            raise ValueError(
                f"tokens {tuple(tokens.shape)}, layout {layout.shape}, seg_t {tuple(seg_t.shape)} disagree"
            )
        valid = layout.seg_id >= 0
        ids = torch.where(valid, tokens, 0)
        if ids.device.type == "cpu" and ((ids < 0).any() or (ids > cfg.codebook_size).any()):
            # Checked on CPU only: on a GPU it would cost a host sync per forward.
            raise ValueError(f"token ids must lie in [0, {cfg.codebook_size}]")
        x = self.tok_emb(layout.level * (cfg.codebook_size + 1) + ids)  # (B, N, d)

        # Per-segment conditioning (B, S, d), plus a zero row S that padding tokens point to.
        S = seg_t.shape[1]
        cond = (
            self.level_emb(layout.seg_level)
            + self.role_emb(layout.seg_role.clamp(min=0))
            + self.t_emb(seg_t)
        )
        if style is not None:
            if not self.config.style_actions:
                raise ValueError("this model has no style path (style_actions = 0)")
            if style.shape != (B, cfg.d_model):
                raise ValueError(f"style must be ({B}, {cfg.d_model}), got {tuple(style.shape)}")
            on = (layout.seg_role != CONTEXT)[..., None]  # (B, S, 1): target segments
            cond = torch.where(on, cond + self.style_proj(style.to(cond.dtype))[:, None], cond)
        cond = F.silu(torch.cat([cond, cond.new_zeros(B, 1, cond.shape[-1])], dim=1))  # (B, S+1, d)
        seg_idx = torch.where(valid, layout.seg_id, S)  # (B, N)
        if cache is not None and ids.device.type == "cpu" and bool(
                (seg_idx == seg_idx[:, :1]).all()):
            # One segment per row (every sampling pass of one level): its modulation broadcasts
            # from (B, 1) instead of being gathered to every token, the same values for less
            # memory traffic. A CPU check: on a GPU it would cost a host sync per forward.
            seg_idx = seg_idx[:, :1]

        rope = rope_tables(layout.pos, cfg.head_dim, cfg.rope_base)
        if cache is not None:
            if cache.length + N > cache.max_len:
                raise ValueError(f"KV cache overflow: {cache.length} + {N} > {cache.max_len}")
            cache.seg[:, cache.length : cache.length + N] = layout.seg_id
        recompute = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            if recompute:
                x = checkpoint(blk, x, cond, seg_idx, rope, layout.seg_id, layout.allowed,
                               use_reentrant=False)
            else:
                x = blk(x, cond, seg_idx, rope, layout.seg_id, layout.allowed, cache, i)
        if cache is not None and commit:
            cache.length += N

        shift, scale = self.final_adaLN(cond).chunk(2, dim=-1)  # (B, S+1, d) each
        return segment_modulate(self.final_norm(x), shift, scale, seg_idx)

    def style_of(self, chunk: list[Tensor], sparse: bool = True) -> Tensor:
        """Style vectors (B, d_model) of whole chunks: chunk[l] (B, F_l) clean token ids.
        sparse: top-k mixing (after the training warm-up, and at inference)."""
        cfg = self.config
        if not cfg.style_actions:
            raise ValueError("this model has no style path (style_actions = 0)")
        return self.style_weights(chunk, sparse) @ self.style.styles

    def style_weights(self, chunk: list[Tensor], sparse: bool = True) -> Tensor:
        """(B, K) mixing weights over the style actions of whole chunks (as `style_of`)."""
        cfg = self.config
        if not cfg.style_actions:
            raise ValueError("this model has no style path (style_actions = 0)")
        ids = torch.cat([c + lvl * (cfg.codebook_size + 1) for lvl, c in enumerate(chunk)], 1)
        return self.style.weights(self.tok_emb(ids), sparse=sparse)  # pooled over N = sum F_l

    def style_action(self, k: Tensor) -> Tensor:
        """Style vectors (B, d_model) of chosen actions k (B,) in 0..style_actions-1."""
        if not self.config.style_actions:
            raise ValueError("this model has no style path (style_actions = 0)")
        return self.style.action(k)

    def logits(self, h: Tensor, level: int) -> Tensor:
        """(…, d) hidden states of level-`level` tokens -> (…, codebook_size) logits."""
        return self.heads[level](h)
