"""Turn a training checkpoint into the directory the server loads.

    snac-dit-export runs/NAME OUT_DIR                  # newest checkpoint, EMA weights
    snac-dit-export runs/NAME/ckpt-050000 OUT_DIR --raw
    snac-dit-export runs/dit_demo weights/demo/dit --fp16   # the shipped snapshot: fp16 on disk
    python -m training.dit.export runs/NAME OUT_DIR    # the same

OUT_DIR gets `model.safetensors` + `config.json` via `model.weights.save_pretrained` (the DiT
config, the diffusion schedules the sampler must use, the codec the tokens came from, and where
the weights came from), and the run's `metrics.jsonl` up to the exported step (the model card
reads it; a warm start with `init_step` carries it on). Serve it with
`ContinuationEngine.load(OUT_DIR, codec)`. EMA weights are
the default: they sample better than the raw weights of any single step.
"""

import argparse
import sys
from pathlib import Path


def export(ckpt: str | Path, out_dir: str | Path, raw: bool = False, fp16: bool = False) -> Path:
    import torch

    from model.dit import DiT, DiTConfig
    from model.weights import load_dit, save_pretrained
    from training.run import checkpoint as ckpt_io
    from training.run.observe import METRICS_FILE, copy_metrics

    ck = ckpt_io.load_checkpoint(ckpt)
    config = ck["config"]
    dit = DiT(DiTConfig.from_dict(config["model"]))
    state = ck["weights"]["model" if raw else "ema"]
    lora = config["train"].get("lora") or {}
    if lora.get("rank"):  # adapters: fold them in, the export is a plain DiT
        from training.dit.lora import merge_state

        state = merge_state(state, lora["alpha"] / lora["rank"])
    dit.load_state_dict(state)
    codec = config.get("codec", {})
    extra = dict(
        diffusion=config["diffusion"],
        codec=dict(fingerprint=codec.get("fingerprint"), source=codec.get("source"),
                   codes_fingerprint=codec.get("codes_fingerprint")),
        training=dict(checkpoint=str(ck["path"].resolve()), step=config["step"],
                      weights="raw" if raw else "ema", run=config["train"]["name"]),
    )
    out = save_pretrained(dit, out_dir, extra, torch.float16 if fp16 else None)
    load_dit(out)  # read it back: an export that the engine cannot load is an error here
    log = Path(ck["path"]).parent / METRICS_FILE  # the run's log ships with its weights
    if log.is_file():
        copy_metrics(log, out / METRICS_FILE, config["step"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a training checkpoint for serving.")
    p.add_argument("ckpt", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out_dir", help="serving directory to write (model.safetensors + config.json)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--fp16", action="store_true",
                   help="store the weights in fp16 (half the size; what weights/demo ships). "
                        "The engine computes in fp32 on CPU and bf16 on CUDA either way")
    args = p.parse_args(argv)
    from training.run.checkpoint import CheckpointError

    try:
        out = export(args.ckpt, args.out_dir, args.raw, args.fp16)
    except (CheckpointError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {'raw' if args.raw else 'EMA'} weights of {args.ckpt} to {out}"
          f"{' in fp16' if args.fp16 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
