"""Train or fine-tune a SNAC codec (the SNAC / DAC recipe). See docs/codec-training.md.
Also `snac-dit-train-codec ...` and `python -m training.codec.cli ...`.

    python training/train_codec.py --config training/configs/codec_small.toml --train data/corpus
    python training/train_codec.py --preset snac32k --train data/corpus --out_dir runs/snac32k
    python training/train_codec.py --init hubertsiuzdak/snac_32khz --freeze_encoder true \
        --lr 1e-4 --train data/corpus --out_dir runs/ft        # decoder-only fine-tune
    python training/train_codec.py export runs/ft runs/ft/export   # checkpoint -> codec dir

A run directory holds config.json (resolved config), log.jsonl (one JSON object per log/val
line), checkpoints/ (the last `keep_last`, in the format of training/run/checkpoint.py) and, at
the end, export/ (config.json + pytorch_model.bin + model.safetensors:
`snac.SNAC.from_pretrained(dir)`, `Codec.load(dir)` and `python -m training.tokens --codec dir`
all take it). Re-running the same command resumes exactly from the newest checkpoint
(`--resume never` starts over; `--resume PATH` picks one); a resumed run takes its config from
the checkpoint, then the TOML file, then the command line. SIGINT / SIGTERM finish the current
step, save a checkpoint and exit (130 / 143).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from audio import probe
from model.codec import pad_samples
from model.weights import CodecLoadError, save_snac
from training.codec.config import (
    CodecTrainConfig,
    curriculum_stage,
    load_config,
    segment_samples,
    to_dict,
)
from training.codec.data import (
    SegmentBatches,
    StepSampler,
    find_audio_files,
    load_val_segments,
    split_train_val,
)
from training.codec.eval import collapsed_levels, encoder_spectrum, evaluate
from training.codec.model import count_params, load_for_training
from training.codec.trainer import CodecTrainer
from training.run import checkpoint as ckpt_io
from training.run.rng import capture_rng, restore_rng
from training.run.signals import StopFlag, ignore_stop_signals

CALIBRATION_STEP = 10**12


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


# A checkpoint's weights files; the rest of CodecTrainer.state_dict() is trainer state.
WEIGHT_PARTS = ("model", "disc", "aux", "aux_spectrum")


def checkpoint_state(trainer: CodecTrainer, cfg: CodecTrainConfig) -> tuple[dict, dict, dict]:
    """(weights, config record, trainer state) for training/run/checkpoint.save_checkpoint."""
    state = trainer.state_dict()
    weights = {k: state.pop(k) for k in WEIGHT_PARTS if k in state}
    record = {"train": to_dict(cfg), "model": state.pop("model_config")}
    state["rng"] = capture_rng()
    return weights, record, state


def trainer_state(ck: dict) -> dict:
    """A loaded checkpoint back in CodecTrainer.load_state_dict's form."""
    return {**ck["trainer"], **ck["weights"], "model_config": ck["config"]["model"]}


def train(cfg: CodecTrainConfig, ckpt: dict | None = None) -> int:
    """Run (or resume, from the loaded checkpoint `ckpt`) training; returns an exit code."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        trainer = CodecTrainer(cfg, ckpt["config"]["model"] if ckpt else None)
    except (CodecLoadError, ValueError, OSError) as e:  # bad --init or --device
        raise SystemExit(f"error: {e}") from e
    if ckpt:
        trainer.load_state_dict(trainer_state(ckpt))
        restore_rng(ckpt["trainer"]["rng"])  # after model init, which drew from the same RNGs
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
        ckpt_io.save_checkpoint(ckpt_dir, trainer.step, *checkpoint_state(trainer, cfg),
                                cfg.keep_last)

    def validate():
        if trainer.step <= cfg.encoder_warmup_steps and trainer.spectrum_head is not None:
            # the warm-up: only the encoder has trained; the codes and decoder are untouched
            loss = encoder_spectrum(trainer.model, val_segments, trainer.spectrum_head,
                                    trainer.device)
            log({"step": trainer.step, "val/encoder_spectrum": loss})
            tqdm.write(f"val step {trainer.step} (encoder warm-up): encoder spectrum "
                       f"{loss:.3f}", file=sys.stderr)
            return
        metrics = evaluate(trainer.export_model(), val_segments, trainer.recon, trainer.codebook_size,
                           trainer.device, seed=cfg.seed, sample_rate=trainer.sample_rate,
                           chroma_head=trainer.chroma_head, spectrum_head=trainer.spectrum_head)
        if not metrics:
            return
        collapsed = collapsed_levels(metrics, cfg.collapse_perplexity)
        log({"step": trainer.step, **metrics, "val/collapsed": collapsed})
        levels = range(len([k for k in metrics if k.startswith("val/perplexity_")]))
        summary = "  ".join(f"L{lv} {metrics[f'val/unique_{lv}']} codes ppl "
                            f"{metrics[f'val/perplexity_{lv}']:.0f}" for lv in levels)
        pitch = (f"chroma {metrics['val/chroma']:.3f}  comb {metrics['val/comb_db']:+.1f} dB  "
                 if "val/chroma" in metrics else "")
        if "val/chroma_bass" in metrics:
            pitch += (f"(bass {metrics['val/chroma_bass']:.3f} "
                      f"upper {metrics.get('val/chroma_upper', float('nan')):.3f})  ")
        if "val/chroma_kl" in metrics:   # the coarse codes' pitch: the head's KL vs the prior's
            pitch += (f"chroma KL {metrics['val/chroma_kl']:.3f} "
                      f"(prior {metrics['val/chroma_kl_prior']:.3f})  ")
        if "val/encoder_spectrum" in metrics:
            pitch += f"encoder spectrum {metrics['val/encoder_spectrum']:.3f}  "
        tqdm.write(f"val step {trainer.step}: mel {metrics['val/mel']:.3f}  "
                   f"si_sdr {metrics['val/si_sdr']:.1f} dB  {pitch}{summary}", file=sys.stderr)
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
                bar.set_postfix({k.split("/")[1]: f"{row[k]:.3f}" for k in ("loss/mel", "loss/total")
                                 if k in row})
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            if cfg.val_every and trainer.step % cfg.val_every == 0:
                validate()
            if trainer.step % cfg.ckpt_every == 0 or stop.stopped:
                checkpoint()
                last_saved = trainer.step
            if stop.stopped:
                bar.close()
                log_file.close()
                print(f"stopped at step {trainer.step}; resume with the same command",
                      file=sys.stderr)
                return stop.exit_status()
    bar.close()
    if trainer.step != last_saved or not ckpt_io.latest_checkpoint(ckpt_dir):
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
    p.add_argument("source", help="a checkpoint, a run directory, or an export directory")
    p.add_argument("out_dir")
    p.add_argument("--fp16", action="store_true",
                   help="store the weights in fp16 (half the size; what weights/demo ships)")
    a = p.parse_args(argv)
    src = Path(a.source)
    if src.is_dir() and (src / "checkpoints").is_dir():
        src = ckpt_io.latest_checkpoint(src / "checkpoints") or src
    try:
        model, config = load_for_training(str(src))
    except (CodecLoadError, ckpt_io.CheckpointError, ValueError, OSError) as e:
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
                    "--model.decoder_dim 256, --loss_weights.adv 0 (see training/codec/config.py).",
        allow_abbrev=False)
    p.add_argument("--config", help="TOML file (training/configs/codec_*.toml)")
    p.add_argument("--resume", default=argparse.SUPPRESS,
                   help="auto (default: the newest checkpoint in out_dir/checkpoints, if any), "
                        "never, or a checkpoint")
    args, overrides = p.parse_known_args(argv)
    if "resume" in args:
        overrides += ["--resume", args.resume]
    try:
        cfg = load_config(args.config, overrides)
        ckpt = None
        resume_from = ckpt_io.resume_point(cfg.resume, Path(cfg.out_dir) / "checkpoints")
        if resume_from:
            ckpt = ckpt_io.load_checkpoint(resume_from)
            saved = dict(ckpt["config"]["train"])
            saved.pop("resume", None)  # belongs to one command, like the DiT trainer's
            cfg = load_config(args.config, overrides, base=saved)
            print(f"resuming from {resume_from}", file=sys.stderr)
    except (ValueError, OSError, ckpt_io.CheckpointError) as e:
        p.error(str(e))
    return train(cfg, ckpt)


if __name__ == "__main__":
    sys.exit(main())
