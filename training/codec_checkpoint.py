"""Atomic, exactly-resumable training checkpoints.

A checkpoint holds everything that decides the next step: model + discriminator weights, both
optimisers and schedulers, the step (which is also the data position: batches are a pure
function of (seed, step), see codec_data), every RNG state (SNAC's NoiseBlocks draw from
torch's global RNG), and the config it was trained with. N straight steps and N/2 + resume +
N/2 give bit-identical weights on CPU (tests/test_codec_training.py).

Files are written to a temp name in the same directory and `os.replace`d: a crash or a kill
mid-write leaves the previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt_(\d{9})\.pt$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"ckpt_{step:09d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) sorted by step; temp files and strangers are ignored."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(ckpt_dir: Path, step: int, payload: dict, keep_last: int) -> Path:
    """Write atomically, then delete all but the newest `keep_last` checkpoints."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(ckpt_dir, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    torch.save({**payload, "step": step, "rng": rng_state()}, tmp)
    os.replace(tmp, final)
    for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def load_checkpoint(path: Path) -> dict:
    # weights_only=False: the RNG states hold numpy/python objects. Only load checkpoints you
    # wrote (a pickle can run code).
    return torch.load(path, map_location="cpu", weights_only=False)
