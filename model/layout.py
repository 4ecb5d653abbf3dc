"""Token layout of one training/inference sample and its batching (DESIGN §2).

A sample is a sequence of segments, each a contiguous run of one chunk's tokens at one level:

    [ctx chunk 0: A B C D] [ctx chunk 1: A B C D] [after: A B C D]
    [target clean: A B C] [target noised: A B C D]

with n_ctx in {0, 1, 2} context chunks before the target and n_after in {0, 1} after it (the
after-context: editing, DESIGN §2). The after chunk is a context chunk like the others (chunk
index n_ctx + 1, so its positions lie after the target's); with n_after = 0 a layout is exactly
the continuation layout. Sequence order does not matter to the transformer (it only sees
positions and the attention table), so the order is chosen for readability and so that all
context tokens come first (the sampler caches them as a prefix).

Positions are time-aligned across levels: token i of level l (stride s_l in finest frames) of
chunk c sits at `c * F_fine + (i + 0.5) * s_l - 0.5`, F_fine = frames of the finest level per
chunk (512 for SNAC 32 kHz). With the SNAC geometry (64/128/256/512) every segment is a multiple
of 64 tokens, the attention kernel's block size; the code itself is generic over
`frames_per_chunk` and `strides` so tests can use tiny geometries.

Batching pads rows to the longest sequence with segment id -1 (padding sees nothing and is seen
by nothing) and pads each row's segment table / `allowed` table to the largest segment count.

Everything is built on the host and reaches a GPU in one copy per tensor group (`to_device`:
packed into one pinned buffer, sent non_blocking): `collate(...).to(device)` is one copy,
carrying each row's target segment starts so `target_index` and `context_index` copy nothing,
and `fill_tokens` one more (its gather index). A copy per row or per level was a host sync each.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import torch
from torch import Tensor

CONTEXT, CLEAN, NOISED = 0, 1, 2
ROLE_NAMES = ("context", "clean", "noised")
SNAC_FRAMES = (64, 128, 256, 512)
SNAC_STRIDES = (8, 4, 2, 1)


@dataclass(frozen=True)
class Segment:
    chunk: int  # chunk index within the sample; the target chunk is n_ctx
    level: int  # 0 = coarsest (A)
    role: int  # CONTEXT / CLEAN / NOISED
    start: int  # offset of its first token in the sequence
    length: int  # = frames_per_chunk[level]


@dataclass
class Layout:
    """One sample. Tensors are CPU and shared by nobody; treat them as read-only."""

    segments: list[Segment]
    seg_id: Tensor  # (N,) int64 segment index of each token
    level: Tensor  # (N,) int64
    role: Tensor  # (N,) int64
    pos: Tensor  # (N,) float32 fractional finest-frame positions
    allowed: Tensor  # (S, S) bool, allowed[q_segment, k_segment]
    n_ctx: int
    frames_per_chunk: tuple[int, ...]
    strides: tuple[int, ...]
    n_after: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.seg_id.shape[0])

    def find(self, role: int, level: int, chunk: int | None = None) -> int:
        """Index of the segment with this role/level (and chunk); KeyError if absent."""
        for i, s in enumerate(self.segments):
            if s.role == role and s.level == level and (chunk is None or s.chunk == chunk):
                return i
        raise KeyError(f"no {ROLE_NAMES[role]} segment at level {level} (chunk {chunk})")


def check_geometry(frames_per_chunk, strides) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate the per-level geometry; returns it as tuples of int."""
    fpc, st = tuple(int(f) for f in frames_per_chunk), tuple(int(s) for s in strides)
    if len(fpc) < 1 or len(fpc) != len(st):
        raise ValueError(f"frames_per_chunk {fpc} and strides {st} must be non-empty, same length")
    if any(f <= 0 for f in fpc) or any(s <= 0 for s in st):
        raise ValueError(f"frames_per_chunk {fpc} and strides {st} must be positive")
    if any(f * s != fpc[-1] * st[-1] for f, s in zip(fpc, st, strict=True)):
        # Time alignment needs every level to cover the same span of the finest grid.
        raise ValueError(f"frames_per_chunk {fpc} x strides {st} must be constant across levels")
    return fpc, st


def allowed_table(segments: list[Segment]) -> Tensor:
    """(S, S) bool: may a query in segment q attend to a key in segment k (DESIGN §2)."""
    S = len(segments)
    allowed = torch.zeros(S, S, dtype=torch.bool)
    for qi, q in enumerate(segments):
        for ki, k in enumerate(segments):
            if k.role == CONTEXT:
                ok = True  # everything sees the context; the context sees only itself
            elif q.role == CONTEXT:
                ok = False
            elif q.role == CLEAN:
                ok = k.role == CLEAN and k.level <= q.level
            else:  # NOISED
                ok = (k.role == CLEAN and k.level < q.level) or (
                    k.role == NOISED and k.level == q.level
                )
            allowed[qi, ki] = ok
    return allowed


def build_layout(n_ctx: int, frames_per_chunk=SNAC_FRAMES, strides=SNAC_STRIDES,
                 n_after: int = 0) -> Layout:
    """Layout of one sample: `n_ctx` context chunks, one target chunk, `n_after` (0 or 1)
    context chunks after it."""
    fpc, st = check_geometry(frames_per_chunk, strides)
    if not isinstance(n_ctx, int) or n_ctx < 0:
        raise ValueError(f"n_ctx must be a non-negative int, got {n_ctx!r}")
    if n_after not in (0, 1) or isinstance(n_after, bool):
        raise ValueError(f"n_after must be 0 or 1, got {n_after!r}")
    L, fine = len(fpc), fpc[-1] * st[-1]
    spec = [(c, lvl, CONTEXT) for c in range(n_ctx) for lvl in range(L)]
    spec += [(n_ctx + 1, lvl, CONTEXT) for _ in range(n_after) for lvl in range(L)]
    spec += [(n_ctx, lvl, CLEAN) for lvl in range(L - 1)]  # the finest level is never context
    spec += [(n_ctx, lvl, NOISED) for lvl in range(L)]
    segments, seg_id, level, role, pos, start = [], [], [], [], [], 0
    for i, (c, lvl, r) in enumerate(spec):
        n = fpc[lvl]
        segments.append(Segment(chunk=c, level=lvl, role=r, start=start, length=n))
        seg_id.append(torch.full((n,), i, dtype=torch.long))
        level.append(torch.full((n,), lvl, dtype=torch.long))
        role.append(torch.full((n,), r, dtype=torch.long))
        pos.append(c * fine + (torch.arange(n, dtype=torch.float32) + 0.5) * st[lvl] - 0.5)
        start += n
    return Layout(
        segments=segments,
        seg_id=torch.cat(seg_id),
        level=torch.cat(level),
        role=torch.cat(role),
        pos=torch.cat(pos),
        allowed=allowed_table(segments),
        n_ctx=n_ctx,
        frames_per_chunk=fpc,
        strides=st,
        n_after=n_after,
    )


@lru_cache(maxsize=64)
def _cached_layout(n_ctx: int, fpc: tuple[int, ...], st: tuple[int, ...],
                   n_after: int = 0) -> Layout:
    return build_layout(n_ctx, fpc, st, n_after)


@dataclass
class LayoutBatch:
    """A padded batch of layouts (possibly different n_ctx), or a token subset of one.

    Per-token tensors are (B, N); padding tokens have seg_id -1, level 0, role -1, pos 0.
    Segment tables are (B, S) with S the largest segment count; missing segments have role -1.
    """

    seg_id: Tensor  # (B, N) int64
    level: Tensor  # (B, N) int64
    role: Tensor  # (B, N) int64
    pos: Tensor  # (B, N) float32
    seg_level: Tensor  # (B, S) int64
    seg_role: Tensor  # (B, S) int64
    allowed: Tensor  # (B, S, S) bool
    n_ctx: tuple[int, ...]  # per row
    frames_per_chunk: tuple[int, ...]
    strides: tuple[int, ...]
    n_after: tuple[int, ...] = ()  # per row; () = no row has an after-context chunk
    # (B, 2, L) int64: sequence position of row b's first token of target segment (role, level)
    # at [b, role - CLEAN, level]; -1 where absent (CLEAN at the finest level). Built by
    # collate, so target indices need no host -> device copy; None: derived from n_ctx.
    target_start: Tensor | None = None

    def __post_init__(self):
        if not self.n_after:
            self.n_after = (0,) * len(self.n_ctx)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.seg_id.shape)

    def to(self, device) -> LayoutBatch:
        """The batch on `device`: from the host in one copy (`to_device`)."""
        names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]
        moved = to_device([getattr(self, n) for n in names], device)
        return LayoutBatch(**{**self.__dict__, **dict(zip(names, moved, strict=True))})

    def segment_index(self, role: int, level: int) -> Tensor:
        """(B,) index of the target segment (role, level) in each row's table; -1 if absent."""
        hit = (self.seg_role == role) & (self.seg_level == level)  # (B, S)
        idx = hit.long().argmax(dim=1)
        return torch.where(hit.any(dim=1), idx, torch.full_like(idx, -1))

    def target_index(self, role: int, level: int) -> Tensor:
        """(B, F_l) sequence positions of the target segment (role, level) in each row.

        Target segments (CLEAN below the finest level, NOISED at every level) exist in every row.
        """
        if role == CONTEXT:
            raise ValueError("context segments are not target segments")
        # Every row has the same target segments: the first row's layout says whether it exists.
        _cached_layout(self.n_ctx[0], self.frames_per_chunk, self.strides,
                       self.n_after[0]).find(role, level)
        starts = self._target_start()[:, role - CLEAN, level]  # (B,)
        F = self.frames_per_chunk[level]
        return starts[:, None] + torch.arange(F, device=starts.device)  # (B, F)

    def _target_start(self) -> Tensor:
        if self.target_start is None:  # a batch not built by collate: build it on the host
            self.target_start = to_device([_target_starts(
                self.n_ctx, self.n_after, self.frames_per_chunk, self.strides)],
                self.seg_id.device)[0]
        return self.target_start

    def context_index(self) -> tuple[Tensor, Tensor]:
        """(B, C) positions of each row's context tokens (C = longest context) and (B, C) validity.

        Context segments (before and after the target) come first in every row, so the
        positions are 0..C-1 for all rows.
        """
        per_chunk = sum(self.frames_per_chunk)
        chunks = [n + a for n, a in zip(self.n_ctx, self.n_after, strict=True)]
        C = max(chunks) * per_chunk
        dev = self.seg_id.device
        idx = torch.arange(C, device=dev).expand(len(self.n_ctx), C)
        # A row's context ends where its first target segment starts (CLEAN A, or NOISED A
        # for a one-level codec): the batch already holds that on the device.
        first = CLEAN if len(self.frames_per_chunk) > 1 else NOISED
        lens = self._target_start()[:, first - CLEAN, 0]  # (B,)
        return idx, idx < lens[:, None]

    def select(self, idx: Tensor, valid: Tensor | None = None) -> LayoutBatch:
        """The token subset idx (B, n) of every row; invalid entries become padding.

        Segment ids keep their meaning, so a subset attends to a cache of other subsets exactly
        as the full sequence would.
        """
        valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
        idx = idx.clamp(max=self.seg_id.shape[1] - 1) if self.seg_id.shape[1] else idx
        take = lambda x: x.gather(1, idx)  # noqa: E731
        return LayoutBatch(
            seg_id=torch.where(valid, take(self.seg_id), -1),
            level=torch.where(valid, take(self.level), 0),
            role=torch.where(valid, take(self.role), -1),
            pos=torch.where(valid, take(self.pos), 0.0),
            seg_level=self.seg_level,
            seg_role=self.seg_role,
            allowed=self.allowed,
            n_ctx=self.n_ctx,
            frames_per_chunk=self.frames_per_chunk,
            strides=self.strides,
            n_after=self.n_after,
            target_start=self.target_start,  # positions in the full sequence, as before
        )


def _pack(tensors: list[Tensor], pin: bool = False) -> tuple[Tensor, list[tuple]]:
    """Host tensors as one uint8 buffer (each at an 8-byte-aligned offset, so it can be viewed
    back as its dtype; pinned if `pin`) and the (offset, bytes, dtype, shape) of each."""
    spans, total = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        spans.append((total, n, t.dtype, tuple(t.shape)))
        total += -(-n // 8) * 8
    buf = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    for t, (o, n, _, _) in zip(tensors, spans, strict=True):
        buf[o : o + n] = t.contiguous().reshape(-1).view(torch.uint8)
    return buf, spans


def _unpack(buf: Tensor, spans) -> list[Tensor]:
    return [buf[o : o + n].view(dtype).view(shape) for o, n, dtype, shape in spans]


def to_device(tensors: list[Tensor], device) -> list[Tensor]:
    """Host tensors on `device` in one copy: packed into one buffer, pinned and sent
    non_blocking on CUDA (a pageable copy blocks the host and stages through a bounce buffer).
    Tensors already on `device` come back as they are; tensors elsewhere are moved one by one.
    The results share one device buffer: treat them as read-only."""
    device = torch.device(device)
    if all(t.device == device or (t.device.type == device.type == "cpu") for t in tensors):
        return list(tensors)
    if any(t.device.type != "cpu" for t in tensors):
        return [t.to(device) for t in tensors]
    cuda = device.type == "cuda"
    buf, spans = _pack(tensors, pin=cuda)
    return _unpack(buf.to(device, non_blocking=cuda), spans)


@lru_cache(maxsize=64)
def _target_row(n_ctx: int, n_after: int, fpc: tuple[int, ...], st: tuple[int, ...]) -> Tensor:
    """(2, L) int64: one row of LayoutBatch.target_start."""
    out = torch.full((2, len(fpc)), -1, dtype=torch.long)
    for s in _cached_layout(n_ctx, fpc, st, n_after).segments:
        if s.role != CONTEXT:
            out[s.role - CLEAN, s.level] = s.start
    return out


def _target_starts(n_ctx, n_after, fpc, st) -> Tensor:
    """(B, 2, L) int64 on the host: LayoutBatch.target_start."""
    return torch.stack([_target_row(n, a, fpc, st) for n, a in zip(n_ctx, n_after, strict=True)])


def collate(n_ctx, frames_per_chunk=SNAC_FRAMES, strides=SNAC_STRIDES,
            n_after=None) -> LayoutBatch:
    """Batch the layouts of rows with context counts `n_ctx` (sequence of int) and after-context
    counts `n_after` (sequence of 0/1; None = all 0), padded."""
    fpc, st = check_geometry(frames_per_chunk, strides)
    n_ctx = tuple(int(n) for n in n_ctx)
    if not n_ctx:
        raise ValueError("empty batch")
    n_after = (0,) * len(n_ctx) if n_after is None else tuple(int(a) for a in n_after)
    if len(n_after) != len(n_ctx):
        raise ValueError(f"n_after has {len(n_after)} rows, n_ctx {len(n_ctx)}")
    lays = [_cached_layout(n, fpc, st, a) for n, a in zip(n_ctx, n_after, strict=True)]
    B, N, S = len(lays), max(x.n_tokens for x in lays), max(len(x.segments) for x in lays)
    out = LayoutBatch(
        seg_id=torch.full((B, N), -1, dtype=torch.long),
        level=torch.zeros(B, N, dtype=torch.long),
        role=torch.full((B, N), -1, dtype=torch.long),
        pos=torch.zeros(B, N),
        seg_level=torch.zeros(B, S, dtype=torch.long),
        seg_role=torch.full((B, S), -1, dtype=torch.long),
        allowed=torch.zeros(B, S, S, dtype=torch.bool),
        n_ctx=n_ctx,
        frames_per_chunk=fpc,
        strides=st,
        n_after=n_after,
        target_start=_target_starts(n_ctx, n_after, fpc, st),
    )
    for b, lay in enumerate(lays):
        n, s = lay.n_tokens, len(lay.segments)
        out.seg_id[b, :n], out.level[b, :n], out.role[b, :n] = lay.seg_id, lay.level, lay.role
        out.pos[b, :n] = lay.pos
        out.seg_level[b, :s] = torch.tensor([x.level for x in lay.segments])
        out.seg_role[b, :s] = torch.tensor([x.role for x in lay.segments])
        out.allowed[b, :s, :s] = lay.allowed
    return out


@lru_cache(maxsize=64)
def _source_index(n_ctx: int, window: int, fpc: tuple[int, ...], st: tuple[int, ...],
                  n_after: int = 0, after: int = 0) -> Tensor:
    """(N,) index of each token of a layout into the level-concatenated window of `window`
    context chunks + target + `after` chunks: level l occupies
    [off_l, off_l + (window + 1 + after) * F_l)."""
    lay = _cached_layout(n_ctx, fpc, st, n_after)
    offsets = [0]
    for f in fpc:
        offsets.append(offsets[-1] + (window + 1 + after) * f)
    src = torch.empty(lay.n_tokens, dtype=torch.long)
    for s in lay.segments:
        # Context chunk c of a row with n_ctx chunks is window chunk (window - n_ctx + c): a row
        # with fewer context chunks keeps the most recent ones. The target (chunk n_ctx) is
        # window chunk `window`, the after chunk (n_ctx + 1) the one after it.
        first = offsets[s.level] + (window - n_ctx + s.chunk) * fpc[s.level]
        src[s.start : s.start + s.length] = torch.arange(first, first + s.length)
    return src


def fill_tokens(batch: LayoutBatch, windows: list[Tensor], after: int = 0) -> Tensor:
    """(B, N) token ids of the batch's sequences taken from clean windows.

    windows[l]: (B, (W + 1 + after) * F_l) int64: W context chunks, the target chunk, then
    `after` (0 or 1) after-context chunks, which rows with n_after = 0 ignore. Noised segments
    receive the clean target (the diffusion process masks them). Padding gets id 0.
    """
    fpc = batch.frames_per_chunk
    if len(windows) != len(fpc):
        raise ValueError(f"expected {len(fpc)} levels of tokens, got {len(windows)}")
    if max(batch.n_after) > after:
        raise ValueError(f"rows need {max(batch.n_after)} after-context chunks, windows hold {after}")
    B = batch.seg_id.shape[0]
    W = windows[0].shape[-1] // fpc[0] - 1 - after
    for lvl, (w, f) in enumerate(zip(windows, fpc, strict=True)):
        if w.ndim != 2 or w.shape[0] != B or w.shape[1] != (W + 1 + after) * f:
            raise ValueError(
                f"level {lvl}: expected shape ({B}, {(W + 1 + after) * f}), got {tuple(w.shape)}"
            )
    if W < 0 or max(batch.n_ctx) > W:
        raise ValueError(f"windows hold {W} context chunks, batch needs {max(batch.n_ctx)}")
    cat = torch.cat(windows, dim=1)  # (B, (W + 1 + after) * sum F)
    src = torch.zeros(batch.seg_id.shape, dtype=torch.long)  # (B, N) on the host, copied once
    for b, (n, a) in enumerate(zip(batch.n_ctx, batch.n_after, strict=True)):
        s = _source_index(n, W, fpc, batch.strides, a, after)
        src[b, : s.shape[0]] = s
    (src,) = to_device([src], cat.device)
    return torch.where(batch.seg_id >= 0, cat.gather(1, src), 0)
