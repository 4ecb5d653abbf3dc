"""Every RNG a training step may touch: seed, capture (as `weights_only`-loadable types), restore.

Both trainers store this in their checkpoints, so a resumed run draws the same numbers as an
uninterrupted one (their resume tests compare weights bit for bit).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's key as a tensor: torch.load(weights_only=True) refuses numpy arrays.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    # torch.load gives lists where random.getstate() had tuples.
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the saving process could see; a resume may see fewer (a smaller
        # node, CUDA_VISIBLE_DEVICES) or more. Restore the devices both have; the rest keep
        # their seeds (set_rng_state_all would index devices that do not exist here).
        states = state["cuda"]
        for i in range(min(len(states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(states[i], device=i)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too
