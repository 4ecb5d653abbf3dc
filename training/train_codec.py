"""Train or fine-tune a SNAC codec (the SNAC / DAC recipe). See docs/codec-training.md.

    python training/train_codec.py --config training/configs/codec_small.toml --train data/corpus
    python training/train_codec.py --preset snac32k --train data/corpus --out_dir runs/snac32k
    python training/train_codec.py --init hubertsiuzdak/snac_32khz --freeze_encoder true \
        --lr 1e-4 --train data/corpus --out_dir runs/ft        # decoder-only fine-tune
    python training/train_codec.py export runs/ft runs/ft/export   # checkpoint -> codec dir

A run directory holds config.json (resolved config), log.jsonl (one JSON object per log/val
line), checkpoints/ (the last `keep_last`) and, at the end, export/ (config.json +
pytorch_model.bin + model.safetensors: `snac.SNAC.from_pretrained(dir)`, `Codec.load(dir)` and
`python -m training.tokenize --codec dir` all take it). Re-running the same command resumes
exactly from the newest checkpoint (`--resume never` starts over; `--resume PATH` picks one);
a resumed run takes its config from the checkpoint, then the TOML file, then the command line.
SIGINT / SIGTERM finish the current step, save a checkpoint and exit (130 / 143).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # `python training/train_codec.py` puts training/ first on sys.path, where training/tokenize.py
    # would shadow the stdlib `tokenize` (imported by torch via linecache). Swap it for the repo
    # root before importing anything else.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model.codec import CodecLoadError, pad_samples, save_snac  # noqa: E402
from training.codec_checkpoint import (  # noqa: E402
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from training.codec_config import (  # noqa: E402
    CodecTrainConfig,
    curriculum_stage,
    load_config,
    segment_samples,
    to_dict,
)
from training.codec_data import (  # noqa: E402
    SegmentBatches,
    StepSampler,
    find_audio_files,
    load_val_segments,
    probe,
    split_train_val,
)
from training.codec_eval import collapsed_levels, evaluate  # noqa: E402
from training.codec_model import count_params, load_snac  # noqa: E402
from training.codec_trainer import CodecTrainer  # noqa: E402
from training.trainer import ignore_stop_signals  # noqa: E402

CALIBRATION_STEP = 10**12


class StopFlag:
    """SIGINT/SIGTERM -> finish the step, checkpoint, exit. Handlers restored afterwards."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: the user means it
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nsignal {signum}: saving a checkpoint after this step", file=sys.stderr)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def jsonable(metrics: dict) -> dict:
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


def prepare_data(cfg: CodecTrainConfig, sample_rate: int, pad: int):
    files = probe(find_audio_files(cfg.train))
    if cfg.val:
        train, val = files, probe(find_audio_files(cfg.val))
    else:
        train, val = split_train_val(files, cfg.val_files)
    if not train:
        raise SystemExit(f"error: no readable training audio in {cfg.train}")
    stage = functools.partial(curriculum_stage, cfg.curriculum, sample_rate, pad)
    dataset = SegmentBatches(train, sample_rate, stage, cfg.steps, cfg.seed, cfg.min_rms)
    val_segments = load_val_segments(val, sample_rate,
                                     segment_samples(cfg.val_seconds, sample_rate, pad))
    hours = sum(f.seconds for f in train) / 3600
    print(f"data: {len(train)} training files ({hours:.2f} h), {len(val)} validation files",
          file=sys.stderr)
    return dataset, val_segments


def train(cfg: CodecTrainConfig, ckpt: dict | None = None) -> int:
    """Run (or resume, from the loaded checkpoint `ckpt`) training; returns an exit code."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        trainer = CodecTrainer(cfg, ckpt["model_config"] if ckpt else None)
    except (CodecLoadError, ValueError, OSError) as e:  # bad --init: path, hub id, weights
        raise SystemExit(f"error: {e}") from e
    if ckpt:
        trainer.load_state_dict(ckpt)
        set_rng_state(ckpt["rng"])  # after model init, which drew from the same generators
    (out / "config.json").write_text(json.dumps(
        {"train": to_dict(cfg), "model": trainer.model_config}, indent=2))
    print(f"codec: {count_params(trainer.model) / 1e6:.2f} M params "
          f"({sum(p.numel() for p in trainer.trainable) / 1e6:.2f} M trainable), "
          f"device {trainer.device}, amp {trainer.amp_dtype or 'fp32'}, "
          f"start step {trainer.step}", file=sys.stderr)

    pad = pad_samples(trainer.model_config)
    try:
        dataset, val_segments = prepare_data(cfg, trainer.sample_rate, pad)
    except (FileNotFoundError, ValueError) as e:  # bad paths / undecodable val files
        raise SystemExit(f"error: {e}") from e
    # Fixed calibration batches for folding the quantiser-input centre (far past any real step
    # index, so they are not batches the run trains on).
    trainer.calibration = [dataset[CALIBRATION_STEP + i]
                           for i in range(cfg.centre_calibration_batches)]
    loader = DataLoader(dataset, batch_size=None, sampler=StepSampler(trainer.step, cfg.steps),
                        num_workers=cfg.num_workers, pin_memory=trainer.device.type == "cuda",
                        prefetch_factor=4 if cfg.num_workers else None,
                        # Its own generator: iterator creation draws a worker seed, and from
                        # the global RNG that draw would shift the NoiseBlocks' stream on resume.
                        generator=torch.Generator().manual_seed(cfg.seed),
                        # A signal to the whole group (Ctrl-C, pkill -f) must not kill the workers
                        # before the trainer has finished its step and saved.
                        worker_init_fn=ignore_stop_signals if cfg.num_workers else None)
    ckpt_dir = out / "checkpoints"

    def checkpoint():
        save_checkpoint(ckpt_dir, trainer.step, {**trainer.state_dict(), "config": to_dict(cfg)},
                        cfg.keep_last)

    def validate():
        metrics = evaluate(trainer.export_model(), val_segments, trainer.recon, trainer.codebook_size,
                           trainer.device, seed=cfg.seed)
        if not metrics:
            return
        collapsed = collapsed_levels(metrics, cfg.collapse_perplexity)
        log({"step": trainer.step, **metrics, "val/collapsed": collapsed})
        levels = range(len([k for k in metrics if k.startswith("val/perplexity_")]))
        summary = "  ".join(f"L{lv} {metrics[f'val/unique_{lv}']} codes ppl "
                            f"{metrics[f'val/perplexity_{lv}']:.0f}" for lv in levels)
        tqdm.write(f"val step {trainer.step}: mel {metrics['val/mel']:.3f}  "
                   f"si_sdr {metrics['val/si_sdr']:.1f} dB  {summary}", file=sys.stderr)
        for lv in collapsed:
            tqdm.write(f"WARNING: codebook level {lv} has COLLAPSED at step {trainer.step}: "
                       f"{metrics[f'val/unique_{lv}']} codes used on validation audio, "
                       f"perplexity {metrics[f'val/perplexity_{lv}']:.1f} < "
                       f"{cfg.collapse_perplexity} (collapse_perplexity). Its tokens carry almost "
                       f"no information; check codebook_init / dead_code_every.", file=sys.stderr)

    log_file = open(out / "log.jsonl", "a")

    def log(row: dict):
        log_file.write(json.dumps(jsonable(row)) + "\n")
        log_file.flush()

    sums: dict[str, torch.Tensor] = {}
    window_start, window_steps, last_saved = time.perf_counter(), 0, trainer.step
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not cfg.progress,
               dynamic_ncols=True, desc="codec")
    with StopFlag() as stop:
        for batch in loader:
            metrics = trainer.train_step(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            window_steps += 1
            bar.update(1)
            if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                row = {k: float(v) / window_steps for k, v in sums.items()}
                lrs = trainer.sched_g.get_last_lr()  # [encoder + quantiser (if trained), decoder]
                if len(lrs) == 2:
                    row["lr_encoder"] = lrs[0]
                row.update(step=trainer.step, lr=lrs[-1],
                           segment_samples=batch.shape[-1], batch=batch.shape[0],
                           it_per_s=window_steps / elapsed)
                log(row)
                bar.set_postfix(mel=f"{row['loss/mel']:.3f}", total=f"{row['loss/total']:.3f}")
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            if cfg.val_every and trainer.step % cfg.val_every == 0:
                validate()
            if trainer.step % cfg.ckpt_every == 0 or stop.signum is not None:
                checkpoint()
                last_saved = trainer.step
            if stop.signum is not None:
                bar.close()
                log_file.close()
                print(f"stopped at step {trainer.step}; resume with the same command",
                      file=sys.stderr)
                return 128 + stop.signum
    bar.close()
    if trainer.step != last_saved or not latest_checkpoint(ckpt_dir):
        checkpoint()
    if not cfg.val_every or trainer.step % cfg.val_every:
        validate()
    log_file.close()
    save_snac(trainer.export_model(), trainer.model_config, out / "export")
    print(f"done: step {trainer.step}; codec exported to {out / 'export'}", file=sys.stderr)
    return 0


def export_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="train_codec.py export",
                                description="checkpoint (or run dir: newest checkpoint) -> codec dir")
    p.add_argument("source", help="a ckpt_*.pt, a run directory, or an export directory")
    p.add_argument("out_dir")
    p.add_argument("--fp16", action="store_true",
                   help="store the weights in fp16 (half the size; what weights/demo ships)")
    a = p.parse_args(argv)
    src = Path(a.source)
    if src.is_dir() and (src / "checkpoints").is_dir():
        src = latest_checkpoint(src / "checkpoints") or src
    try:
        model, config = load_snac(str(src))
    except (CodecLoadError, ValueError, OSError) as e:
        p.error(str(e))
    save_snac(model, config, a.out_dir, torch.float16 if a.fp16 else None)
    print(f"exported {src} -> {a.out_dir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return export_command(argv[1:])
    p = argparse.ArgumentParser(
        description="Train / fine-tune a SNAC codec. Any config field is a flag: --lr 1e-4, "
                    "--model.decoder_dim 256, --loss_weights.adv 0 (see training/codec_config.py).",
        allow_abbrev=False)
    p.add_argument("--config", help="TOML file (training/configs/codec_*.toml)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest checkpoint in out_dir, if any), never, or a checkpoint path")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        resume_from, ckpt = None, None
        if args.resume == "auto":
            resume_from = latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
        elif args.resume != "never":
            resume_from = Path(args.resume)
            if not resume_from.is_file():
                raise ValueError(f"--resume {resume_from}: no such checkpoint")
        if resume_from:
            ckpt = load_checkpoint(resume_from)
            cfg = load_config(args.config, overrides, base=ckpt["config"])
            print(f"resuming from {resume_from}", file=sys.stderr)
    except (ValueError, OSError) as e:
        p.error(str(e))
    return train(cfg, ckpt)


if __name__ == "__main__":
    sys.exit(main())
