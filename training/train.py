"""Train the DiT: `python training/train.py [--config FILE.toml] [--section.key value ...]`.

    python training/train.py                                   # default config, data/tokens/
    python training/train.py --config training/configs/debug.toml
    python training/train.py --name run1 --resume              # continue run1's newest checkpoint
    torchrun --nproc_per_node=8 training/train.py --name run1  # DDP on 8 GPUs

Parse -> build -> loop; everything else lives in training/{config,trainer,...}.py. Exit status:
0 done (or stopped by SIGTERM after saving), 130 stopped by SIGINT after saving, 2 refused
(bad config, no tokenised data, missing checkpoint).
"""

import os
import sys

# Run as a script, Python puts training/ first on sys.path, where training/tokenize.py would
# shadow the standard library's `tokenize` (imported by torch through inspect/linecache).
# Swap it for the repository root, which also makes `training.*` / `model.*` importable
# without `pip install -e .`.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

from pathlib import Path  # noqa: E402

from training.config import ConfigError, load_config, parse_overrides, usage  # noqa: E402


def tokenize_hint(tokens_dir: str) -> str:
    return (
        f"no tokenised data in {tokens_dir!r}. Create it from a folder of audio with\n\n"
        f"    python -m training.tokenize --audio path/to/your/audio --out {tokens_dir}\n\n"
        "(that encodes with the pretrained SNAC 32 kHz codec; --codec DIR_OR_HUB_ID picks "
        "another; see docs/training.md)"
    )


def resolve_config(argv: list[str]):
    """(TrainConfig, checkpoint to resume from or None).

    A resumed run starts from the config saved in its checkpoint (less `stop_at`); a --config file
    and command-line overrides still apply on top (e.g. a longer final stage).
    """
    config_path, overrides = parse_overrides(argv)
    cfg = load_config(config_path, overrides)
    if not cfg.resume:
        return cfg, None
    from training import checkpoint as ckpt_io
    if cfg.resume == "latest":
        ckpt = ckpt_io.latest_checkpoint(cfg.run_dir)
        if ckpt is None:
            print(f"--resume: {cfg.run_dir} has no checkpoint yet; starting fresh", file=sys.stderr)
            return cfg, None
    else:
        ckpt = ckpt_io.resolve(cfg.resume)
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

    if not (Path(cfg.data.tokens) / "manifest.json").is_file():  # before the slow imports
        print(f"error: {tokenize_hint(cfg.data.tokens)}", file=sys.stderr)
        return 2

    from training import checkpoint as ckpt_io
    from training import distributed as D
    from training.trainer import DataMissingError, Trainer

    env = D.init_distributed(cfg.device)
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
