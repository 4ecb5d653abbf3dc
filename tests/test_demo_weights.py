"""The shipped default codec (weights/demo/codec): loads with snac's own loader and with the
project's, has the project's chunk geometry, and is the codec its model card names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from snac import SNAC

from model.codec import Codec

CODEC = Path(__file__).resolve().parents[1] / "weights" / "demo" / "codec"

pytestmark = pytest.mark.skipif(not (CODEC / "config.json").is_file(),
                                reason="no shipped codec in weights/demo/codec")


def test_shipped_codec_loads_everywhere_and_matches_its_card():
    codec = Codec.load(str(CODEC))
    assert codec.sample_rate == 32000 and codec.hop_length == 384
    assert codec.strides == (8, 4, 2, 1) and codec.frames_per_chunk == (64, 128, 256, 512)
    card = (CODEC / "MODEL_CARD.md").read_text()
    m = re.search(r"fingerprint `([0-9a-f]{16})`", card)
    assert m, "MODEL_CARD.md must state the codec fingerprint"
    assert codec.fingerprint == m.group(1)
    snac = SNAC.from_pretrained(str(CODEC))
    x = 0.1 * torch.randn(1, codec.samples_per_chunk, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = snac.encode(x[:, None])
    ours = codec.encode(x)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
    audio = codec.decode(ours)
    assert audio.shape == (1, codec.samples_per_chunk) and torch.isfinite(audio).all()
    size = sum(f.stat().st_size for f in CODEC.iterdir())
    assert size < 20e6
