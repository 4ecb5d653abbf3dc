"""Host -> device copies of the layout a training step and the sampler build.

A layout is built on the host; a copy from pageable host memory blocks the host and goes through
a staging buffer, so every copy per row or per level is a sync the step pays. Without a GPU the
copies are counted on the `meta` device, which takes the same path as CUDA except the pinning:
every op that reads a host tensor and writes a device one, plus every `torch.tensor(...,
device=...)` (built on the host and copied inside the call, below the dispatcher).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.layout import (
    CLEAN,
    CONTEXT,
    NOISED,
    build_layout,
    collate,
    fill_tokens,
    to_device,
)

SMALL = ((4, 8, 16, 32), (8, 4, 2, 1))


class CountCopies(TorchDispatchMode):
    def __init__(self, device: str):
        super().__init__()
        self.device, self.copies = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if (any(t.device.type == "cpu" for t in ins)
                and any(t.device.type == self.device for t in outs)):
            self.copies.append(str(func))
        return out


@pytest.fixture
def count(monkeypatch):
    """count(fn) -> the number of host -> meta copies fn makes."""
    def run(fn):
        made = CountCopies("meta")
        real = torch.tensor

        def tensor(*a, device=None, **kw):
            if device is not None and torch.device(device).type != "cpu":
                made.copies.append("torch.tensor")
            return real(*a, device=device, **kw)

        monkeypatch.setattr(torch, "tensor", tensor)
        try:
            with made:
                fn()
        finally:
            monkeypatch.setattr(torch, "tensor", real)
        return len(made.copies)
    return run


@pytest.mark.parametrize("rows", [[0, 1, 2, 2, 1, 0], [2, 1, 0] * 8])
def test_a_training_batch_reaches_the_device_in_two_copies(rows, count):
    """What the loss does per micro-batch: collate(...).to(device), fill_tokens, and a target
    index per level (corrupt). Two copies (the batch's tables, the token gather index) whatever
    the number of rows and levels; it was 7 + one per row + one per level."""
    fpc, st = SMALL
    B = len(rows)
    windows = [torch.zeros(B, 3 * f, dtype=torch.long, device="meta") for f in fpc]
    out = {}

    def step():
        out["batch"] = batch = collate(rows, fpc, st).to("meta")
        out["tokens"] = fill_tokens(batch, windows)
        out["idx"] = [batch.target_index(NOISED, lvl) for lvl in range(len(fpc))]
        out["clean"] = [batch.target_index(CLEAN, lvl) for lvl in range(len(fpc) - 1)]
        out["ctx"] = batch.context_index()

    assert count(step) <= 2
    assert out["tokens"].device.type == "meta" and out["tokens"].shape == out["batch"].shape
    assert all(i.device.type == "meta" for i in out["idx"] + out["clean"] + list(out["ctx"]))


def test_to_device_packs_every_dtype_and_shape_exactly():
    """The one-copy path (pack into one byte buffer, copy, view each tensor back) returns the
    same values, dtypes and shapes; on the host it copies nothing."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randint(-5, 5, (3, 7), generator=g), torch.rand(3, 5, generator=g),
          torch.rand(2, 3, 3, generator=g) < 0.5, torch.zeros(0, dtype=torch.long),
          torch.arange(5, dtype=torch.int32), torch.randn(1, generator=g, dtype=torch.float64)]
    same = to_device(ts, "cpu")
    assert all(a is b for a, b in zip(ts, same, strict=True))
    packed = to_device(ts, "meta")  # the CUDA path but for pinning
    assert [(t.device.type, t.dtype, t.shape) for t in packed] == [
        ("meta", t.dtype, t.shape) for t in ts]
    from model import layout

    buf, spans = layout._pack(ts)
    back = layout._unpack(buf, spans)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(ts, back, strict=True))


@pytest.mark.parametrize("geometry", [SMALL, ((6,), (1,)), ((3, 6), (2, 1))])
@pytest.mark.parametrize("rows,after", [([0], None), ([2, 1, 0, 2], None),
                                        ([0, 1, 2, 1, 0], [1, 0, 1, 1, 0])])
def test_indices_agree_with_each_rows_own_layout(geometry, rows, after):
    """target_index, context_index and fill_tokens of a batch equal what each row's own layout
    says (the values the host-built versions gave)."""
    fpc, st = geometry
    A = 0 if after is None else 1
    batch = collate(rows, fpc, st, after)
    moved = batch.to("cpu")
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 99, (len(rows), (3 + A) * f), generator=g) for f in fpc]
    tokens = fill_tokens(moved, windows, A)
    idx, valid = moved.context_index()
    for b, (n, a) in enumerate(zip(batch.n_ctx, batch.n_after, strict=True)):
        lay = build_layout(n, fpc, st, a)
        for role in (CLEAN, NOISED):
            for lvl in range(len(fpc) - (role == CLEAN)):
                s = lay.segments[lay.find(role, lvl)]
                assert torch.equal(moved.target_index(role, lvl)[b],
                                   torch.arange(s.start, s.start + s.length))
        n_context = sum(s.length for s in lay.segments if s.role == CONTEXT)
        assert valid[b].sum() == n_context and torch.equal(idx[b], torch.arange(idx.shape[1]))
        assert (valid[b, :n_context]).all()
        for s in lay.segments:
            chunk = 2 - n + s.chunk if s.chunk <= n else 3
            want = windows[s.level][b, chunk * fpc[s.level]:(chunk + 1) * fpc[s.level]]
            assert torch.equal(tokens[b, s.start:s.start + s.length], want)
    with pytest.raises(KeyError):
        moved.target_index(CLEAN, len(fpc) - 1)  # the finest level is never a clean segment
    # a token subset keeps the full sequence's target positions
    sub = moved.select(moved.target_index(NOISED, 0))
    finest = len(fpc) - 1
    assert torch.equal(sub.target_index(NOISED, finest), moved.target_index(NOISED, finest))
