"""Encoding audio into tokens in pieces, as one pass over each whole file would give.

Long files are encoded in pieces (default one chunk, 6.144 s), each with the encoder's reach of
the file's own audio on either side (`Codec.border_samples`), keeping only the piece's own
tokens: the tokens of a single pass over the file at the speed of short encodes. Pieces of
equal padded length share an encode call; a GPU out-of-memory halves the call instead of ending
the run. Context tiles (`training.tokens.directory.tile_plan`) are encoded the same way, without
borders.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import torch

from model.codec import Codec
from training.tokens import shards
from training.tokens.directory import TokenizeError


def encode_files(codec: Codec, audios: list[np.ndarray], piece_samples: int, batch_size: int,
                 on_batch=None, border_samples: int = 0) -> list[list[np.ndarray]]:
    """Per file, per level uint16 tokens of `audios` (each (T,) float32 at the codec rate).

    Files are cut into pieces of `piece_samples` (a multiple of `codec.pad_samples`). Each piece
    is encoded with up to `border_samples` (a multiple of the grid) of the file's own audio on
    either side, and only its own tokens are kept: with a border of `codec.border_samples` the
    result is a single pass over the whole file, at the speed of short encodes. Pieces with the
    same padded length share an encode batch. `on_batch(file_indices, piece_lengths)` is called
    after each batch (progress).
    """
    grid = codec.pad_samples
    if piece_samples % grid or border_samples % grid or border_samples < 0:
        raise ValueError(f"piece ({piece_samples}) and border ({border_samples}) samples must be "
                         f"multiples of the codec's grid ({grid})")
    # bucket by padded length: (file, piece, audio with borders, left border, piece length)
    buckets: dict[int, list[tuple[int, int, np.ndarray, int, int]]] = collections.defaultdict(list)
    pieces: list[list] = []
    for i, audio in enumerate(audios):
        n = max(1, math.ceil(audio.shape[0] / piece_samples))
        pieces.append([None] * n)
        for k in range(n):
            start = k * piece_samples
            end = min(start + piece_samples, audio.shape[0])
            lo, hi = max(0, start - border_samples), min(audio.shape[0], end + border_samples)
            seg = audio[lo:hi]
            buckets[codec.padded_length(seg.shape[0])].append((i, k, seg, start - lo, end - start))
    for length in sorted(buckets):
        bucket = buckets[length]
        for b in range(0, len(bucket), batch_size):
            batch = bucket[b:b + batch_size]
            x = np.zeros((len(batch), length), dtype=np.float32)  # (B, T): the codec's own zero pad
            for row, (_, _, seg, _, _) in enumerate(batch):
                x[row, :seg.shape[0]] = seg
            codes = _encode_rows(codec, x)  # per level (B, n_l) uint16
            for row, (i, k, _, left, n_own) in enumerate(batch):
                units, own = left // grid, codec.padded_length(n_own) // grid
                pieces[i][k] = [c[row, units * f:(units + own) * f]
                                for c, f in zip(codes, codec.pad_frames, strict=True)]
            if on_batch is not None:
                on_batch([i for i, *_ in batch], [n_own for *_, n_own in batch])
    return [[np.concatenate([p[lvl] for p in file_pieces]) for lvl in range(codec.n_levels)]
            for file_pieces in pieces]


def _encode_rows(codec: Codec, x: np.ndarray) -> list[np.ndarray]:
    """Encode (B, T); on GPU out-of-memory, retry in halves rather than give up the run."""
    try:
        codes = codec.encode(torch.from_numpy(x))
    except torch.OutOfMemoryError as e:
        if x.shape[0] == 1:
            raise TokenizeError(
                f"out of GPU memory encoding a single piece of {x.shape[1] / codec.sample_rate:g} s; "
                "use a smaller --piece-seconds"
            ) from e
        torch.cuda.empty_cache()
        half = x.shape[0] // 2
        parts = _encode_rows(codec, x[:half]), _encode_rows(codec, x[half:])
        return [np.concatenate(p) for p in zip(*parts, strict=True)]
    return [c.cpu().numpy().astype(shards.TOKEN_DTYPE) for c in codes]
