"""The on-disk token format shared by the tokeniser (writer) and `training/tokens/windows.py` (reader).

A token directory holds

    manifest.json                 what is where (below); rewritten atomically after every shard
    shards/00000.L0.npy ...       one uint16 .npy per level per shard: the files' tokens back to back
    shards/00000.L0.tiles.npy ... the same files encoded in short tiles (below), same offsets

`manifest.json`:

    format, version               "snac-dit-tokens", 1
    codec                         fingerprint, codes_fingerprint (encoder + quantiser only; absent
                                  in older dirs), source, config, geometry (strides, frames_per_chunk,
                                  pad_frames, codebook_size, sample_rate, hop_length, ...)
    piece_samples                 length of the pieces long files were encoded in (see tokenizer.py)
    piece_border_samples          audio encoded either side of each piece (absent: 0, older dirs)
    val_fraction                  share of files in the "val" split
    tiles                         units, border_units, reach_samples (absent: no tile files;
                                  such a directory trains on whole-file contexts only)
    shards[]                      id, levels (file names per level), frames (tokens per level),
                                  tiles (file names per level, when the manifest has `tiles`)
    files[]                       path (relative, '/'-separated), size, mtime_ns, shard,
                                  offsets (per level, in tokens, into that shard's level file),
                                  n_frames (coarsest-level frames; level l has n_frames*s_0/s_l),
                                  samples, duration (seconds, before padding), split
    failed[]                      path, size, mtime_ns, code, error

Writers never leave a half-written file under a final name: everything goes to a temp name in
the same directory and is `os.replace`d into place, so a crash leaves either the old or the new
version. A shard is written before the manifest that references it, so a crash in between leaves
an unreferenced shard that the next run overwrites.

Tiles. SNAC's encoder is non-causal, so an encode of a context alone (what `/continue` feeds
the model) differs from the whole-file tokens near both ends of the context, within the
encoder's reach. Each file is therefore also encoded in tiles of `tiles.units` padding units
(a divisor of a chunk, at least twice `border_units`, which cover the reach): a tile's first
`border_units` are what an encode starting at the tile's start gives there, its last
`border_units` what an encode ending at the tile's end gives. `training/tokens/windows.py` splices them
into the whole-file tokens to build the context an encode of that stretch alone gives.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "snac-dit-tokens"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
TOKEN_DTYPE = np.uint16  # codebooks up to 65,536 entries; SNAC's are 4,096


class ManifestError(ValueError):
    """A token directory we refuse: missing/corrupt manifest, another codec, another format."""


def split_of(rel_path: str, val_fraction: float) -> str:
    """'val' or 'train', decided by a hash of the relative path only.

    Stable when files are added or removed, identical on every machine and every re-run, and
    whole files go to one side, so no val window overlaps a train window.
    """
    if val_fraction <= 0:
        return "train"
    return "val" if path_hash(rel_path) / 2**64 < val_fraction else "train"


def path_hash(rel_path: str, salt: str = "") -> int:
    """A 64-bit hash of a relative path (salted for independent draws), the same everywhere."""
    return int.from_bytes(hashlib.sha256((salt + rel_path).encode("utf-8")).digest()[:8], "big")


def level_lengths(n_frames: int, strides) -> list[int]:
    """Tokens per level for `n_frames` coarsest-level frames."""
    return [n_frames * strides[0] // s for s in strides]


def shard_level_name(shard_id: int, level: int) -> str:
    return f"{SHARD_DIR}/{shard_id:05d}.L{level}.npy"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_tiles_name(shard_id: int, level: int) -> str:
    return f"{SHARD_DIR}/{shard_id:05d}.L{level}.tiles.npy"


def write_shard(token_dir: Path, shard_id: int, levels: list[np.ndarray],
                tiles: list[np.ndarray] | None = None) -> dict:
    """Write one shard's per-level token arrays (and tile encodes, laid out alike); returns its
    manifest entry."""
    (Path(token_dir) / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    names, tile_names = [], []
    for level, tokens in enumerate(levels):
        name = shard_level_name(shard_id, level)
        atomic_save_npy(Path(token_dir) / name, np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE))
        names.append(name)
        if tiles is not None:
            if tiles[level].shape != tokens.shape:
                raise ValueError(f"level {level}: tiles {tiles[level].shape} != tokens {tokens.shape}")
            name = shard_tiles_name(shard_id, level)
            atomic_save_npy(Path(token_dir) / name,
                            np.ascontiguousarray(tiles[level], dtype=TOKEN_DTYPE))
            tile_names.append(name)
    _fsync_dir(Path(token_dir) / SHARD_DIR)
    entry = dict(id=shard_id, levels=names, frames=[int(t.shape[0]) for t in levels])
    if tiles is not None:
        entry["tiles"] = tile_names
    return entry


def remove_temp_files(token_dir: Path) -> None:
    """Drop temp files a killed writer left behind (they never hold referenced data)."""
    for d in (Path(token_dir), Path(token_dir) / SHARD_DIR):
        if d.is_dir():
            for p in d.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)


def new_manifest(codec_info: dict, piece_samples: int, val_fraction: float) -> dict:
    return dict(format=FORMAT, version=VERSION, codec=codec_info, piece_samples=piece_samples,
                val_fraction=val_fraction, shards=[], files=[], failed=[])


def dump_manifest(manifest: dict) -> str:
    """JSON with one line per file/shard record: diffable and greppable, yet compact (the file
    is rewritten after every shard, so its size matters on datasets of many thousand files)."""
    lines = ["{"]
    keys = list(manifest)
    for i, key in enumerate(keys):
        value, sep = manifest[key], "," if i < len(keys) - 1 else ""
        if isinstance(value, list):
            body = ",\n  ".join(json.dumps(v, separators=(",", ":")) for v in value)
            lines.append(f" {json.dumps(key)}: [\n  {body}\n ]{sep}" if value else f" {json.dumps(key)}: []{sep}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}{sep}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_manifest(token_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(token_dir) / MANIFEST, dump_manifest(manifest).encode())


def same_codes(info: dict, fingerprint: str, codes_fingerprint: str | None) -> bool:
    """Whether a codec (its `fingerprint` and `codes_fingerprint`) makes the tokens of a
    manifest's `codec` entry: by the codes fingerprint where the manifest records one (so a
    decoder-only fine-tune of the codec still matches), else by the whole codec's."""
    if info.get("codes_fingerprint") and codes_fingerprint:
        return info["codes_fingerprint"] == codes_fingerprint
    return info["fingerprint"] == fingerprint


def read_manifest(token_dir: str | os.PathLike, expected_fingerprint: str | None = None) -> dict:
    """Load and check a token directory's manifest; `ManifestError` says what is wrong."""
    path = Path(token_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{token_dir}: no {MANIFEST}; tokenise a folder first "
                            "(python -m training.tokens --audio DIR --out DIR)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ManifestError(f"{path}: format {manifest.get('format')!r} version "
                            f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    found = manifest["codec"]["fingerprint"]
    if expected_fingerprint is not None and found != expected_fingerprint:
        raise ManifestError(
            f"{token_dir} holds tokens of codec {found} ({manifest['codec'].get('source')}), "
            f"expected codec {expected_fingerprint}: tokens of different codecs must not be mixed"
        )
    return manifest


def file_tokens(token_dir: str | os.PathLike, manifest: dict, entry: dict) -> list[np.ndarray]:
    """All tokens of one manifest file entry, per level (uint16, memory-mapped)."""
    shard = next(s for s in manifest["shards"] if s["id"] == entry["shard"])
    lengths = level_lengths(entry["n_frames"], manifest["codec"]["geometry"]["strides"])
    out = []
    for name, offset, n in zip(shard["levels"], entry["offsets"], lengths, strict=True):
        out.append(np.load(Path(token_dir) / name, mmap_mode="r")[offset:offset + n])
    return out


def write_token_dir(out_dir: str | os.PathLike, files: dict[str, list[np.ndarray]], *,
                    files_per_shard: int = 64, val_fraction: float = 0.0,
                    fingerprint: str = "synthetic", strides=(8, 4, 2, 1), chunk_frames: int = 64,
                    pad_frames: int = 4, hop_length: int = 384, sample_rate: int = 32000,
                    codebook_size: int = 4096, tiles: dict[str, list[np.ndarray]] | None = None,
                    tile_plan: dict | None = None) -> dict:
    """A token directory from given per-level tokens, no codec involved (tests, benchmarks).

    files: relative path -> per-level token arrays on the grid (level l = n_frames*s_0/s_l).
    tiles + tile_plan: the tile encodes, laid out like `files`, and the manifest's `tiles`.
    """
    if (tiles is None) != (tile_plan is None):
        raise ValueError("give both tiles and tile_plan, or neither")
    out = Path(out_dir)
    geometry = dict(
        sample_rate=sample_rate, hop_length=hop_length, strides=list(strides),
        n_levels=len(strides), codebook_size=codebook_size,
        frames_per_chunk=[chunk_frames * strides[0] // s for s in strides],
        samples_per_chunk=chunk_frames * strides[0] * hop_length,
        pad_samples=pad_frames * strides[0] * hop_length,
        pad_frames=[pad_frames * strides[0] // s for s in strides],
    )
    codec = dict(fingerprint=fingerprint, source="synthetic", config={}, geometry=geometry)
    manifest = new_manifest(codec, piece_samples=0, val_fraction=val_fraction)
    if tile_plan is not None:
        manifest["tiles"] = dict(tile_plan)
    names = list(files)
    for shard_id, lo in enumerate(range(0, len(names), files_per_shard)):
        group = names[lo:lo + files_per_shard]
        offsets = [0] * len(strides)
        for name in group:
            levels = files[name]
            n_frames = int(levels[0].shape[0])
            if [int(t.shape[0]) for t in levels] != level_lengths(n_frames, strides):
                raise ValueError(f"{name}: level lengths {[t.shape[0] for t in levels]} off the grid")
            samples = n_frames * strides[0] * hop_length
            manifest["files"].append(dict(
                path=name, size=0, mtime_ns=0, shard=shard_id, offsets=list(offsets),
                n_frames=n_frames, samples=samples, duration=samples / sample_rate,
                split=split_of(name, val_fraction),
            ))
            offsets = [o + int(t.shape[0]) for o, t in zip(offsets, levels, strict=True)]
        per_level = [np.concatenate([files[n][lvl] for n in group]) for lvl in range(len(strides))]
        per_level_tiles = None if tiles is None else [
            np.concatenate([tiles[n][lvl] for n in group]) for lvl in range(len(strides))]
        manifest["shards"].append(write_shard(out, shard_id, per_level, per_level_tiles))
    write_manifest(out, manifest)
    return manifest
