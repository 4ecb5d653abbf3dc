"""Continuation latency: what `POST /continue` runs, per batch size, split by phase.

    python bench/latency.py --preset debug --codec debug                 # CPU, seconds
    python bench/latency.py --preset base --codec snac32k --device cuda --batch-sizes 1 8 64

Each run is `engine.continue_batch(audios, params, lead_in=JOIN_SAMPLES)`, the call the
server's batcher makes for /continue (12.288 s inputs: the two-chunk context), so the total
includes the join (`heard_context`: a decode and an encode per row) and the lead-in. Phases:
encode (the context), sample (the DiT, 4 stages), heard_context, decode (the output); `total`
is the whole call. On CUDA the device is synchronised before and after every timed span, so a
figure is finished work, not queued kernels. `--warmup` runs first (compile, autotune, caches;
2 on CUDA). The DiT runs in bf16 on CUDA and fp32 on CPU unless --dtype says otherwise.
Random-init weights (timing does not depend on them). `--codec snac32k` builds the real 32 kHz
SNAC architecture (54.5 M params), `debug` the tiny one the tests use. Medians over
`--repeats`. Writes one JSON line per batch size to stdout and, with `--out`, appends it there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import model.engine as engine_module
import model.sampler as sampler_module
from model.codec import DEBUG_CODEC_CONFIG, SNAC_32KHZ_CONFIG, Codec
from model.dit import DiT, DiTConfig
from model.engine import JOIN_SAMPLES, ContinuationEngine
from model.sampler import SamplingParams

PHASES = ("encode", "sample", "heard_context", "decode")


class PhaseClock:
    """Wall time per phase of one `continue_batch`, device-synchronised at every boundary.
    A phase nested in another (the decode inside heard_context) counts toward the outer one."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.depth = 0

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[phase] += time.perf_counter() - t0
                self.depth -= 1
        return timed


@contextlib.contextmanager
def instrumented(engine: ContinuationEngine, clock: PhaseClock):
    """The engine's phases timed through `clock` for the duration of the block."""
    saved = {name: engine.__dict__.get(name) for name in ("_encode", "heard_context",
                                                          "_decode_rows")}
    generate = engine_module.generate  # continue_batch's; extend's chunks call the sampler's
    engine._encode = clock.wrap("encode", engine._encode)
    engine.heard_context = clock.wrap("heard_context", engine.heard_context)
    engine._decode_rows = clock.wrap("decode", engine._decode_rows)  # every decode goes here
    engine_module.generate = sampler_module.generate = clock.wrap("sample", generate)
    try:
        yield clock
    finally:
        engine_module.generate = sampler_module.generate = generate
        for name, fn in saved.items():
            if fn is None:
                engine.__dict__.pop(name, None)
            else:
                setattr(engine, name, fn)


def run_once(engine: ContinuationEngine, audios, params) -> dict[str, float]:
    """Seconds per phase and in total of one /continue batch."""
    clock = PhaseClock(engine.device)
    with instrumented(engine, clock):
        clock.sync()
        t0 = time.perf_counter()
        out = engine.continue_batch(audios, params, lead_in=JOIN_SAMPLES)
        clock.sync()
        total = time.perf_counter() - t0
    assert len(out) == len(audios) and out[0].shape[-1] == JOIN_SAMPLES + engine.chunk_samples
    return {**clock.seconds, "total": total}


def build_engine(preset: str, codec: str, device, dtype: torch.dtype,
                 overrides: dict | None = None) -> ContinuationEngine:
    """A random-init engine: `codec` is debug, snac32k or a codec directory."""
    torch.manual_seed(0)
    named = {"debug": DEBUG_CODEC_CONFIG, "snac32k": SNAC_32KHZ_CONFIG}
    codec = Codec.load(named.get(codec, codec), device)
    dit = DiT(DiTConfig.from_name(preset, codebook_size=codec.codebook_size, **(overrides or {})))
    return ContinuationEngine(codec, dit.to(device, dtype).eval())


def measure(engine: ContinuationEngine, batch_size: int, steps, warmup: int,
            repeats: int) -> dict:
    """Median seconds per phase over `repeats` /continue batches of 12.288 s inputs."""
    chunk, n = engine.chunk_samples, engine.codec.n_levels
    g = torch.Generator().manual_seed(batch_size)
    audios = [torch.randn(2 * chunk, generator=g) * 0.1 for _ in range(batch_size)]
    params = [SamplingParams(steps=tuple(steps), seed=i).validated(n) for i in range(batch_size)]
    for _ in range(warmup):
        run_once(engine, audios, params)
    runs = [run_once(engine, audios, params) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--codec", default="debug",
                    help="debug, snac32k (random-init architectures) or a codec directory "
                         "(e.g. weights/demo/codec)")
    ap.add_argument("--dit", default="",
                    help="DiTConfig overrides on the preset, e.g. d_model=192,n_layers=4,n_heads=3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the DiT's dtype: auto = bfloat16 on CUDA (as the server), else float32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", default="16,12,8,8", help="per-level sampling steps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (2 CUDA, 1 CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in args.dit.split(",") if kv)}
    engine = build_engine(args.preset, args.codec, device, getattr(torch, dtype), overrides)
    steps = tuple(int(s) for s in args.steps.split(","))
    rows = []
    for bs in args.batch_sizes:
        med = measure(engine, bs, steps, warmup, args.repeats)
        audio_s = bs * engine.chunk_samples / engine.sample_rate
        row = dict(
            preset=args.preset,
            dit=overrides,
            params=engine.dit.num_params(),
            codec=args.codec,
            device=str(device),
            device_name=torch.cuda.get_device_name(device) if cuda
            else platform.processor() or "cpu",
            threads=torch.get_num_threads(),
            dtype=dtype,
            batch_size=bs,
            steps=list(steps),
            warmup=warmup,
            repeats=args.repeats,
            median_s={k: round(v, 4) for k, v in med.items()},
            realtime_factor=round(audio_s / med["total"], 3),
            requests_per_s=round(bs / med["total"], 3),
            torch=torch.__version__,
        )
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return rows


if __name__ == "__main__":
    main()
