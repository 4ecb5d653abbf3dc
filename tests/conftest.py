"""Shared fixtures: a tiny random-init SNAC with the real 32 kHz geometry, saved once per session.

Nothing here downloads: the debug codec is `snac.SNAC` built from DEBUG_CODEC_CONFIG (real rates
and strides, tiny widths), so every test runs the real codec code path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.codec import DEBUG_CODEC_CONFIG, Codec


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Every test works on tiny tensors, where OpenMP threads cost more than they give; on a
    # 2-core machine they also spin against the server/engine threads some tests start
    # (measured up to 30x slower). Subprocesses keep torch's default.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def debug_codec() -> Codec:
    return Codec.load(DEBUG_CODEC_CONFIG, seed=0)


@pytest.fixture(scope="session")
def debug_codec_dir(tmp_path_factory, debug_codec) -> str:
    return str(debug_codec.save(tmp_path_factory.mktemp("debug_codec")))


@pytest.fixture(scope="session")
def debug_weights_dir(tmp_path_factory) -> str:
    """A saved debug-preset DiT (random init, seeded): what the server and engine tests load."""
    from model.dit import DiT, DiTConfig
    from model.weights import save_pretrained

    torch.manual_seed(0)
    dit = DiT(DiTConfig.from_name("debug"))
    out = tmp_path_factory.mktemp("debug_dit")
    save_pretrained(dit, out)
    return str(out)


def tone(
    seconds: float,
    sample_rate: int = 32000,
    freq: float = 440.0,
    amp: float = 0.3,
    noise: float = 0.01,
) -> np.ndarray:
    """A sine with a little noise: deterministic, non-silent test audio."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    rng = np.random.default_rng(int(freq))
    return (amp * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(t.shape)).astype(
        np.float32
    )
