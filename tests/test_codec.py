import pytest
import snac
import torch

from model.codec import DEBUG_CODEC_CONFIG, SNAC_32KHZ_CONFIG, Codec
from model.weights import CodecLoadError


def test_real_32khz_geometry_is_derived_from_config():
    # Build the real architecture on the meta device: geometry only, no 54 M-param init cost.
    with torch.device("meta"):
        model = snac.SNAC(**SNAC_32KHZ_CONFIG)
    codec = Codec(model, SNAC_32KHZ_CONFIG, device="meta")
    assert codec.hop_length == 384
    assert codec.strides == (8, 4, 2, 1)
    assert codec.frames_per_chunk == (64, 128, 256, 512)
    assert sum(codec.frames_per_chunk) == 960
    assert codec.samples_per_chunk == 196_608
    assert codec.pad_samples == 12_288
    # 12.0 s pads up to the grid: 2 chunks' worth of tokens.
    n = codec.padded_length(12 * 32000) // codec.hop_length
    assert [n // s for s in codec.strides] == [128, 256, 512, 1024]


def test_geometry_follows_a_different_config():
    cfg = dict(
        DEBUG_CODEC_CONFIG,
        encoder_rates=[2, 4, 8, 8],
        decoder_rates=[8, 8, 4, 2],
        vq_strides=[4, 2, 1],
    )
    codec = Codec.load(cfg)
    assert codec.hop_length == 512 and codec.n_levels == 3
    assert codec.frames_per_chunk == (64, 128, 256)
    assert codec.samples_per_chunk == 64 * 4 * 512


def test_encode_shapes_and_padding(debug_codec):
    audio = torch.randn(2, 12 * 32000) * 0.1
    codes = debug_codec.encode(audio)
    assert [tuple(c.shape) for c in codes] == [(2, 128), (2, 256), (2, 512), (2, 1024)]
    assert all(c.dtype == torch.int64 for c in codes)
    assert all(0 <= int(c.min()) and int(c.max()) < 4096 for c in codes)


def test_decode_is_seeded_and_on_the_grid(debug_codec):
    codes = debug_codec.encode(torch.randn(1, debug_codec.samples_per_chunk) * 0.1)
    a = debug_codec.decode(codes, seed=3)
    b = debug_codec.decode(codes, seed=3)
    c = debug_codec.decode(codes, seed=4)
    assert a.shape == (1, debug_codec.samples_per_chunk) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the decoder's noise injection really is seeded


def test_decode_with_context_is_seam_free(debug_codec):
    n = debug_codec.samples_per_chunk
    codes = debug_codec.encode(torch.randn(1, 2 * n) * 0.1)
    first = [c[:, : c.shape[1] // 2] for c in codes]
    second = [c[:, c.shape[1] // 2 :] for c in codes]
    together = debug_codec.decode(codes, seed=0)
    continued = debug_codec.decode(second, context=first, seed=0)
    assert continued.shape == (1, n)
    torch.testing.assert_close(continued, together[:, n:], rtol=0, atol=1e-6)


def test_batched_decode_matches_rows(debug_codec):
    # Noise is drawn per batch, so compare a noise-free codec: rows must not interact.
    codec = Codec.load(dict(DEBUG_CODEC_CONFIG, noise=False))
    codes = codec.encode(torch.randn(2, codec.samples_per_chunk) * 0.1)
    both = codec.decode(codes)
    one = codec.decode([c[1:] for c in codes])
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda c: c[:3], "expected 4 levels"),
        (lambda c: [c[0], c[1][:, :-2], c[2], c[3]], "off the grid"),
        (lambda c: [x[:, : x.shape[1] // 32] for x in c], "padding grid"),  # 2 A-frames, grid is 4
        (lambda c: [c[0] + 4096, *c[1:]], r"\[0, 4096\)"),
        (lambda c: [c[0].float(), *c[1:]], "integer"),
    ],
)
def test_decode_rejects_bad_tokens(debug_codec, bad, message):
    codes = [torch.zeros(1, n, dtype=torch.long) for n in debug_codec.frames_per_chunk]
    with pytest.raises(ValueError, match=message):
        debug_codec.decode(bad(codes))


def test_encode_rejects_bad_audio(debug_codec):
    with pytest.raises(ValueError, match="shape"):
        debug_codec.encode(torch.zeros(32000))
    with pytest.raises(ValueError, match="NaN"):
        debug_codec.encode(torch.full((1, 32000), float("nan")))


def test_save_load_roundtrip_and_snac_compat(tmp_path, debug_codec):
    out = debug_codec.save(tmp_path / "codec")
    again = Codec.load(out)
    assert again.fingerprint == debug_codec.fingerprint
    plain = snac.SNAC.from_pretrained(str(out))  # what users of the snac package do
    audio = torch.randn(1, 1, debug_codec.samples_per_chunk) * 0.1
    with torch.inference_mode():
        assert all(
            torch.equal(a, b.cpu())
            for a, b in zip(plain.encode(audio), debug_codec.encode(audio[:, 0]), strict=True)
        )


def test_fingerprint_depends_on_weights():
    assert (
        Codec.load(DEBUG_CODEC_CONFIG, seed=0).fingerprint
        != Codec.load(DEBUG_CODEC_CONFIG, seed=1).fingerprint
    )


def test_codes_fingerprint_ignores_the_decoder_only():
    """A decoder-only change keeps the codes (and their fingerprint); an encoder or quantiser
    change does not. The whole-codec fingerprint changes either way."""
    base = Codec.load(DEBUG_CODEC_CONFIG, seed=0)
    decoder = Codec.load(DEBUG_CODEC_CONFIG, seed=0)
    with torch.no_grad():
        next(decoder.snac.decoder.parameters()).add_(0.01)
    assert decoder.fingerprint != base.fingerprint
    assert decoder.codes_fingerprint == base.codes_fingerprint
    x = 0.1 * torch.randn(1, base.samples_per_chunk, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(base.encode(x), decoder.encode(x), strict=True))
    for part in ("encoder", "quantizer"):
        other = Codec.load(DEBUG_CODEC_CONFIG, seed=0)
        with torch.no_grad():
            next(getattr(other.snac, part).parameters()).add_(0.01)
        assert other.codes_fingerprint != base.codes_fingerprint, part


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(CodecLoadError, match="no config.json"):
        Codec.load(tmp_path)
    with pytest.raises(CodecLoadError, match="neither a local directory nor a hub id"):
        Codec.load(str(tmp_path / "missing" / "dir"))
