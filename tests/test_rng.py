"""RNG capture/restore across machines of another shape (training/run/rng.py)."""

import pytest
import torch

import training.run.rng as rng


def test_resume_on_fewer_gpus_restores_the_ones_it_has(monkeypatch):
    # A checkpoint written where 4 GPUs were visible, resumed where 2 are.
    state = rng.capture_rng()
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    state["cuda"] = saved
    restored = {}

    def set_state(new_state, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= 2:
            raise IndexError(f"invalid device {index}")  # what CUDA says for a missing GPU
        restored[index] = new_state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)
    rng.restore_rng(state)
    assert sorted(restored) == [0, 1] and all(restored[i] is saved[i] for i in (0, 1))


def test_round_trip_on_this_machine():
    state = rng.capture_rng()
    a = torch.rand(3)
    rng.restore_rng(state)
    assert torch.equal(torch.rand(3), a)
    with pytest.raises(KeyError):
        rng.restore_rng({})
