"""Tokenise a folder of audio into SNAC token shards: `python -m training.tokens --audio DIR --out DIR`.

Pipeline: walk DIR recursively (sorted, so runs are deterministic) -> decode + downmix + resample
each file in a small thread pool (`audio.read_audio`) -> cut it into pieces -> encode the
pieces in batches -> every `--shard-seconds` of audio, write one shard (a uint16 .npy per level)
and rewrite the manifest atomically. The format is described in `training/tokens/shards.py`.

Pieces. Long files are encoded in pieces of `--piece-seconds` (default one chunk, 6.144 s),
rounded to the codec's padding grid (12,288 samples = 4 coarse frames) so each piece's tokens
land exactly on the file's token grid and concatenate. SNAC's encoder is non-causal (convolutions
plus windowed attention), so each piece is encoded with `Codec.border_samples` (the encoder's
reach, rounded up to the grid) of the file's audio on either side and only its own tokens are
kept: the result is one pass over the whole file, but short encodes run 5x faster on CPU than a
minute-long one. Pieces of equal padded length are batched together (zero-padded to the grid,
exactly as `Codec.encode` pads), so a file that fits in one piece gets exactly
`Codec.encode(file)`. (Directories made before the borders keep encoding without them, so every
file in a directory is encoded alike: manifest `piece_border_samples`.)

Tiles. Every file is also encoded in short tiles (`tile_plan`: 1.536 s for SNAC 32 kHz), so
the data loader can rebuild the tokens an encode of a context *alone* gives (what `/continue`
feeds the model) instead of whole-file tokens that peek at the target (training/tokens/shards.py,
docs/data.md). Short tiles encode fast: measured on 2 CPU cores with the demo codec, 30-40x
realtime, so they add about two fifths to a run's time.

Resuming. A file is done when the manifest lists it with the same size and mtime; a re-run skips
it. Shards are written before the manifest that references them, each through a temp file and
`os.replace`, so killing the run at any moment loses at most the shard being encoded. Files that
fail to decode are listed in the manifest's `failed` (and on stderr) and skipped on re-runs unless
they change or `--retry-failed` is given.

Exit status: 0 when the run finished and the directory holds at least one tokenised file (some
files may have failed: they are listed); 1 when it holds none (no audio found, or every file
failed); 2 when the run is refused (bad arguments, codec will not load, the directory belongs to
another codec or is locked by another run); 130 when interrupted (re-run to resume).

This file is the run and its command line; encoding in pieces is `training/tokens/encode.py`,
the out directory's lock, manifest continuation and splits `training/tokens/directory.py`.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from audio import AUDIO_EXTENSIONS, AudioError, is_audio_name, read_audio
from model.codec import DEBUG_CODEC_CONFIG, SNAC_32KHZ_HUB_ID, Codec
from model.weights import CodecLoadError
from training.run.distributed import pick_device
from training.tokens import shards
from training.tokens.directory import (  # noqa: F401 - tile_plan re-exported
    DEFAULT_VAL_FRACTION,
    OutDirLock,
    TokenizeError,
    in_part,
    read_hold_out,
    settle,
    split_of,
    tile_plan,
)
from training.tokens.encode import encode_files

KILL_HOOK_ENV = "SNAC_DIT_TOKENIZE_KILL_AFTER_SHARDS"  # tests: SIGKILL after writing N shards


@dataclass
class TokenizeConfig:
    audio_dir: Path
    out_dir: Path
    codec: str = SNAC_32KHZ_HUB_ID  # hub id, local dir, or "debug" (tiny random-init codec)
    device: str = "auto"  # "auto": cuda when available
    batch_size: int | None = None  # pieces per encode call; None: 8 on GPU, 1 on CPU (no gain there)
    val_fraction: float | None = None  # None: keep the out dir's, else DEFAULT_VAL_FRACTION
    # Files that are always 'val' (names or relative paths), e.g. the tracks a codec was
    # validated on, so a DiT is measured on music neither model trained on. None: keep the out
    # dir's list; [] clears it.
    hold_out: list[str] | None = None
    piece_seconds: float | None = None  # None: keep the out dir's, else DEFAULT_PIECE_CHUNKS chunks
    shard_seconds: float = 3600.0  # audio per shard: ~1.1 MB of tokens, the most a kill can lose
    workers: int = min(4, os.cpu_count() or 1)  # decode/resample threads, overlapping encoding
    retry_failed: bool = False
    progress: bool = True
    # (k, n): this run tokenises only part k of n of the training files (a stable hash of the
    # path picks the part) plus every val file; re-runs with the other parts, or without, add
    # the rest. For machines that must re-tokenise every working period. None: all files.
    part: tuple[int, int] | None = None


@dataclass
class Summary:
    tokenised: int = 0
    seconds: float = 0.0
    shards_written: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    ignored: int = 0
    found: int = 0  # audio candidates under --audio
    total_files: int = 0  # tokenised files in the manifest after the run
    other_parts: int = 0  # files left to other --part runs


@dataclass
class _Item:
    rel: str
    path: Path
    size: int
    mtime_ns: int


def scan(audio_dir: Path, skip: Path | None = None) -> tuple[list[_Item], int]:
    """Audio candidates under `audio_dir` sorted by relative path, and the count of other files."""
    items, ignored = [], 0
    skip = skip.resolve() if skip is not None else None
    for root, dirs, files in os.walk(audio_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() != skip]
        for name in files:
            path = Path(root) / name
            if name.startswith("."):  # .DS_Store, AppleDouble ._x.wav, our own temp files
                continue
            if not is_audio_name(path):
                ignored += 1
                continue
            try:
                st = path.stat()
            except OSError:  # dangling symlink, vanished file
                ignored += 1
                continue
            rel = path.relative_to(audio_dir).as_posix()
            items.append(_Item(rel, path, st.st_size, st.st_mtime_ns))
    items.sort(key=lambda it: it.rel)
    return items, ignored


def _read(item: _Item, sample_rate: int) -> np.ndarray | AudioError:
    try:
        return read_audio(item.path, sample_rate)
    except AudioError as e:
        return e
    except Exception as e:  # soxr/numpy/OS trouble with one file must not end the run
        return AudioError(f"{item.path}: {type(e).__name__}: {e}", code="read_error")


def _prefetch(pool: ThreadPoolExecutor, items, fn, lookahead: int):
    """Yield (item, fn(item)) in order while up to `lookahead` later items are being read."""
    it = iter(items)
    queue = collections.deque((x, pool.submit(fn, x)) for x in itertools.islice(it, lookahead))
    while queue:
        item, fut = queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append((nxt, pool.submit(fn, nxt)))
        yield item, fut.result()


def _load_codec(spec: str, device: torch.device) -> tuple[Codec, str]:
    try:
        if spec == "debug":
            return Codec.load(DEBUG_CODEC_CONFIG, device=device), "debug"
        source = str(Path(spec).resolve()) if Path(spec).is_dir() else spec
        return Codec.load(spec, device=device), source
    except (CodecLoadError, OSError, RuntimeError, ValueError) as e:
        raise TokenizeError(f"cannot load codec {spec!r}: {e}") from e


def parse_part(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part takes K/N, e.g. 1/2; got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--part K/N needs 1 <= K <= N; got {text!r}")
    return k, n


def tokenize(cfg: TokenizeConfig) -> Summary:
    audio_dir, out_dir = Path(cfg.audio_dir), Path(cfg.out_dir)
    if not audio_dir.is_dir():
        raise TokenizeError(f"--audio {audio_dir}: not a directory")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise TokenizeError("--batch-size must be at least 1")
    if cfg.val_fraction is not None and not 0 <= cfg.val_fraction < 1:
        raise TokenizeError("--val-fraction must lie in [0, 1)")
    if cfg.shard_seconds <= 0 or (cfg.piece_seconds is not None and cfg.piece_seconds <= 0):
        raise TokenizeError("--shard-seconds and --piece-seconds must be positive")
    try:
        device = pick_device(cfg.device)
    except (ValueError, RuntimeError) as e:
        raise TokenizeError(f"--device: {e}") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    with OutDirLock(out_dir):
        shards.remove_temp_files(out_dir)
        old = None
        if (out_dir / shards.MANIFEST).exists():
            try:
                old = shards.read_manifest(out_dir)
            except shards.ManifestError as e:
                raise TokenizeError(f"refusing to continue: {e}") from e
        codec, source = _load_codec(cfg.codec, device)
        if codec.codebook_size > np.iinfo(shards.TOKEN_DTYPE).max + 1:
            raise TokenizeError(f"codebook of {codec.codebook_size} entries does not fit uint16 shards")
        manifest, dirty = settle(old, cfg, codec, source)
        batch_size = cfg.batch_size or (8 if codec.device.type == "cuda" else 1)
        return _run(cfg, codec, manifest, dirty, batch_size, audio_dir, out_dir)


def _run(cfg, codec, manifest, dirty, batch_size, audio_dir, out_dir) -> Summary:
    summary = Summary()
    items, summary.ignored = scan(audio_dir, skip=out_dir)
    summary.found = len(items)
    done = {f["path"]: f for f in manifest["files"]}
    failed = {f["path"]: f for f in manifest["failed"]}
    todo = []
    for it in items:
        prev = done.get(it.rel) or failed.get(it.rel)
        same = prev is not None and (prev["size"], prev["mtime_ns"]) == (it.size, it.mtime_ns)
        if same and (it.rel in done or not cfg.retry_failed):
            summary.skipped += 1
            continue
        # New, changed, or a failure to retry: forget the old record (a changed file's old tokens
        # stay in their shard, unreferenced).
        done.pop(it.rel, None)
        failed.pop(it.rel, None)
        if cfg.part is not None and not in_part(it.rel, manifest, *cfg.part):
            summary.other_parts += 1  # (a changed file's stale record is dropped all the same)
            continue
        todo.append(it)
    if len(done) + len(failed) != len(manifest["files"]) + len(manifest["failed"]):
        dirty = True
    manifest["files"] = list(done.values())
    manifest["failed"] = list(failed.values())
    if todo:
        _encode_all(cfg, codec, manifest, todo, batch_size, out_dir, summary)
    elif dirty:
        shards.write_manifest(out_dir, manifest)
    summary.total_files = len(manifest["files"])
    return summary


def _encode_all(cfg, codec, manifest, todo, batch_size, out_dir, summary) -> None:
    sr, piece = codec.sample_rate, manifest["piece_samples"]
    border = manifest.get("piece_border_samples", 0)  # 0: made before pieces overlapped
    kill_after = int(os.environ.get(KILL_HOOK_ENV, "0"))
    next_shard = max((s["id"] for s in manifest["shards"]), default=-1) + 1
    bar = tqdm(total=sum(it.size for it in todo), unit="B", unit_scale=True, desc="tokenise",
               disable=not cfg.progress, file=sys.stderr, smoothing=0.1)
    group: list[tuple[_Item, np.ndarray]] = []
    group_samples = 0
    t0 = time.perf_counter()

    plan = manifest.get("tiles")
    passes = 2 if plan else 1

    def on_batch(file_idx, lengths):
        # Bytes of the source files, pro rata by the share of their samples just encoded.
        bar.update(sum(group[i][0].size * n / max(1, group[i][1].shape[0]) / passes
                       for i, n in zip(file_idx, lengths, strict=True)))

    def flush():
        nonlocal next_shard, group, group_samples
        audios = [a for _, a in group]
        tokens = encode_files(codec, audios, piece, batch_size, on_batch, border)
        tiles = None
        if plan:
            # Same batch size as the pieces: on CPU, batching tiles is slower (docs/data.md).
            tiles = encode_files(codec, audios, plan["units"] * codec.pad_samples, batch_size,
                                 on_batch)
        offsets = [0] * codec.n_levels
        for (it, audio), levels in zip(group, tokens, strict=True):
            manifest["files"].append(dict(
                path=it.rel, size=it.size, mtime_ns=it.mtime_ns, shard=next_shard,
                offsets=list(offsets), n_frames=int(levels[0].shape[0]), samples=int(audio.shape[0]),
                duration=round(audio.shape[0] / sr, 6),
                split=split_of(it.rel, manifest),
            ))
            offsets = [o + int(t.shape[0]) for o, t in zip(offsets, levels, strict=True)]
        per_level = [np.concatenate([t[lvl] for t in tokens]) for lvl in range(codec.n_levels)]
        per_level_tiles = None if tiles is None else [
            np.concatenate([t[lvl] for t in tiles]) for lvl in range(codec.n_levels)]
        manifest["shards"].append(shards.write_shard(out_dir, next_shard, per_level,
                                                     per_level_tiles))
        summary.shards_written += 1
        if kill_after and summary.shards_written >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: the worst moment to die
        shards.write_manifest(out_dir, manifest)
        summary.tokenised += len(group)
        summary.seconds += group_samples / sr
        next_shard += 1
        group, group_samples = [], 0
        bar.set_postfix(files=summary.tokenised, failed=len(summary.failed),
                        audio=_duration(summary.seconds),
                        x_realtime=f"{summary.seconds / (time.perf_counter() - t0):.0f}")

    workers = max(1, cfg.workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="read") as pool:
        try:
            for it, audio in _prefetch(pool, todo, lambda x: _read(x, sr), lookahead=2 * workers):
                if isinstance(audio, AudioError):
                    record = dict(path=it.rel, size=it.size, mtime_ns=it.mtime_ns,
                                  code=audio.code, error=str(audio))
                    manifest["failed"].append(record)
                    summary.failed.append(record)
                    bar.update(it.size)
                    tqdm.write(f"skipped {it.rel}: {audio}", file=sys.stderr)
                    continue
                group.append((it, audio))
                group_samples += audio.shape[0]
                if group_samples >= cfg.shard_seconds * sr:
                    flush()
            if group:
                flush()
            elif summary.failed:
                shards.write_manifest(out_dir, manifest)  # record failures even with no new shard
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.1f} s"


def parse_args(argv=None) -> TokenizeConfig:
    p = argparse.ArgumentParser(
        prog="python -m training.tokens",
        description="Tokenise a folder of audio (recursively) into SNAC token shards + manifest. "
                    "Re-running resumes: finished files are skipped.",
    )
    p.add_argument("--audio", required=True, type=Path, help="folder of audio files (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="token directory (created; resumed if it exists)")
    p.add_argument("--codec", default=SNAC_32KHZ_HUB_ID,
                   help=f"hub id, local directory, or 'debug' (default {SNAC_32KHZ_HUB_ID})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=None, help="pieces per encode call (default 8 on GPU, 1 on CPU)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"share of files held out as 'val' (default {DEFAULT_VAL_FRACTION}, or the directory's)")
    p.add_argument("--hold-out", type=Path, default=None,
                   help="files that are always 'val': a text file of names (one per line) or "
                        "bench/eval_codec.py's JSON (its held_out_tracks); kept for re-runs")
    p.add_argument("--piece-seconds", type=float, default=None,
                   help="encode long files in pieces this long (each with the encoder's reach of audio "
                        "either side), rounded to the 0.384 s grid (default 6.144)")
    p.add_argument("--shard-seconds", type=float, default=3600.0,
                   help="audio per shard; the most an interruption can lose (default 3600)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="decode/resample threads (default: up to 4)")
    p.add_argument("--retry-failed", action="store_true", help="try files that failed before again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--part", type=parse_part, default=None, metavar="K/N",
                   help="tokenise only part K of N of the training files (a stable hash of each "
                        "path) plus every val file; other parts, or a run without --part, add "
                        "the rest to the same directory")
    a = p.parse_args(argv)
    return TokenizeConfig(
        audio_dir=a.audio, out_dir=a.out, codec=a.codec, device=a.device, batch_size=a.batch_size,
        val_fraction=a.val_fraction, piece_seconds=a.piece_seconds, shard_seconds=a.shard_seconds,
        hold_out=None if a.hold_out is None else read_hold_out(a.hold_out),
        workers=a.workers, retry_failed=a.retry_failed, progress=not a.no_progress,
        part=a.part,
    )


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        s = tokenize(cfg)
    except TokenizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; shards written so far are kept. Re-run the same command to resume.",
              file=sys.stderr)
        return 130
    print(f"tokenised {s.tokenised} files ({_duration(s.seconds)} of audio) into "
          f"{s.shards_written} new shards; skipped {s.skipped} done before (or failed before: "
          f"--retry-failed); {len(s.failed)} failed now; {s.ignored} non-audio files ignored",
          file=sys.stderr)
    for f in s.failed:
        print(f"  failed: {f['path']} [{f['code']}] {f['error']}", file=sys.stderr)
    if s.other_parts:
        print(f"{s.other_parts} training files belong to other parts than --part "
              f"{cfg.part[0]}/{cfg.part[1]}: not tokenised this run", file=sys.stderr)
    print(f"{s.total_files} files in {Path(cfg.out_dir) / shards.MANIFEST}", file=sys.stderr)
    if s.total_files == 0:
        if s.found == 0:
            print(f"error: no audio files under {cfg.audio_dir} (looked for "
                  f"{' '.join(sorted(AUDIO_EXTENSIONS))})", file=sys.stderr)
        else:
            print("error: no audio could be tokenised", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
