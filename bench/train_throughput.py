"""Training throughput (tokens/s, MFU) of a DiT preset through the real training loop.

    python bench/train_throughput.py --preset debug --batch-size 4
    python bench/train_throughput.py --preset base --device cuda --compile    # batch 32, 20 steps
    python bench/train_throughput.py --preset small --model d_model=192,n_layers=4,n_heads=3

Builds a synthetic token directory (random ids, the real SNAC 32 kHz geometry) in a temp dir and
times `Trainer.train_step` (data loading, forward, backward, clipping, AdamW, EMA) after warm-up.
Tokens are sequence tokens: context + clean target + noised target (3,328 per row at n_ctx = 2).
MFU = model FLOP/s / peak, with the FLOPs the DiT really runs (model/flops.py: trunk matmuls per
token, attention over the layout's visible pairs, conditioning per segment, one head per noised
token); n/a on CPU unless --peak-tflops is given. Defaults on CUDA are a realistic run (batch 32
as training/configs/default.toml, 5 warm-up and 20 timed steps); on CPU a short one. Prints one
JSON object (and appends it to --out if given).
"""

import argparse  # noqa: E402
import json  # noqa: E402
import sys
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.dit.config import load_config  # noqa: E402
from training.dit.trainer import Trainer, sequence_tokens  # noqa: E402
from training.tokens.shards import write_token_dir  # noqa: E402


def synthetic_tokens(out: Path, n_files: int = 8, chunks: int = 6, seed: int = 0,
                     codebook: int = 4096) -> Path:
    rng = np.random.default_rng(seed)
    frames = chunks * 64
    files = {f"f{i}.wav": [rng.integers(0, codebook, frames * 8 // s).astype(np.uint16)
                           for s in (8, 4, 2, 1)] for i in range(n_files)}
    write_token_dir(out, files, codebook_size=codebook)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--model", default="",
                   help="overrides on the preset, e.g. d_model=192,n_layers=4,n_heads=3,style_actions=8")
    p.add_argument("--codebook", type=int, default=4096,
                   help="codes a level (SNAC's 4,096; the project's demo codecs 1,024)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 4 on CPU")
    p.add_argument("--n-ctx", default="0,0,1", help="weights of n_ctx 0,1,2 (default: all 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed optimizer steps (default: 20 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first: compile, caches, autotuning (default 5 / 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--out", type=Path, help="append the JSON result to this file")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.batch_size = args.batch_size or (32 if cuda else 4)
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)

    with tempfile.TemporaryDirectory() as tmp:
        tokens = synthetic_tokens(Path(tmp) / "tokens", codebook=args.codebook)
        weights = [float(w) for w in args.n_ctx.split(",")]
        total = args.warmup + args.steps
        model = [(f"model.{k}", int(v)) for k, v in
                 (kv.split("=", 1) for kv in args.model.split(",") if kv)]
        cfg = load_config(None, [
            ("name", "bench"), ("out_dir", tmp), ("device", args.device), ("dtype", args.dtype),
            ("compile", args.compile), ("model.preset", args.preset),
            ("data.tokens", str(tokens)), ("data.batch_size", args.batch_size),
            ("data.num_workers", args.workers), ("eval.every", 0),
            ("log.peak_tflops", args.peak_tflops), ("optim.warmup_steps", 1),
            ("curriculum.stages", [{"name": "bench", "steps": total, "n_ctx": weights}]),
            *model,
        ])
        trainer = Trainer(cfg)
        for _ in range(args.warmup):
            trainer.train_step()
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        sync()
        trainer.meter.reset()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            terms = trainer.train_step()
        loss = float(terms["loss"])  # host sync: all queued work is done
        sync()
        dt = time.perf_counter() - t0
        rate = trainer.meter.read()
        flops = rate["mfu"] * trainer.meter.peak if rate["mfu"] is not None else None
        mc = trainer.model_cfg
        result = dict(
            preset=args.preset, model=args.model, codebook=args.codebook, params=trainer.n_params, batch_size=args.batch_size,
            n_ctx_weights=weights, device=str(trainer.device),
            device_name=torch.cuda.get_device_name(trainer.device)
            if trainer.device.type == "cuda" else "cpu",
            threads=torch.get_num_threads(), dtype=trainer.compute, compile=args.compile,
            steps=args.steps,
            step_s=round(dt / args.steps, 4), tokens_per_s=round(rate["tokens_per_s"], 1),
            rows_per_s=round(args.batch_size * args.steps / dt, 2),
            seq_tokens_at_n_ctx2=sequence_tokens(2, mc.frames_per_chunk),
            model_tflops_per_s=None if flops is None else round(flops / 1e12, 2),
            mfu=None if rate["mfu"] is None else round(rate["mfu"], 4), loss=round(loss, 4),
            torch=torch.__version__,
        )
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
