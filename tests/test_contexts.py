"""Training contexts equal what inference feeds the model (issue: boundary-exact audio).

SNAC's encoder is non-causal: an encode of the context audio alone (what `/continue` does)
differs from the whole-file tokens near both ends of the context. The tokeniser stores tile
encodes and the data loader splices their borders in; these tests tokenise real audio with the
(non-causal, random-init) debug codec through the CLI and compare the loader's contexts with
`Codec.encode` of the context audio.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from model.codec import Codec
from training.tokens import shards
from training.tokens.tokenizer import main, tile_plan
from training.tokens.windows import CONTEXT_KINDS, TokenWindows


def music(seconds: float, seed: int) -> np.ndarray:
    """Notes of changing pitch and loudness plus noise: enough variety to move many codes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 32000)) / 32000
    notes = rng.uniform(110, 880, size=int(seconds * 4) + 1)[(t * 4).astype(int)]
    env = 0.2 + 0.15 * np.sin(2 * np.pi * 0.7 * t)
    audio = env * np.sin(2 * np.pi * np.cumsum(notes) / 32000) + 0.05 * rng.standard_normal(t.size)
    return audio.astype(np.float32)


@pytest.fixture(scope="module")
def tokenised(tmp_path_factory, debug_codec, debug_codec_dir):
    root = tmp_path_factory.mktemp("contexts")
    (root / "audio").mkdir()
    audios = {"a.wav": music(20.5, 0), "b.wav": music(19.0, 1)}
    for name, audio in audios.items():
        sf.write(root / "audio" / name, audio, 32000, subtype="FLOAT")  # read back exactly
    out = root / "tokens"
    assert main(["--audio", str(root / "audio"), "--out", str(out), "--codec", debug_codec_dir,
                 "--no-progress", "--workers", "1", "--val-fraction", "0"]) == 0
    return out, audios


def encode(codec: Codec, audio: np.ndarray, start: int, end: int) -> list[torch.Tensor]:
    """Codec.encode of audio[start:end] (sample positions), per level (n_l,)."""
    return [t[0] for t in codec.encode(torch.from_numpy(audio[start:end])[None])]


def windows_of(ds: TokenWindows, kind: str, limit: int = 6):
    """Up to `limit` distinct (ref, tokens) of the given context kind, spread over the dataset."""
    seen, out = set(), []
    for i in np.linspace(0, len(ds) - 1, 60).astype(int):
        ref = ds.window(int(i))
        if ref.context == kind and (ref.file, ref.start) not in seen:
            seen.add((ref.file, ref.start))
            out.append((ref, ds[int(i)]["tokens"]))
    return out[:limit]


def test_tile_plan_covers_the_encoder_reach(debug_codec):
    plan = tile_plan(debug_codec)
    pad = debug_codec.pad_samples
    assert plan["border_units"] * pad >= plan["reach_samples"] > 0
    assert plan["units"] >= 2 * plan["border_units"]
    assert (debug_codec.samples_per_chunk // pad) % plan["units"] == 0


@pytest.mark.parametrize("n_ctx", [1, 2])
def test_encoded_contexts_equal_an_encode_of_the_context_alone(tokenised, debug_codec, n_ctx):
    out, audios = tokenised
    manifest = shards.read_manifest(out)
    assert manifest["tiles"]["units"] == 4
    files = [f["path"] for f in TokenWindows(out, "all", n_ctx=n_ctx).files]
    frame = debug_codec.strides[0] * debug_codec.hop_length      # samples per level-0 token
    F = debug_codec.frames_per_chunk
    encoded = TokenWindows(out, "all", n_ctx=n_ctx, contexts=(1, 0, 0))
    whole = TokenWindows(out, "all", n_ctx=n_ctx, contexts=(0, 0, 1))
    picked = windows_of(encoded, "encoded")
    assert len(picked) >= 3
    differs = 0
    for ref, tokens in picked:
        assert ref.start % (4 * debug_codec.pad_frames[0]) == 0    # on the tile grid
        audio = audios[files[ref.file]]
        start = ref.start * frame
        want = encode(debug_codec, audio, start, start + n_ctx * debug_codec.samples_per_chunk)
        plain = whole.read(ref._replace(context="generated"))
        for level, (got, ref_tokens, w) in enumerate(zip(tokens, plain, want, strict=True)):
            ctx = n_ctx * F[level]
            assert torch.equal(got[:ctx], w), f"level {level} context differs from the encode"
            assert torch.equal(got[ctx:], ref_tokens[ctx:])       # the target: whole-file tokens
            differs += int((ref_tokens[:ctx] != w).sum())
    # Without the tiles the contexts would be wrong: whole-file tokens peek at the target.
    assert differs > 0


def test_mixed_contexts_are_the_second_extend_chunks(tokenised, debug_codec):
    """/extend's second chunk: the older context chunk is the tail of the encoded input window
    (an encode of the two chunks ending there), the newer one the model's previous chunk."""
    out, audios = tokenised
    ds = TokenWindows(out, "all", n_ctx=2, contexts=(0, 1, 0))
    files = [f["path"] for f in ds.files]
    frame = debug_codec.strides[0] * debug_codec.hop_length
    chunk, F = debug_codec.samples_per_chunk, debug_codec.frames_per_chunk
    picked = windows_of(ds, "mixed")
    assert picked
    for ref, tokens in picked:
        audio = audios[files[ref.file]]
        b = ref.start * frame + chunk                # where the encoded input ended
        if b < 2 * chunk:
            continue                                 # no two-chunk input ends there
        window = encode(debug_codec, audio, b - 2 * chunk, b)
        plain = ds.read(ref._replace(context="generated"))
        for level, (got, w, p) in enumerate(zip(tokens, window, plain, strict=True)):
            assert torch.equal(got[:F[level]], w[F[level]:]), f"level {level}"
            assert torch.equal(got[F[level]:], p[F[level]:])


def test_context_kinds_follow_their_weights_and_vary_with_the_epoch(tokenised):
    out, _ = tokenised
    ds = TokenWindows(out, "all", n_ctx=2)                      # the default mix
    assert ds.describe()["contexts"] == dict(zip(CONTEXT_KINDS, (0.5, 0.25, 0.25), strict=True))
    kinds = [ds.window(i).context for i in range(len(ds))]
    share = kinds.count("encoded") / len(kinds)
    assert 0.3 < share < 0.7 and "mixed" in kinds and "generated" in kinds
    assert [ds.window(i, epoch=1).context for i in range(len(ds))] != kinds
    # n_ctx = 0 has no context to vary; one chunk has no "mixed" case.
    assert {TokenWindows(out, "all", n_ctx=0).window(i).context for i in range(5)} == {"generated"}
    one = TokenWindows(out, "all", n_ctx=1, contexts=(0, 1, 0))
    assert {one.window(i).context for i in range(len(one))} == {"generated"}
    with pytest.raises(ValueError, match="3 non-negative weights"):
        TokenWindows(out, "all", contexts=(1, -1, 0))


def test_a_directory_without_tiles_trains_on_whole_file_contexts(tmp_path):
    levels = [np.zeros(64 * 3 * 8 // s, dtype=np.uint16) for s in (8, 4, 2, 1)]
    shards.write_token_dir(tmp_path, {"x.wav": levels})
    ds = TokenWindows(tmp_path, "all", n_ctx=2)
    assert ds.describe()["contexts"]["generated"] == 1.0
    with pytest.raises(ValueError, match="without context tiles"):
        TokenWindows(tmp_path, "all", n_ctx=2, contexts=(1, 0, 0))
