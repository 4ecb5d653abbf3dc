"""Which windows a training batch holds: `WindowBatchSampler`, deterministic and resumable.

Batch k of epoch e is a pure function of (seed, e, k): epochs are keyed pseudo-random
permutations of all windows (`permute`, a Feistel network in O(1) memory, so 10^8+ windows
shuffle without a permutation table), the n_ctx layout of a sample (or of a whole batch) is
drawn by weight from a keyed hash (`mix64`, `hash_key`, which `TokenWindows` also uses to
draw a context kind), and a trainer resumes exactly from the `data_state` of the last batch it
trained on. The windows themselves are `training/tokens/windows.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from torch.utils.data import Sampler

if TYPE_CHECKING:
    from training.tokens.windows import TokenWindows


class WindowKey(NamedTuple):
    """What `WindowBatchSampler` yields: the window plus the sampler position after its batch."""

    index: int
    epoch: int
    position: int  # batches of this epoch done once this key's batch is consumed


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-mixing uint64 -> uint64 hash (vectorised; wraps)."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def mix64_int(x: int) -> int:
    """mix64 on one Python int (no numpy scalar overhead: keys are derived per batch)."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def hash_key(*parts: int) -> int:
    """A 64-bit key mixed from ints, in order (seeds, epochs, indices, salts)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = mix64_int(h ^ (p & 0xFFFFFFFFFFFFFFFF))
    return h


def permute(x: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed pseudo-random bijection of [0, n) applied to x, in O(1) memory.

    An 8-round Feistel network on the smallest even bit width covering n, with cycle walking
    (re-apply until the value lands below n: a bijection restricted to [0, n) stays one; fewer
    than 4 rounds of walking on average). Lets an epoch over 10^8+ windows be shuffled without
    materialising a permutation.
    """
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(x)
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    round_keys = [np.uint64(hash_key(key, r)) for r in range(8)]

    def feistel(v):
        left, right = v >> half, v & mask
        for k in round_keys:
            left, right = right, left ^ (mix64(right ^ k) & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):
        out = feistel(x)
        todo = out >= np.uint64(n)
        while todo.any():
            out[todo] = feistel(out[todo])
            todo = out >= np.uint64(n)
    return out


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # batches of `epoch` already produced


class WindowBatchSampler(Sampler):
    """Deterministic batches of `WindowKey`s; batch k of epoch e is a pure function of (seed, e, k).

    One iteration = the rest of the current epoch; then the epoch advances. Epoch e is a
    pseudo-random permutation of all windows (shuffle=True), or the windows in order. With
    `n_ctx_weights` (one weight per n_ctx value of the dataset) each sample first draws its
    n_ctx value by weight, then a window of that value (still a pure function of the position).
    With `uniform_layout` the draw is made once per (global) batch instead: every row of a batch
    has the same layout, so `collate_windows` pads nothing. The share of each layout over many
    batches is the same; a mixed batch costs the compute of its longest row in every row (the
    demo run's one-chunk stage: 6.3 s a step mixed, 4.5 s uniform).

    Exact resume: the DataLoader runs ahead of training (prefetch, workers), so the sampler's own
    counter is not where training is. Save `batch["data_state"]` (the position after the batch you
    trained on) and `load_state_dict` it into a fresh sampler before building the loader.

    Distributed: every rank builds the same sampler with its rank / world_size; position k is one
    global batch of batch_size * world_size windows, of which each rank takes its slice.
    """

    def __init__(self, dataset: TokenWindows, batch_size: int, seed: int = 0, shuffle: bool = True,
                 n_ctx_weights=None, epoch_length: int | None = None, rank: int = 0,
                 world_size: int = 1, uniform_layout: bool = False):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError("need batch_size >= 1 and 0 <= rank < world_size")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.uniform_layout = bool(uniform_layout)
        self.sizes = [hi - lo for lo, hi in dataset.ranges.values()]
        self.offsets = [lo for lo, _ in dataset.ranges.values()]
        if n_ctx_weights is not None:
            w = np.asarray(n_ctx_weights, dtype=np.float64)
            if w.shape != (len(self.sizes),) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"n_ctx_weights needs {len(self.sizes)} non-negative weights, got {n_ctx_weights}")
            if any(wi > 0 and n == 0 for wi, n in zip(w, self.sizes, strict=True)):
                raise ValueError(f"a weighted n_ctx value has no windows (sizes {self.sizes})")
            self.cum_weights = np.cumsum(w / w.sum())
        else:
            self.cum_weights = None
        self.epoch_length = len(dataset) if epoch_length is None else int(epoch_length)
        self.global_batch = batch_size * world_size
        if self.epoch_length < self.global_batch:
            raise ValueError(f"{self.epoch_length} windows per epoch cannot fill one batch of "
                             f"{self.global_batch}; the split is too small for this batch size")
        self.state = SamplerState()

    def __len__(self) -> int:
        return self.epoch_length // self.global_batch  # batches per epoch; the remainder is dropped

    def state_dict(self) -> dict:
        return dict(epoch=self.state.epoch, position=self.state.position, seed=self.seed)

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this sampler has {self.seed}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if position >= len(self):  # saved after an epoch's last batch: resume at the next epoch
            epoch, position = epoch + 1, 0
        self.state = SamplerState(epoch, position)

    def indices(self, epoch: int, ordinals: np.ndarray) -> np.ndarray:
        """Window indices of sample ordinals (0 .. epoch_length-1) of `epoch`."""
        o = np.asarray(ordinals, dtype=np.int64)
        n = len(self.dataset)
        if self.cum_weights is None:
            if not self.shuffle:
                return o % n
            cycle = o // n  # epoch_length > n: later passes get their own permutation
            out = np.empty_like(o)
            for c in np.unique(cycle):
                sel = cycle == c
                out[sel] = permute(o[sel] % n, n, hash_key(self.seed, epoch, int(c))).astype(np.int64)
            return out
        # The layout draw: per sample, or per global batch (every row of a batch alike).
        draw = o // self.global_batch if self.uniform_layout else o
        with np.errstate(over="ignore"):
            u = mix64(draw.astype(np.uint64) ^ np.uint64(hash_key(self.seed, epoch, 1 << 40))) >> np.uint64(11)
        group = np.searchsorted(self.cum_weights, u.astype(np.float64) / 2.0**53, side="right")
        group = np.minimum(group, len(self.sizes) - 1)
        out = np.empty_like(o)
        for g in np.unique(group):
            sel = group == g
            size = self.sizes[g]
            local = o[sel] % size
            if self.shuffle:
                local = permute(local, size, hash_key(self.seed, epoch, 1 << 41, int(g))).astype(np.int64)
            out[sel] = self.offsets[g] + local
        return out

    def __iter__(self):
        epoch, start = self.state.epoch, self.state.position
        chunk = 64  # batches whose indices are computed in one vectorised call
        for c0 in range(start, len(self), chunk):
            positions = np.arange(c0, min(c0 + chunk, len(self)))
            first = positions * self.global_batch + self.rank * self.batch_size
            ordinals = (first[:, None] + np.arange(self.batch_size)).reshape(-1)
            rows = self.indices(epoch, ordinals).reshape(len(positions), self.batch_size)
            for position, row in zip(positions.tolist(), rows.tolist(), strict=True):
                self.state = SamplerState(epoch, position + 1)
                yield [WindowKey(i, epoch, position + 1) for i in row]
        self.state = SamplerState(epoch + 1, 0)
