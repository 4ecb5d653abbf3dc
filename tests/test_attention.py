"""Backend choice and dtype handling of `model.attention.attention` (no kernel launches here:
the kernel's numerics are tests/test_block_attention.py)."""

import logging

import pytest
import torch

import model.attention as attn
from model.attention_rule import attention_ref


def problem(D=16, dtype=torch.float32, N=24):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, D, generator=g).to(dtype) for _ in range(3))
    seg = torch.tensor([[0] * 8 + [1] * 8 + [-1] * (N - 16)])
    allowed = torch.tensor([[True, False], [True, True]])
    return q, k, v, seg, allowed


def test_auto_reasons_per_call_and_logs_each_choice_once(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_logged", set())
    caplog.set_level(logging.INFO, logger="model.attention")
    with attn.attention_backend("auto"):
        for D, dtype in ((24, torch.float16), (24, torch.float16), (16, torch.float32),
                         (16, torch.float16)):
            q, k, v, seg, allowed = problem(D, dtype)
            out = attn.attention(q, k, v, seg, seg, allowed)
            torch.testing.assert_close(out, attention_ref(q, k, v, seg, seg, allowed),
                                       atol=2e-3, rtol=2e-3)
    chosen = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(chosen) == 3, chosen  # the repeated call logs nothing new
    assert "head dim 24" in chosen[0] and "float32" in chosen[1] and "cpu tensors" in chosen[2]
    assert all(c.startswith("attention backend sdpa") for c in chosen)


def test_kernel_unsupported_reasons():
    half = lambda D: problem(D, torch.float16)[:3]  # noqa: E731
    assert "head dim 24" in attn.kernel_unsupported(*half(24))
    assert "head dim 512" in attn.kernel_unsupported(*half(512))
    assert "float32" in attn.kernel_unsupported(*problem(64)[:3])
    assert "cpu" in attn.kernel_unsupported(*half(64))


def test_old_triton_is_refused_loudly(monkeypatch, caplog):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    monkeypatch.setattr(attn, "_triton_fn", None)
    monkeypatch.setattr(attn, "_triton_error", None)
    caplog.set_level(logging.WARNING, logger="model.attention")
    assert attn._load_triton() is None
    assert "3.4" in str(attn._triton_error)
    assert any("unavailable" in r.getMessage() and "3.3.1" in r.getMessage()
               for r in caplog.records)
    q, k, v, seg, allowed = problem(16, torch.float16)
    with attn.attention_backend("triton"), pytest.raises(RuntimeError, match="3.4") as info:
        attn.attention(q, k, v, seg, seg, allowed)
    assert isinstance(info.value.__cause__, ImportError)


def test_compute_dtype_follows_autocast_then_v():
    q, k, v, seg, allowed = problem(16)
    assert attn.compute_dtype(q, k, v.half()) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn.compute_dtype(q, k, v) == torch.bfloat16
        out = attn.attention(q, k, v, seg, seg, allowed)
    assert out.dtype == torch.bfloat16


def test_dockerfile_pins_the_torch_the_suite_runs():
    # An unpinned torch moves under the kernel with every rebuild (and its Triton with it).
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    docker = re.search(r"^ARG TORCH_SPEC=(\S+)$", (root / "Dockerfile").read_text(), re.M)
    make = re.search(r"^TORCH_SPEC \?= (\S+)$", (root / "Makefile").read_text(), re.M)
    assert docker and "==" in docker.group(1), "the Dockerfile leaves torch unpinned"
    assert make and docker.group(1) == make.group(1)


def test_the_package_requires_the_triton_the_kernel_needs():
    from pathlib import Path

    from training.run.config import tomllib

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    triton = next(d for d in deps if d.startswith("triton"))
    floor = triton.split(">=")[1].split(";")[0].strip()
    assert attn._version(floor) >= attn.MIN_TRITON, triton
