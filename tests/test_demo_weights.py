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


def spectral_flux(y, n: int = 1024, hop: int = 256):
    """Per-frame positive spectral flux (sum of magnitude rises), Hann frames of n, hop."""
    import numpy as np

    frames = np.lib.stride_tricks.sliding_window_view(y, n)[::hop] * np.hanning(n)
    mag = np.abs(np.fft.rfft(frames, axis=1))
    return np.maximum(np.diff(mag, axis=0), 0).sum(axis=1)


def test_include_input_join_has_no_spectral_jump(tmp_path, monkeypatch):
    """Through HTTP with the shipped codec. The DiT is replaced by one that "continues"
    perfectly (its tokens are the codec's encoding of the real next 6.144 s), so what is judged
    is the join alone: a random DiT's tokens start a burst of noise that any join would show.
    The spectral flux over the 64 ms crossfade stays within the input's own note onsets, and
    its total over the join well under a hard splice of the input and the same continuation."""
    import io

    import numpy as np
    import soundfile as sf
    from fastapi.testclient import TestClient

    import model.engine as engine_module
    from model.dit import DiT, DiTConfig
    from model.engine import JOIN_SAMPLES, ContinuationEngine
    from model.weights import save_pretrained
    from server.app import create_app
    from server.settings import Settings
    from tests.test_contexts import music

    codec = Codec.load(str(CODEC))
    torch.manual_seed(0)
    save_pretrained(DiT(DiTConfig.from_name("debug", codebook_size=codec.codebook_size)), tmp_path)
    engine = ContinuationEngine.load(str(tmp_path), str(CODEC))
    chunk = codec.samples_per_chunk
    song = music(7.0 + chunk / 32000, 3)
    n = int(7.0 * 32000)
    window = song[n - chunk: n + chunk]                  # the context the engine uses, and what follows
    truth = [t[:, f:] for t, f in zip(codec.encode(torch.from_numpy(window)[None]),
                                      codec.frames_per_chunk, strict=True)]
    monkeypatch.setattr(engine_module, "generate", lambda *a, **k: [t.clone() for t in truth])

    buf = io.BytesIO()
    sf.write(buf, song[:n], 32000, format="WAV", subtype="PCM_16")
    files = {"audio": ("a.wav", buf.getvalue(), "audio/wav")}
    with TestClient(create_app(Settings(warmup=False), engine=engine)) as c:
        joined = c.post("/continue?steps=2,1,1,1&seed=11&include_input=true", files=files)
        plain = c.post("/continue?steps=2,1,1,1&seed=11", files=files)
    assert joined.status_code == plain.status_code == 200
    y = sf.read(io.BytesIO(joined.content), dtype="float32")[0]
    x = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")[0]
    cont = sf.read(io.BytesIO(plain.content), dtype="float32")[0]
    hop = 256
    lo, hi = (n - JOIN_SAMPLES - 1024) // hop, (n + 1024) // hop   # frames touching the join
    flux, hard = spectral_flux(y), spectral_flux(np.concatenate([x, cont]))
    assert flux[lo:hi].max() <= flux[:lo].max(), (flux[lo:hi].max(), flux[:lo].max())
    # Well under a hard splice: summed over the frames touching the join. (Not their maximum:
    # the first frames are the input alone in both, and where the codec continues closely the
    # splice's own peak need not rise above the music's.)
    assert flux[lo:hi].sum() < 0.85 * hard[lo:hi].sum(), (flux[lo:hi].sum(), hard[lo:hi].sum())


DIT = CODEC.parent / "dit"


@pytest.mark.skipif(not (DIT / "config.json").is_file(), reason="no shipped DiT in weights/demo/dit")
def test_shipped_dit_serves_with_the_shipped_codec_through_http():
    """What `make serve` does on a fresh clone: the default Settings point at weights/demo/{dit,
    codec}; a /continue there returns one 6.144 s chunk. The DiT was trained on this codec's
    codes (its card and config name the codes fingerprint), and its weights are small."""
    import io

    import numpy as np
    import soundfile as sf
    from fastapi.testclient import TestClient

    from model.weights import read_dit_config
    from server.app import create_app
    from server.settings import Settings
    from tests.test_contexts import music

    settings = Settings(warmup=False)
    assert settings.weights == Path("weights/demo/dit") and settings.codec == "weights/demo/codec"
    codec = Codec.load(str(CODEC))
    served = read_dit_config(DIT)
    assert served["codec"]["codes_fingerprint"] == codec.codes_fingerprint
    assert f"`{codec.codes_fingerprint}`" in (DIT / "MODEL_CARD.md").read_text()
    assert (DIT / "model.safetensors").stat().st_size < 40e6
    buf = io.BytesIO()
    sf.write(buf, music(12.288, 5), 32000, format="WAV", subtype="PCM_16")
    settings = Settings(warmup=False, weights=DIT, codec=str(CODEC))
    with TestClient(create_app(settings)) as client:
        r = client.post("/continue?steps=2,2,1,1&seed=0",
                        files={"audio": ("song.wav", buf.getvalue(), "audio/wav")})
    assert r.status_code == 200, r.text
    x, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 32000 and x.shape == (codec.samples_per_chunk,)
    assert np.isfinite(x).all() and 0 < np.abs(x).max() <= 1.0
