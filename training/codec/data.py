"""Audio segments for codec training: random crops of audio files, a whole batch per step.

The batch for step s is a pure function of (seed, s): file chosen with probability proportional
to its duration, offset uniform. So the "data position" of an exact resume is just the step
number, and DataLoader workers (any number, any prefetch) cannot change what a step sees.

Training crops are read with soundfile at an offset (no full-file decode per crop) and resampled
with soxr; whole-file reads (validation) go through `audio.read_audio`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from audio import AudioFile, is_audio_name, read_audio, read_segment


def _manifest_files(manifest: Path) -> list[Path]:
    """Kept tracks of a corpus manifest (training.corpus.debian_music), paths relative to it."""
    out = []
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("status", "kept") == "kept" and row.get("output_path"):
            out.append(manifest.parent / row["output_path"])
    return out


def find_audio_files(sources: list[str]) -> list[Path]:
    """Directories (searched recursively), audio files, or manifest.jsonl files -> sorted paths."""
    found: set[Path] = set()
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found.update(f for f in p.rglob("*") if is_audio_name(f))
        elif p.is_file() and p.suffix == ".jsonl":
            found.update(_manifest_files(p))
        elif p.is_file():
            found.add(p)
        else:
            raise FileNotFoundError(f"training data source {src!r} does not exist")
    return sorted(found)


def split_train_val(files: list[AudioFile], n_val: int) -> tuple[list[AudioFile], list[AudioFile]]:
    """Hold out n_val files (at most a fifth of them) chosen by a hash of their path: stable
    as the corpus grows."""
    if len(files) < 2 or n_val <= 0:
        return files, []
    n_val = min(n_val, max(1, len(files) // 5))
    ranked = sorted(files, key=lambda f: hashlib.sha256(f.path.encode()).hexdigest())
    val = set(f.path for f in ranked[:n_val])
    return [f for f in files if f.path not in val], [f for f in files if f.path in val]


class SegmentBatches(Dataset):
    """Map-style dataset indexed by step: item s is the (B, 1, T) batch for training step s.

    `stage(step) -> (n_samples, batch_size)` carries the segment-length curriculum.
    """

    def __init__(self, files: list[AudioFile], sample_rate: int, stage, n_steps: int,
                 seed: int = 0, min_rms: float = 1e-3, retries: int = 8):
        if not files:
            raise ValueError("no training audio files")
        self.files, self.sample_rate, self.stage = files, sample_rate, stage
        self.n_steps, self.seed, self.min_rms, self.retries = n_steps, seed, min_rms, retries
        weights = np.array([f.seconds for f in files], dtype=np.float64)
        self.p = weights / weights.sum()

    def __len__(self) -> int:
        return self.n_steps

    def _one(self, rng: np.random.Generator, n_samples: int) -> np.ndarray:
        for _ in range(self.retries):
            f = self.files[rng.choice(len(self.files), p=self.p)]
            n_native = math.ceil(n_samples * f.sample_rate / self.sample_rate)
            start = int(rng.integers(0, max(1, f.frames - n_native + 1)))
            seg = read_segment(f, start, n_samples, self.sample_rate)
            if np.sqrt(np.mean(seg**2)) >= self.min_rms:
                break  # keep silent draws only if every retry was silent
        return seg

    def __getitem__(self, step: int) -> torch.Tensor:
        n_samples, batch = self.stage(step)
        rng = np.random.default_rng([self.seed, int(step)])
        segs = np.stack([self._one(rng, n_samples) for _ in range(batch)])
        return torch.from_numpy(segs).unsqueeze(1)               # (B, 1, T)


class StepSampler(torch.utils.data.Sampler):
    """Yields step indices start..end-1: a resumed run continues at its saved step."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def load_val_segments(files: list[AudioFile], sample_rate: int, n_samples: int) -> list[torch.Tensor]:
    """One (1, 1, n_samples) segment from the middle of each held-out file (zero-padded if short)."""
    out = []
    for f in files:
        audio = read_audio(f.path, sample_rate)
        start = max(0, (len(audio) - n_samples) // 2)
        seg = np.zeros(n_samples, dtype=np.float32)
        piece = audio[start: start + n_samples]
        seg[: len(piece)] = piece
        out.append(torch.from_numpy(seg).view(1, 1, -1))
    return out
