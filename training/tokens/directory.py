"""The token directory a tokenise run writes into: its lock, how a run continues its manifest
(the same codes, the same pieces, context tiles) and how its files split into train and val
(a held-out list, a stable hash of the path, `--part K/N`).

The on-disk format itself is `training/tokens/shards.py`; the run is `training/tokens/tokenizer.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from model.codec import Codec
from training.tokens import shards

if TYPE_CHECKING:
    from training.tokens.tokenizer import TokenizeConfig

DEFAULT_VAL_FRACTION = 0.02
DEFAULT_PIECE_CHUNKS = 1  # 6.144 s, each encoded with the encoder's reach of audio either side:
#                           on 2 CPU cores 35x realtime against 6x for one 61.44 s pass
#                           (docs/data.md), and the tokens are those of one pass over the file


class TokenizeError(RuntimeError):
    """The run is refused as configured (exit status 2)."""


def tile_plan(codec: Codec) -> dict | None:
    """Tile geometry for `codec`: border_units padding units cover the encoder's reach, a tile
    is the smallest divisor of a chunk holding two borders (so tiles tile every chunk). None
    when the reach exceeds half a chunk (then contexts stay whole-file tokens)."""
    reach = codec.encoder_reach()
    units_per_chunk = codec.samples_per_chunk // codec.pad_samples
    border = codec.border_samples // codec.pad_samples
    for units in range(2 * border, units_per_chunk + 1):
        if units_per_chunk % units == 0:
            return dict(units=units, border_units=border, reach_samples=reach)
    return None


def codec_info(codec: Codec, source: str) -> dict:
    """What a manifest records of the codec its tokens came from."""
    geometry = codec.geometry()
    geometry["pad_frames"] = list(codec.pad_frames)
    return dict(fingerprint=codec.fingerprint, codes_fingerprint=codec.codes_fingerprint,
                source=source, config=codec.config, geometry=geometry)


class OutDirLock:
    """An exclusive lock on the out dir: two runs appending shards at once would corrupt it."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock, the user keeps runs apart
            pass
        except OSError as e:
            os.close(self.fd)
            raise TokenizeError(f"another tokenize run is writing to {self.path.parent}") from e
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the flock


def settle(manifest: dict | None, cfg: TokenizeConfig, codec: Codec, source: str) -> tuple[dict, bool]:
    """The manifest to continue (or a new one) and whether its splits changed (needs a write).
    Refuses (TokenizeError) a directory whose files this run would encode differently."""
    grid = codec.pad_samples
    if cfg.piece_seconds is not None:
        piece = max(1, round(cfg.piece_seconds * codec.sample_rate / grid)) * grid
    else:
        piece = DEFAULT_PIECE_CHUNKS * codec.samples_per_chunk
    if manifest is None:
        val = DEFAULT_VAL_FRACTION if cfg.val_fraction is None else cfg.val_fraction
        manifest = shards.new_manifest(codec_info(codec, source), piece, val)
        manifest["piece_border_samples"] = codec.border_samples
        if cfg.hold_out:
            manifest["hold_out"] = sorted(cfg.hold_out)
        plan = tile_plan(codec)
        if plan is not None:
            manifest["tiles"] = plan
        return manifest, False

    if not shards.same_codes(manifest["codec"], codec.fingerprint, codec.codes_fingerprint):
        info = manifest["codec"]
        kind = "codes fingerprint" if info.get("codes_fingerprint") else "fingerprint"
        theirs = info.get("codes_fingerprint") or info["fingerprint"]
        ours = codec.codes_fingerprint if info.get("codes_fingerprint") else codec.fingerprint
        raise TokenizeError(
            f"{cfg.out_dir} holds tokens of a codec with {kind} {theirs} ({info.get('source')}), "
            f"but {cfg.codec!r} has {kind} {ours}; use the same codec (a decoder-only "
            "fine-tune of it is fine) or another --out directory"
        )
    if cfg.piece_seconds is not None and piece != manifest["piece_samples"]:
        raise TokenizeError(
            f"{cfg.out_dir} was tokenised in pieces of {manifest['piece_samples'] / codec.sample_rate:g} s; "
            f"--piece-seconds {cfg.piece_seconds:g} would encode new files differently. "
            "Drop --piece-seconds or use another --out directory"
        )
    if "tiles" not in manifest and manifest["files"] and tile_plan(codec) is not None:
        raise TokenizeError(
            f"{cfg.out_dir} was tokenised without context tiles (an older version); new files "
            "would differ from the old ones. It still trains (contexts as whole-file tokens), "
            "but to add files or to train on contexts as `/continue` encodes them, tokenise "
            "into a new --out directory"
        )
    resplit = cfg.val_fraction is not None and cfg.val_fraction != manifest["val_fraction"]
    if resplit:
        manifest["val_fraction"] = cfg.val_fraction
    if cfg.hold_out is not None and sorted(cfg.hold_out) != manifest.get("hold_out", []):
        resplit = True
        manifest["hold_out"] = sorted(cfg.hold_out)
    if resplit:  # the split is a pure function of the path: re-deciding it costs nothing
        for f in manifest["files"]:
            f["split"] = split_of(f["path"], manifest)
    return manifest, resplit


def split_of(rel_path: str, manifest: dict) -> str:
    """'val' for the held-out list (by relative path or file name), else the hash split."""
    hold = set(manifest.get("hold_out", ()))
    if rel_path in hold or rel_path.rsplit("/", 1)[-1] in hold:
        return "val"
    return shards.split_of(rel_path, manifest["val_fraction"])


def in_part(rel_path: str, manifest: dict, k: int, n: int) -> bool:
    """Whether `--part k/n` tokenises this file: every val file (so evaluations compare), and
    the training files whose path hashes to part k (1-based) of n."""
    if split_of(rel_path, manifest) == "val":
        return True
    return shards.path_hash(rel_path, salt="part:") % n == k - 1


def read_hold_out(path: Path) -> list[str]:
    """A held-out list: a text file (one name or relative path per line, # comments), or a
    JSON file with a `held_out_tracks` list (what bench/eval_codec.py writes)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TokenizeError(f"--hold-out {path}: {e.strerror or e}") from e
    if str(path).endswith(".json"):
        try:
            names = json.loads(text)["held_out_tracks"]
        except (ValueError, KeyError, TypeError) as e:
            raise TokenizeError(f"--hold-out {path}: not a JSON file with a held_out_tracks "
                                "list") from e
    else:
        names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [str(n) for n in names if str(n).strip()]
