"""Windows/s of the token dataset, on a synthetic token directory of realistic size.

    python bench/data_throughput.py [--hours 5] [--file-minutes 3] [--files-per-shard 20]
                                    [--batch-size 64] [--workers 0 2] [--seconds 10]

Builds random uint16 tokens with the SNAC 32 kHz geometry (no codec needed), with context
tiles (training/tokens/shards.py), then measures, with whole-file contexts only and with the default
mix of encoded / mixed / generated contexts (training/tokens/windows.py),
  * `dataset[i]` in random order in this process (one window per call), and
  * the full pipeline a trainer uses (WindowBatchSampler with an n_ctx mix -> DataLoader with
    N workers -> collate_windows) in windows/s.
Results go to stdout and bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training.tokens.sampling import WindowBatchSampler  # noqa: E402
from training.tokens.shards import write_token_dir  # noqa: E402
from training.tokens.windows import TokenWindows, collate_windows  # noqa: E402

STRIDES = (8, 4, 2, 1)
FRAMES_PER_SECOND = 32000 / 384 / 8  # coarse (A) frames per second


def build(out: Path, hours: float, file_minutes: float, files_per_shard: int) -> dict:
    rng = np.random.default_rng(0)
    n_files = max(1, round(hours * 60 / file_minutes))
    n_frames = int(file_minutes * 60 * FRAMES_PER_SECOND) // 4 * 4
    def tokens():
        return [rng.integers(0, 4096, n_frames * 8 // s, dtype=np.uint16) for s in STRIDES]

    files = {f"song_{i:05d}.wav": tokens() for i in range(n_files)}
    tiles = {name: tokens() for name in files}
    return write_token_dir(out, files, files_per_shard=files_per_shard, val_fraction=0.0,
                           tiles=tiles, tile_plan=dict(units=4, border_units=2, reach_samples=18191))


def random_access(ds: TokenWindows, seconds: float) -> float:
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(ds), 1_000_000)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in idx[n:n + 256]:
            ds[int(i)]
        n += 256
    return n / (time.perf_counter() - t0)


def loader_rate(ds: TokenWindows, batch_size: int, workers: int, seconds: float) -> float:
    sampler = WindowBatchSampler(ds, batch_size, seed=0, n_ctx_weights=(0.1, 0.2, 0.7))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_windows,
                                         num_workers=workers, persistent_workers=workers > 0)

    def batches():  # endless, across epochs, as a trainer reads them
        while True:
            yield from loader

    it = batches()
    for _ in range(max(4, 2 * workers)):  # warm-up: start workers, open maps
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["n_ctx"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hours", type=float, default=5.0)
    p.add_argument("--file-minutes", type=float, default=3.0)
    p.add_argument("--files-per-shard", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per figure")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_throughput.json")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = build(Path(tmp), a.hours, a.file_minutes, a.files_per_shard)
        build_s = time.perf_counter() - t0
        ds = TokenWindows(tmp, "all", n_ctx=(0, 1, 2), contexts=(0, 0, 1))
        size_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*.npy")) / 1e6
        print(f"token dir: {a.hours:g} h in {len(manifest['files'])} files, "
              f"{len(manifest['shards'])} shards, {size_mb:.0f} MB, {len(ds)} windows "
              f"(built in {build_s:.1f} s)")
        result = dict(
            hours=a.hours, files=len(manifest["files"]), shards=len(manifest["shards"]),
            windows=len(ds), batch_size=a.batch_size, n_ctx_weights=[0.1, 0.2, 0.7],
            cpu_count=os.cpu_count(), platform=platform.platform(), torch=torch.__version__,
            load_average_before=round(os.getloadavg()[0], 2),  # other work on the box skews figures
        )
        mixed = TokenWindows(tmp, "all", n_ctx=(0, 1, 2))          # the default context mix
        result["contexts"] = dict(mixed.describe()["contexts"])
        for tag, d in (("", ds), ("contexts_", mixed)):
            label = "default context mix" if tag else "whole-file contexts"
            rate = random_access(d, a.seconds)
            print(f"{label}: dataset[i], random order, 1 process: {rate:,.0f} windows/s")
            result[f"{tag}getitem_windows_per_s"] = round(rate)
            for w in a.workers:
                rate = loader_rate(d, a.batch_size, w, a.seconds)
                print(f"{label}: DataLoader, batch {a.batch_size}, {w} workers: "
                      f"{rate:,.0f} windows/s")
                result[f"{tag}loader_{w}_workers_windows_per_s"] = round(rate)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
