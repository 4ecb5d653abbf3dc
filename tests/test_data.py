"""Token windows: shapes, grid alignment, file boundaries, splits, sampling and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from model.layout import collate as layout_collate
from model.layout import fill_tokens
from tests.conftest import tone
from training.tokens import shards
from training.tokens.tokenizer import main as tokenize_main
from training.tokens.windows import (
    TokenWindows,
    WindowBatchSampler,
    collate_windows,
    permute,
)

STRIDES = (8, 4, 2, 1)
FPC = (64, 128, 256, 512)


def random_file(rng, n_frames: int) -> list[np.ndarray]:
    return [rng.integers(0, 4096, n_frames * 8 // s).astype(np.uint16) for s in STRIDES]


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    """Files of assorted lengths (in coarse frames) over three shards, half of them 'val'."""
    rng = np.random.default_rng(0)
    lengths = {"short.wav": 60, "one_chunk.wav": 64, "a/b.wav": 130, "a/c.wav": 200,
               "d.flac": 195, "e.wav": 331, "f.wav": 64 * 3, "g/h.wav": 77}
    files = {name: random_file(rng, n) for name, n in lengths.items()}
    out = tmp_path_factory.mktemp("tokens")
    shards.write_token_dir(out, files, files_per_shard=3, val_fraction=0.3, fingerprint="fp-test")
    return out, files


def test_windows_per_n_ctx_shape_alignment_and_file_bounds(token_dir):
    out, files = token_dir
    for n_ctx in (0, 1, 2):
        ds = TokenWindows(out, split="all", n_ctx=n_ctx)
        span = (n_ctx + 1) * 64
        want = sum((len(t[0]) - span) // 4 + 1 for t in files.values() if len(t[0]) >= span)
        assert len(ds) == want > 0
        seen = set()
        for i in range(len(ds)):
            ref = ds.window(i)
            entry = ds.files[ref.file]
            assert ref.n_ctx == n_ctx
            assert ref.start % 4 == 0  # the 0.384 s grid
            assert ref.start + span <= entry["n_frames"]  # never runs past its file
            seen.add((ref.file, ref.start))
            item = ds[i]
            assert item["n_ctx"] == n_ctx and item["index"] == i
            src = files[entry["path"]]
            for level, (tok, s) in enumerate(zip(item["tokens"], STRIDES, strict=True)):
                assert tok.dtype == torch.int64 and tok.shape == ((n_ctx + 1) * FPC[level],)
                a = ref.start * 8 // s
                np.testing.assert_array_equal(tok.numpy(), src[level][a:a + tok.shape[0]])
        assert len(seen) == len(ds)  # every window distinct
        assert "short.wav" not in {ds.files[ds.window(i).file]["path"] for i in range(len(ds))}
    with pytest.raises(IndexError):
        ds.window(len(ds))


def test_splits_are_disjoint_and_by_file(token_dir):
    out, files = token_dir
    train, val = TokenWindows(out, "train", n_ctx=0), TokenWindows(out, "val", n_ctx=0)
    names = {f["path"] for f in train.files}, {f["path"] for f in val.files}
    assert names[0].isdisjoint(names[1]) and names[0] | names[1] == set(files)
    assert names[1], "the fixture should put some files in val"
    assert len(train) + len(val) == len(TokenWindows(out, "all", n_ctx=0))
    info = val.describe()
    assert info["split"] == "val" and info["files"] == len(names[1]) and info["windows"] == len(val)
    # The split is a pure function of the path, at about the requested rate.
    paths = [f"x/{i}.wav" for i in range(4000)]
    share = np.mean([shards.split_of(p, 0.1) == "val" for p in paths])
    assert 0.08 < share < 0.12
    assert [shards.split_of(p, 0.1) for p in paths[:50]] == [shards.split_of(p, 0.1) for p in paths[:50]]
    assert shards.split_of("anything.wav", 0.0) == "train"


def test_refusals(token_dir, tmp_path):
    out, _ = token_dir
    with pytest.raises(shards.ManifestError, match="must not be mixed"):
        TokenWindows(out, expected_fingerprint="another-codec")
    assert len(TokenWindows(out, "all", expected_fingerprint="fp-test")) > 0
    with pytest.raises(shards.ManifestError, match="no manifest.json"):
        TokenWindows(tmp_path)
    with pytest.raises(ValueError, match="split"):
        TokenWindows(out, split="test")
    with pytest.raises(ValueError, match="n_ctx"):
        TokenWindows(out, n_ctx=[1, 1])


def test_mixed_n_ctx_batches_feed_the_layout(token_dir):
    out, files = token_dir
    ds = TokenWindows(out, "all", n_ctx=(0, 1, 2))
    assert [ds.ranges[n][1] - ds.ranges[n][0] for n in (0, 1, 2)] == [
        len(TokenWindows(out, "all", n_ctx=n)) for n in (0, 1, 2)
    ]
    picks = [ds.ranges[0][0], ds.ranges[2][0] + 3, ds.ranges[1][1] - 1]
    items = [ds[i] for i in picks]
    batch = collate_windows(items)
    assert batch["n_ctx"].tolist() == [0, 2, 1]
    for level, t in enumerate(batch["tokens"]):
        assert t.shape == (3, 3 * FPC[level])
        # Left padding: the target is always the last chunk.
        assert (t[0, : 2 * FPC[level]] == -1).all() and (t[2, : FPC[level]] == -1).all()
        for row, it in enumerate(items):
            assert torch.equal(t[row, -it["tokens"][level].shape[0]:], it["tokens"][level])
    # The model's layout reads each row's most recent chunks and never the padding.
    lay = layout_collate(batch["n_ctx"].tolist(), FPC, STRIDES)
    seq = fill_tokens(lay, batch["tokens"])
    assert (seq[lay.seg_id >= 0] >= 0).all()
    # Same-n_ctx batches simply stack.
    same = collate_windows([ds[ds.ranges[1][0]], ds[ds.ranges[1][0] + 1]])
    assert [tuple(t.shape) for t in same["tokens"]] == [(2, 2 * f) for f in FPC]


def test_permute_is_a_bijection():
    for n in (1, 2, 5, 64, 1000, 4099):
        p = permute(np.arange(n), n, key=7)
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))


def test_sampler_epochs_cover_every_window_and_resume_exactly(token_dir):
    out, _ = token_dir
    ds = TokenWindows(out, "all", n_ctx=(0, 1))
    s = WindowBatchSampler(ds, batch_size=4, seed=3)
    epoch0 = [k for batch in s for k in batch]
    assert s.state_dict() == dict(epoch=1, position=0, seed=3)
    assert len(epoch0) == len(s) * 4 == len(ds) // 4 * 4
    assert len({k.index for k in epoch0}) == len(epoch0)  # no repeats within an epoch
    epoch1 = [k.index for batch in s for k in batch]
    assert epoch1 != [k.index for k in epoch0]  # reshuffled

    # Resume from the state carried by the 5th batch: the rest of the epoch is identical.
    fresh = WindowBatchSampler(ds, batch_size=4, seed=3)
    batches = list(fresh)
    state = collate_windows([ds[k] for k in batches[4]])["data_state"]
    assert state == dict(epoch=0, position=5)
    resumed = WindowBatchSampler(ds, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert list(resumed) == batches[5:]
    # State saved after an epoch's last batch resumes at the next epoch.
    resumed.load_state_dict(dict(epoch=0, position=len(s)))
    assert [k.index for b in resumed for k in b] == epoch1
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict(dict(epoch=0, position=0, seed=4))


def test_sampler_weights_and_ranks(token_dir):
    out, _ = token_dir
    ds = TokenWindows(out, "all", n_ctx=(0, 1, 2))
    only_two = WindowBatchSampler(ds, batch_size=8, seed=0, n_ctx_weights=(0, 0, 1))
    assert {ds.window(k.index).n_ctx for b in only_two for k in b} == {2}
    mixed = WindowBatchSampler(ds, batch_size=8, seed=0, n_ctx_weights=(1, 1, 2), epoch_length=800)
    counts = np.bincount([ds.window(k.index).n_ctx for b in mixed for k in b], minlength=3)
    assert abs(counts[2] / counts.sum() - 0.5) < 0.1 and counts[0] > 100 and counts[1] > 100

    r0 = list(WindowBatchSampler(ds, 4, seed=1, rank=0, world_size=2))
    r1 = list(WindowBatchSampler(ds, 4, seed=1, rank=1, world_size=2))
    whole = list(WindowBatchSampler(ds, 8, seed=1))
    assert len(r0) == len(r1) == len(whole)
    for a, b, w in zip(r0, r1, whole, strict=True):
        assert [k.index for k in a + b] == [k.index for k in w]
    with pytest.raises(ValueError, match="windows"):
        WindowBatchSampler(ds, batch_size=len(ds) + 1)


def test_uniform_layout_batches_share_one_layout_in_the_same_shares(token_dir):
    out, _ = token_dir
    ds = TokenWindows(out, "all", n_ctx=(0, 1, 2))
    kw = dict(batch_size=4, seed=3, n_ctx_weights=(1, 1, 2), epoch_length=4000)
    uniform = list(WindowBatchSampler(ds, uniform_layout=True, **kw))
    per_batch = [{ds.window(k.index).n_ctx for k in b} for b in uniform]
    assert all(len(s) == 1 for s in per_batch)  # one layout per batch: nothing padded
    counts = np.bincount([s.pop() for s in per_batch], minlength=3)
    assert abs(counts[2] / counts.sum() - 0.5) < 0.08 and counts[0] > 150 and counts[1] > 150
    mixed = list(WindowBatchSampler(ds, **kw))  # per row: most batches mix layouts
    assert sum(len({ds.window(k.index).n_ctx for k in b}) > 1 for b in mixed) > len(mixed) / 2
    for b in uniform[:20]:
        assert all((t >= 0).all() for t in collate_windows([ds[k] for k in b])["tokens"])

    # Ranks of one global batch draw the same layout (no rank waits on a longer row).
    r0 = WindowBatchSampler(ds, rank=0, world_size=2, uniform_layout=True, **kw)
    r1 = WindowBatchSampler(ds, rank=1, world_size=2, uniform_layout=True, **kw)
    for a, b in zip(r0, r1, strict=True):
        assert len({ds.window(k.index).n_ctx for k in a + b}) == 1


def make_loader(dataset, batch_size, seed, num_workers, state=None):
    """A DataLoader over `dataset` resumed at `state` (a saved batch["data_state"])."""
    sampler = WindowBatchSampler(dataset, batch_size, seed=seed)
    if state is not None:
        sampler.load_state_dict(state)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_windows,
                        num_workers=num_workers, persistent_workers=num_workers > 0)
    return loader, sampler


def test_loader_with_workers_resumes_mid_epoch(token_dir):
    out, _ = token_dir
    ds = TokenWindows(out, "all", n_ctx=(1, 2), max_open_shards=1)  # 3 shards: the pread path
    assert not ds.use_maps
    mapped = TokenWindows(out, "all", n_ctx=(1, 2))
    assert mapped.use_maps
    for i in range(0, len(ds), 7):
        assert all(torch.equal(a, b) for a, b in zip(ds[i]["tokens"], mapped[i]["tokens"], strict=True))
    loader, _ = make_loader(ds, batch_size=4, seed=5, num_workers=2)
    full = [b["index"].tolist() for b in loader]
    loader, _ = make_loader(ds, batch_size=4, seed=5, num_workers=2)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    del it
    state = first[-1]["data_state"]
    loader, _ = make_loader(ds, batch_size=4, seed=5, num_workers=0, state=state)
    rest = [b["index"].tolist() for b in loader]
    assert [b["index"].tolist() for b in first] + rest == full


def test_windows_of_a_tokenised_file_match_the_codec(tmp_path, debug_codec, debug_codec_dir):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "song.wav", tone(7.0, freq=330), 32000, subtype="FLOAT")
    out = tmp_path / "tokens"
    assert tokenize_main(["--audio", str(audio), "--out", str(out), "--codec", debug_codec_dir,
                          "--val-fraction", "0", "--no-progress"]) == 0
    ds = TokenWindows(out, "train", n_ctx=0, expected_fingerprint=debug_codec.fingerprint)
    assert len(ds) == (76 - 64) // 4 + 1  # 7 s pads to 7.296 s = 76 coarse frames
    codes = debug_codec.encode(torch.from_numpy(sf.read(audio / "song.wav", dtype="float32")[0])[None])
    for i in (0, len(ds) - 1):
        start = ds.window(i).start
        for level, (tok, s) in enumerate(zip(ds[i]["tokens"], STRIDES, strict=True)):
            a = start * 8 // s
            assert torch.equal(tok, codes[level][0, a:a + FPC[level]])


def test_windows_with_an_after_chunk_and_their_batches(token_dir):
    """(n_ctx, n_after) values: the window runs one chunk past the target; batches mixing them
    keep the target at chunk W and the after chunk right after it, as fill_tokens reads."""
    out, files = token_dir
    ds = TokenWindows(out, split="all", n_ctx=[2, (1, 1), (0, 1)])
    for value, (lo, hi) in ds.ranges.items():
        n_ctx, n_after = (value, 0) if isinstance(value, int) else value
        span = (n_ctx + 1 + n_after) * 64
        assert hi - lo == sum((len(t[0]) - span) // 4 + 1 for t in files.values()
                              if len(t[0]) >= span)
        for i in range(lo, min(hi, lo + 3)):
            item, ref = ds[i], ds.window(i)
            assert (item["n_ctx"], item["n_after"]) == (n_ctx, n_after) == (ref.n_ctx, ref.n_after)
            src = files[ds.files[ref.file]["path"]]
            for level, s in enumerate(STRIDES):
                a = ref.start * 8 // s
                np.testing.assert_array_equal(item["tokens"][level].numpy(),
                                              src[level][a:a + span * 8 // s])
    picks = [ds.ranges[2][0], ds.ranges[(1, 1)][0], ds.ranges[(0, 1)][0]]
    items = [ds[i] for i in picks]
    batch = collate_windows(items)
    assert batch["n_ctx"].tolist() == [2, 1, 0] and batch["n_after"].tolist() == [0, 1, 1]
    layout = layout_collate(batch["n_ctx"].tolist(), FPC, STRIDES, batch["n_after"].tolist())
    tokens = fill_tokens(layout, batch["tokens"], after=1)
    assert (tokens[layout.seg_id >= 0] >= 0).all()      # no padding id reaches the model
    with pytest.raises(ValueError, match="n_after"):
        TokenWindows(out, split="all", n_ctx=[(1, 2)])
