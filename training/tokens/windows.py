"""Windows of SNAC tokens for training, read from a token directory (training/tokens/shards.py).

A window is n_ctx context chunks + 1 target chunk (+ n_after after-context chunks, for editing)
of one file, every level: level l holds (n_ctx + 1 + n_after) * F_l tokens (F = 64/128/256/512 per chunk for SNAC 32 kHz). Window starts lie on
the codec's padding grid (4 coarse frames = 0.384 s), so every level starts on a whole token and
a window is exactly what an encode of the whole file gives there (tokenizer.py: pieces). Windows never cross files; files shorter than a window give none.

Indexing is flat and deterministic: `dataset.window(i)` says which file/start/n_ctx item i is,
`dataset[i]` reads it. `WindowBatchSampler` (training/tokens/sampling.py) turns (seed, epoch,
position) into batches with O(1) memory, so a trainer resumes exactly by saving
`batch["data_state"]` (see the class).

Contexts. Inference gives the model two kinds of context: `/continue` (and the first `/extend`
chunk) encodes the context audio alone, whose tokens differ from whole-file tokens near both
ends (SNAC's encoder is non-causal); later `/extend` chunks see the model's own generated
tokens, which it learned to produce as whole-file tokens. Each window with context therefore
draws a kind (`contexts` weights, a pure function of index and epoch):

    encoded    the context as an encode of its audio alone: the whole-file tokens with both
               border stretches replaced by tile encodes (training/tokens/shards.py "Tiles")
    mixed      the second /extend chunk: the older chunk encoded (its end bordered), the newer
               one generated; with one context chunk this is `generated`
    generated  the whole-file tokens

Borders come from tiles, so an encoded or mixed window starts on the tile grid (1.536 s for
SNAC 32 kHz): the drawn start is moved back to it, uniformly over the aligned windows. Away
from pieces (tokenize.py) `encoded` equals `Codec.encode(context audio)` exactly (tested).

Shards are memory-mapped lazily, per process (DataLoader workers open their own maps). Each map
holds a file descriptor, so a directory of more than `max_open_shards` shards is read with one
`pread` per level and window instead (no descriptor kept; about 3x slower, still far above what
a GPU consumes).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from training.tokens.sampling import (  # noqa: F401 - the sampler and permute re-exported
    WindowBatchSampler,
    WindowKey,
    hash_key,
    permute,
)
from training.tokens.shards import read_manifest

CONTEXT_KINDS = ("encoded", "mixed", "generated")
DEFAULT_CONTEXTS = (0.5, 0.25, 0.25)  # /continue and the first /extend chunk, the second, later


class WindowRef(NamedTuple):
    n_ctx: int
    file: int  # index into dataset.files
    start: int  # first coarse frame (level 0) of the window, a multiple of dataset.grid
    context: str = "generated"  # CONTEXT_KINDS; for n_ctx = 0 always "generated"
    n_after: int = 0  # after-context chunks (0 or 1), whole-file tokens


class TokenWindows(Dataset):
    """Fixed-length token windows of one split of a token directory.

    n_ctx: an int or a sequence of ints (a mix: the index space is the concatenation of each
        value's windows); a value may also be a pair (n_ctx, n_after) for windows with an
        after-context chunk (editing layouts, DESIGN §2). Otherwise as before:
        value's windows, in the given order; `ranges[n]` says where value n lives).
    expected_fingerprint: refuse a directory tokenised by another codec (`Codec.fingerprint`).
    start_step: window starts every `start_step` grid steps (1 = every 0.384 s; windows overlap,
        which is the point: every shift of the music is a distinct sample).
    max_open_shards: memory-map at most this many shards (x levels descriptors per process);
        larger directories are read by pread.
    contexts: weights of CONTEXT_KINDS (encoded, mixed, generated); None = DEFAULT_CONTEXTS,
        or all generated for a directory tokenised without tiles. A directory without tiles
        refuses a positive encoded/mixed weight.
    """

    def __init__(self, token_dir: str | os.PathLike, split: str = "train", n_ctx=2,
                 expected_fingerprint: str | None = None, start_step: int = 1,
                 max_open_shards: int = 256, contexts=None):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        # An int, or a sequence of ints and (n_ctx, n_after) pairs: (1, 2) is two values, a
        # single pair is given as [(1, 1)].
        values = (n_ctx,) if isinstance(n_ctx, int) else tuple(n_ctx)
        self.n_ctx_values = tuple(v if isinstance(v, int) else tuple(int(x) for x in v)
                                  for v in values)
        self._shapes = {v: (v, 0) if isinstance(v, int) else v for v in self.n_ctx_values}
        if (not self.n_ctx_values or len(set(self.n_ctx_values)) != len(self.n_ctx_values)
                or any(len(sh) != 2 or sh[0] < 0 or sh[1] not in (0, 1)
                       for sh in self._shapes.values())):
            raise ValueError(f"n_ctx must be distinct non-negative ints or (n_ctx, n_after) pairs "
                             f"with n_after 0 or 1, got {n_ctx!r}")
        if start_step < 1:
            raise ValueError("start_step must be at least 1")
        self.token_dir = os.fspath(token_dir)
        manifest = read_manifest(token_dir, expected_fingerprint)
        geo = manifest["codec"]["geometry"]
        self.fingerprint = manifest["codec"]["fingerprint"]
        self.strides = tuple(geo["strides"])
        self.frames_per_chunk = tuple(geo["frames_per_chunk"])
        self.n_levels = len(self.strides)
        self.grid = int(geo["pad_frames"][0])  # coarse frames per padding unit (4)
        self.step = self.grid * start_step
        self.split = split
        self.files = [f for f in manifest["files"] if split == "all" or f["split"] == split]
        self.shard_levels = {s["id"]: s["levels"] for s in manifest["shards"]}
        self.tiles = manifest.get("tiles")
        if self.tiles is not None:
            self.shard_levels.update({(s["id"], "tiles"): s["tiles"] for s in manifest["shards"]})
        if contexts is None:
            contexts = DEFAULT_CONTEXTS if self.tiles else (0.0, 0.0, 1.0)
        w = np.asarray(contexts, dtype=np.float64)
        if w.shape != (3,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"contexts needs 3 non-negative weights ({', '.join(CONTEXT_KINDS)}) "
                             f"with a positive sum, got {contexts!r}")
        if self.tiles is None and w[:2].sum() > 0:
            raise ValueError(
                f"{token_dir} was tokenised without context tiles, so it cannot give encoded or "
                "mixed contexts; re-tokenise it (python -m training.tokens) or use contexts "
                "= [0, 0, 1]")
        self.contexts = tuple(float(x) for x in w / w.sum())
        self._context_cum = np.cumsum(self.contexts).tolist()
        # Border stretch and tile length, in coarse frames (level 0).
        if self.tiles is not None:
            self._border = int(self.tiles["border_units"]) * self.grid
            self._tile = int(self.tiles["units"]) * self.grid
            if self.frames_per_chunk[0] % self._tile:
                raise ValueError(f"tiles of {self._tile} frames do not divide a chunk")
        # Memory maps are fastest (~2 us a slice) but each holds a file descriptor. Random
        # windows from more shards than fit would thrash any cache of maps, so past
        # `max_open_shards` every read is one pread instead (~20 us, nothing kept open).
        self.use_maps = len(self.shard_levels) <= max_open_shards
        self._headers: dict = {}

        # Plain Python per-file (shard, offsets): the read path does no numpy scalar indexing.
        self._where = [(int(f["shard"]), tuple(int(o) for o in f["offsets"])) for f in self.files]
        self._scales = tuple(self.strides[0] // s for s in self.strides)
        self._n_frames = np.array([f["n_frames"] for f in self.files], dtype=np.int64)
        # Per n_ctx value: cumulative window counts over files, for index -> (file, start).
        self._cum, self.ranges, lo = {}, {}, 0
        for n in self.n_ctx_values:
            span = (sum(self._shapes[n]) + 1) * self.frames_per_chunk[0]
            counts = np.where(self._n_frames >= span, (self._n_frames - span) // self.step + 1, 0)
            self._cum[n] = np.concatenate([[0], np.cumsum(counts)])
            self.ranges[n] = (lo, lo + int(self._cum[n][-1]))
            lo = self.ranges[n][1]
        self._len = lo
        self._maps: dict = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._len

    def window(self, index: int, epoch: int = 0) -> WindowRef:
        """Which window item `index` is; its context kind is drawn from (index, epoch)."""
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        for n in self.n_ctx_values:
            lo, hi = self.ranges[n]
            if index < hi:
                cum = self._cum[n]
                i = index - lo
                f = int(np.searchsorted(cum, i, side="right")) - 1
                n_ctx, n_after = self._shapes[n]
                ref = WindowRef(n_ctx, f, int(i - cum[f]) * self.step, n_after=n_after)
                return self._with_context(ref, index, epoch)
        raise AssertionError("unreachable")

    def _with_context(self, ref: WindowRef, index: int, epoch: int) -> WindowRef:
        if ref.n_ctx == 0 or self.tiles is None:
            return ref
        u = hash_key(index, epoch, 0xC0) / 2.0**64
        kind = next((k for k, c in zip(CONTEXT_KINDS, self._context_cum, strict=True) if u < c),
                    "generated")
        if kind == "mixed" and ref.n_ctx < 2:
            kind = "generated"               # one context chunk: /extend's later chunks
        if kind == "generated":
            return ref
        return ref._replace(start=ref.start - ref.start % self._tile, context=kind)

    def _level_map(self, shard, level: int) -> np.ndarray:
        """shard: an id (whole-file tokens) or (id, "tiles")."""
        if self._pid != os.getpid():  # forked into a worker: maps are per process
            self._maps, self._pid = {}, os.getpid()
        m = self._maps.get((shard, level))
        if m is None:
            # A plain ndarray view of the map: slicing a np.memmap costs ~10x more per call.
            path = os.path.join(self.token_dir, self.shard_levels[shard][level])
            m = self._maps[(shard, level)] = np.load(path, mmap_mode="r").view(np.ndarray)
        return m

    def _pread(self, shard, level: int, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of a shard level by one pread: no descriptor kept open."""
        key = (shard, level)
        head = self._headers.get(key)
        if head is None:
            path = os.path.join(self.token_dir, self.shard_levels[shard][level])
            with open(path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if major == 1
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                if len(shape) != 1 or dtype.itemsize != 2 or dtype.kind != "u":
                    raise ValueError(f"{path}: expected a 1-D uint16 array, got {dtype} {shape}")
                head = self._headers[key] = (path, f.tell(), dtype)
        path, data_offset, dtype = head
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = os.pread(fd, 2 * n, data_offset + 2 * start)
        finally:
            os.close(fd)
        return np.frombuffer(buf, dtype=dtype)

    def read(self, ref: WindowRef) -> list[torch.Tensor]:
        """Per level int64 tokens ((n_ctx + 1 + n_after) * F_l,) of one window."""
        shard, offsets = self._where[ref.file]
        get = (lambda sh, lv, a, n: self._level_map(sh, lv)[a:a + n]) if self.use_maps \
            else self._pread
        # Border stretches [from, to) in level-0 frames relative to the window start.
        if ref.context == "encoded":
            ctx_end = ref.n_ctx * self.frames_per_chunk[0]
            borders = ((0, self._border), (ctx_end - self._border, ctx_end))
        elif ref.context == "mixed":
            older_end = (ref.n_ctx - 1) * self.frames_per_chunk[0]
            borders = ((older_end - self._border, older_end),)
        else:
            borders = ()
        out = []
        for level, (scale, F) in enumerate(zip(self._scales, self.frames_per_chunk, strict=True)):
            a, n = offsets[level] + ref.start * scale, (ref.n_ctx + 1 + ref.n_after) * F
            tokens = get(shard, level, a, n).astype(np.int64)
            for lo, hi in borders:
                tokens[lo * scale:hi * scale] = get((shard, "tiles"), level, a + lo * scale,
                                                    (hi - lo) * scale)
            out.append(torch.from_numpy(tokens))
        return out

    def __getitem__(self, key) -> dict:
        """int or WindowKey -> dict(tokens=[(n_ctx+1)*F_l int64 per level], n_ctx, index[, data_state])."""
        index = key.index if isinstance(key, WindowKey) else int(key)
        ref = self.window(index, key.epoch if isinstance(key, WindowKey) else 0)
        item = dict(tokens=self.read(ref), n_ctx=ref.n_ctx, index=index, context=ref.context,
                    n_after=ref.n_after)
        if isinstance(key, WindowKey):
            item["data_state"] = dict(epoch=key.epoch, position=key.position)
        return item

    def __getstate__(self):  # spawn-started workers: ship no open maps
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def describe(self) -> dict:
        return dict(
            split=self.split, files=len(self.files), windows=self._len,
            windows_per_n_ctx={n: hi - lo for n, (lo, hi) in self.ranges.items()},
            contexts=dict(zip(CONTEXT_KINDS, self.contexts, strict=True)),
            hours=sum(f["duration"] for f in self.files) / 3600,
        )


def collate_windows(items: list[dict], pad_id: int = -1) -> dict:
    """Stack dataset items into a batch.

    tokens: per level (B, (W + 1 + A) * F_l) int64 with W = the batch's largest n_ctx and A its
        largest n_after. Rows with fewer context chunks are LEFT-padded with `pad_id`, so the
        target is always chunk W and a row's context chunks are the most recent ones: what
        `model.layout.fill_tokens` reads (it never touches the padding). Rows without the after
        chunk of an A = 1 batch are right-padded.
    n_ctx, n_after: (B,) int64. index: (B,) int64. data_state: the sampler position after this
        batch (from the last item; present when the batch came from WindowBatchSampler).
    """
    if not items:
        raise ValueError("empty batch")
    n_ctx = [it["n_ctx"] for it in items]
    n_after = [it.get("n_after", 0) for it in items]
    W, A = max(n_ctx), max(n_after)
    tokens = []
    for level in range(len(items[0]["tokens"])):
        F = items[0]["tokens"][level].shape[0] // (n_ctx[0] + 1 + n_after[0])
        # Built in numpy: torch.full/stack go through intra-op threads, slow for this size.
        out = np.full((len(items), (W + 1 + A) * F), pad_id, dtype=np.int64)
        for row, (it, n) in enumerate(zip(items, n_ctx, strict=True)):
            t = it["tokens"][level].numpy()
            lo = (W - n) * F
            out[row, lo:lo + t.shape[0]] = t
        tokens.append(torch.from_numpy(out))
    batch = dict(tokens=tokens, n_ctx=torch.tensor(n_ctx, dtype=torch.int64),
                 n_after=torch.tensor(n_after, dtype=torch.int64),
                 index=torch.tensor([it["index"] for it in items], dtype=torch.int64))
    if "data_state" in items[-1]:
        batch["data_state"] = items[-1]["data_state"]
    return batch
