"""Continuation latency: encode, DiT sampling (4 stages), decode, total — per batch size.

    python bench/latency.py --preset debug --codec debug                 # CPU, seconds
    python bench/latency.py --preset base --codec snac32k --device cuda --batch-sizes 1 8 64

Random-init weights (timing does not depend on them). `--codec snac32k` builds the real 32 kHz
SNAC architecture (54.5 M params), `debug` the tiny one the tests use. Medians over `--repeats`
runs after `--warmup`; on CUDA each phase is timed with CUDA events, on CPU with perf_counter.
Writes one JSON line per batch size to stdout and, with `--out`, appends it to that file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from model.codec import DEBUG_CODEC_CONFIG, SNAC_32KHZ_CONFIG, Codec  # noqa: E402
from model.dit import DiT, DiTConfig  # noqa: E402
from model.engine import ContinuationEngine  # noqa: E402
from model.sampler import SamplingParams, generate  # noqa: E402


class Timer:
    """Elapsed seconds of a block: CUDA events on GPU (no host sync inside), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def run_once(engine: ContinuationEngine, audios, params) -> dict[str, float]:
    device = engine.device
    out = {}
    with Timer(device) as t:
        ctx = engine._encode(audios)
    out["encode"] = t.seconds
    with Timer(device) as t:
        new = generate(engine.dit, ctx, params, engine.diffusion.schedules)
    out["sample"] = t.seconds
    with Timer(device) as t:
        start = ctx[0].shape[1] // engine.codec.frames_per_chunk[0] * engine.chunk_samples
        for b, p in enumerate(params):
            seq = [torch.cat([c[b : b + 1], x[b : b + 1]], dim=1) for c, x in zip(ctx, new, strict=True)]
            engine._decode_samples(seq, start, start + engine.chunk_samples, p.seed)
    out["decode"] = t.seconds
    out["total"] = out["encode"] + out["sample"] + out["decode"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--codec", default="debug",
                    help="debug, snac32k (random-init architectures) or a codec directory "
                         "(e.g. weights/demo/codec)")
    ap.add_argument("--dit", default="",
                    help="DiTConfig overrides on the preset, e.g. d_model=192,n_layers=4,n_heads=3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", default="16,12,8,8", help="per-level sampling steps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    named = {"debug": DEBUG_CODEC_CONFIG, "snac32k": SNAC_32KHZ_CONFIG}
    codec = Codec.load(named.get(args.codec, args.codec), device)
    dtype = getattr(torch, args.dtype)
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in args.dit.split(",") if kv)}
    dit = DiT(DiTConfig.from_name(args.preset, codebook_size=codec.codebook_size,
                                  **overrides)).to(device, dtype).eval()
    engine = ContinuationEngine(codec, dit)
    steps = tuple(int(s) for s in args.steps.split(","))
    chunk = codec.samples_per_chunk

    for bs in args.batch_sizes:
        audios = [torch.randn(2 * chunk) * 0.1 for _ in range(bs)]
        params = [SamplingParams(steps=steps, seed=i).validated(codec.n_levels) for i in range(bs)]
        for _ in range(args.warmup):
            run_once(engine, audios, params)
        runs = [run_once(engine, audios, params) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        audio_s = bs * chunk / codec.sample_rate
        row = dict(
            preset=args.preset,
            dit=overrides,
            params=dit.num_params(),
            codec=args.codec,
            device=str(device),
            device_name=torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            threads=torch.get_num_threads(),
            dtype=args.dtype,
            batch_size=bs,
            steps=list(steps),
            repeats=args.repeats,
            median_s={k: round(v, 4) for k, v in med.items()},
            realtime_factor=round(audio_s / med["total"], 3),
            torch=torch.__version__,
        )
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
