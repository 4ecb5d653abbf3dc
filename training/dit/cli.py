"""Train the DiT: `python training/train.py [--config FILE.toml] [--section.key value ...]`
(also `snac-dit-train`).

    python training/train.py                                   # default config, data/tokens/
    python training/train.py --config training/configs/debug.toml
    python training/train.py --name run1                       # again: continues run1
    python training/train.py --name run1 --resume never        # start run1 over
    torchrun --nproc_per_node=8 training/train.py --name run1  # DDP on 8 GPUs

Parse -> build -> loop; the rest lives in training/dit/{config,trainer,...}.py. Re-running a
command continues its run from the newest checkpoint (`resume = "auto"`). Exit status: 0 done,
130 / 143 stopped by SIGINT / SIGTERM after saving, 2 refused (bad config, no tokenised data,
missing checkpoint).
"""

import sys
from pathlib import Path

from training.dit.config import ConfigError, load_config, parse_overrides, usage


def tokenize_hint(tokens_dir: str) -> str:
    return (
        f"no tokenised data in {tokens_dir!r}. Create it from a folder of audio with\n\n"
        f"    python -m training.tokens --audio path/to/your/audio --out {tokens_dir}\n\n"
        "(that encodes with the pretrained SNAC 32 kHz codec; --codec DIR_OR_HUB_ID picks "
        "another; see docs/training.md)"
    )


# Above this many parameters a model is GPU-sized: the `small` demo DiT (16 M) takes about
# 8 CPU-hours on 2 cores for its 5,000 steps; the default `base` (109 M) would take weeks.
GPU_SIZED_PARAMS = 50_000_000
CPU_CONFIG = "training/configs/dit_demo.toml"


def gpu_sized_on_cpu(cfg) -> str | None:
    """Why not to start, when `device = "auto"` finds no GPU and the model is GPU-sized; None
    otherwise (a GPU, an explicit `--device cpu`, a fine-tune of an exported model)."""
    if cfg.device != "auto" or cfg.init:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    from model.dit import DiT, DiTConfig

    model = {k: v for k, v in cfg.model.items() if k != "preset"}
    try:
        with torch.device("meta"):  # counts parameters without allocating them
            n = sum(p.numel() for p in DiT(DiTConfig.from_name(cfg.model["preset"], **model))
                    .parameters())
    except (KeyError, TypeError, ValueError):
        return None  # a bad [model] section: the trainer says what is wrong with it
    if n < GPU_SIZED_PARAMS:
        return None
    return (
        f"no GPU here, and this config trains a GPU-sized DiT (preset "
        f"'{cfg.model['preset']}', {n / 1e6:.0f} M parameters): on a CPU that takes weeks. "
        f"On a CPU, train the demo DiT (preset 'small', about 8 CPU-hours on 2 cores):\n\n"
        f"    python training/train.py --config {CPU_CONFIG}\n\n"
        "(docs/training.md, \"The demo DiT\"). To train this config on the CPU anyway, say so "
        "with --device cpu."
    )


def resolve_config(argv: list[str]):
    """(TrainConfig, checkpoint to resume from or None).

    A resumed run starts from the config saved in its checkpoint (less `stop_at`); a --config file
    and command-line overrides still apply on top (e.g. a longer final stage).
    """
    config_path, overrides = parse_overrides(argv)
    cfg = load_config(config_path, overrides)
    from training.run import checkpoint as ckpt_io

    ckpt = ckpt_io.resume_point(cfg.resume, cfg.run_dir)
    if ckpt is None:
        if cfg.resume == "latest":
            print(f"--resume: {cfg.run_dir} has no checkpoint yet; starting fresh", file=sys.stderr)
        return cfg, None
    saved = ckpt_io.read_config(ckpt)["train"]
    for per_invocation in ("stop_at", "resume"):  # not inherited: they belong to one command
        saved.pop(per_invocation, None)
    cfg = load_config(config_path, overrides, base=saved)
    return cfg, ckpt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        cfg, ckpt = resolve_config(argv)
    except (ConfigError, FileNotFoundError, RuntimeError) as e:  # CheckpointError is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 2

    # Both refusals at once, when both apply: a fresh clone on a laptop meets them together.
    refusals = [gpu_sized_on_cpu(cfg)]
    if not (Path(cfg.data.tokens) / "manifest.json").is_file():  # before the slow imports
        refusals.append(tokenize_hint(cfg.data.tokens))
    refusals = [r for r in refusals if r]
    if refusals:
        print("\n\n".join(f"error: {r}" for r in refusals), file=sys.stderr)
        return 2

    from training.dit.trainer import DataMissingError, Trainer
    from training.run import checkpoint as ckpt_io
    from training.run import distributed as D

    try:
        env = D.init_distributed(cfg.device)
    except ValueError as e:  # not a device, or CUDA asked for and absent
        print(f"error: device: {e}", file=sys.stderr)
        return 2
    try:
        try:
            trainer = Trainer(cfg, env)
            if ckpt is not None:
                trainer.load(ckpt)
        except (DataMissingError, ConfigError, ckpt_io.CheckpointError) as e:
            if env.is_main:
                print(f"error: {e}", file=sys.stderr)
            return 2
        return trainer.fit()
    finally:
        D.shutdown(env)


if __name__ == "__main__":
    sys.exit(main())
