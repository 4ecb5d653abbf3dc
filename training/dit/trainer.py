"""The training loop: build everything from a TrainConfig, train through the curriculum, resume.

One optimizer step = `optim.grad_accum` micro-batches of `data.batch_size` windows per rank. The
n_ctx of each row is drawn by the data sampler from the current stage's weights (batches mix
n_ctx; rows are left-padded, the layout pads sequences). Every random choice of a step (context
dropout, t, masks) comes from a generator seeded by (seed, step, micro-batch, rank), and the data
order is a pure function of the sampler position, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from model.diffusion import DiffusionConfig, MaskedDiffusion
from model.dit import DiT, DiTConfig
from model.flops import train_flops
from model.weights import WEIGHTS_FILE, read_dit_config
from training.dit.config import ConfigError, TrainConfig
from training.dit.curriculum import dataset_values, stage_at, stage_sampler, trains_after_context
from training.dit.evaluate import Evaluator
from training.dit.lora import add_lora, merge_state
from training.dit.memory import checkpoint_blocks
from training.dit.optim import EMA, build_optimizer, build_scheduler
from training.dit.step import (  # noqa: F401 - cpu_has_bf16, sequence_tokens: callers' names
    LossModule,
    cpu_has_bf16,
    sequence_tokens,
    step_seed,
)
from training.run import checkpoint as ckpt_io
from training.run import distributed as D
from training.run.observe import (
    METRICS_FILE,
    MetricsLog,
    Throughput,
    copy_metrics,
    peak_flops,
)
from training.run.rng import capture_rng, restore_rng, seed_everything
from training.run.signals import StopFlag, ignore_stop_signals
from training.tokens.shards import ManifestError, read_manifest
from training.tokens.windows import TokenWindows, collate_windows

# CPU bf16 autocast hands the qk RMSNorm bf16 activations and its fp32 weight; torch then skips
# a fused kernel and says so once. Harmless (the unfused path is what runs), but it reads like
# an error in every user's training log.
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight",
                        category=UserWarning)


class DataMissingError(RuntimeError):
    """The token directory is absent or unreadable; train.py turns this into exit status 2."""


class Trainer:
    def __init__(self, cfg: TrainConfig, env: D.DistEnv | None = None):
        self.cfg = cfg
        self.env = env or D.DistEnv()
        self._bar = None  # the progress bar while fit() runs: messages print above it
        self.device = self.env.device
        self.run_dir = cfg.run_dir

        try:
            self.manifest = read_manifest(cfg.data.tokens)
        except ManifestError as e:
            raise DataMissingError(str(e)) from e
        contexts = list(cfg.data.contexts)
        if "tiles" not in self.manifest and any(contexts[:2]):
            print(f"warning: {cfg.data.tokens} was tokenised without context tiles, so every "
                  "context is whole-file tokens, which peek at the target near its start; "
                  "re-tokenise to train on contexts as /continue encodes them", file=sys.stderr)
            contexts = [0.0, 0.0, 1.0]
        self.editing = trains_after_context(cfg.curriculum.stages)
        self.train_set = TokenWindows(cfg.data.tokens, "train",
                                      n_ctx=dataset_values(cfg.curriculum.stages),
                                      contexts=contexts)
        if len(self.train_set) == 0:
            raise DataMissingError(
                f"{cfg.data.tokens} has no training windows (files shorter than one 6.144 s chunk, "
                "or every file in the val split); tokenise more audio"
            )

        # Model geometry comes from the tokens; the preset and overrides set the trunk.
        geo = self.manifest["codec"]["geometry"]
        overrides = {k: v for k, v in cfg.model.items() if k != "preset"}
        from_tokens = dict(
            n_levels=len(geo["strides"]), codebook_size=int(geo["codebook_size"]),
            frames_per_chunk=tuple(geo["frames_per_chunk"]), strides=tuple(geo["strides"]),
            max_after_chunks=int(self.editing),     # from the curriculum: editing layouts
        )
        self.init_weights = None
        if cfg.init:
            # Fine-tune: the exported model's own architecture, on these tokens.
            try:
                base = DiTConfig.from_dict(read_dit_config(cfg.init)["dit"])
            except (OSError, ValueError, TypeError) as e:
                raise ConfigError(f"init {cfg.init!r}: {e}") from e
            for k, v in from_tokens.items():
                if k != "max_after_chunks" and tuple(np.atleast_1d(getattr(base, k))) != tuple(
                        np.atleast_1d(v)):
                    raise ConfigError(
                        f"init {cfg.init!r} has {k} = {getattr(base, k)}, but the tokens in "
                        f"{cfg.data.tokens} have {v}: tokenise with the codec that model was "
                        "trained on")
            # Style actions may be added to (or retuned on) an exported model: the new path starts
            # at zero, so the fine-tune starts from that model exactly (docs/model.md).
            style = {k: v for k, v in overrides.items() if k.startswith("style_")}
            try:
                self.model_cfg = dataclasses.replace(
                    base, max_after_chunks=max(base.max_after_chunks,
                                               from_tokens["max_after_chunks"]), **style)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"[model] {style}: {e}") from e
            self.init_weights = Path(cfg.init) / WEIGHTS_FILE
        else:
            for k, v in from_tokens.items():
                if k in overrides and tuple(np.atleast_1d(overrides[k])) != tuple(
                        np.atleast_1d(v)):
                    raise ConfigError(f"model.{k} = {overrides[k]} contradicts the tokens ({v})")
            try:
                self.model_cfg = DiTConfig.from_name(cfg.model["preset"],
                                                     **{**overrides, **from_tokens})
            except (TypeError, ValueError) as e:  # unknown preset or field, bad value
                raise ConfigError(f"[model] {cfg.model}: {e}") from e
        try:
            self.diff_cfg = DiffusionConfig.from_dict(cfg.diffusion)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[diffusion] {cfg.diffusion}: {e}") from e

        seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        self.dit = DiT(self.model_cfg).to(self.device)
        if self.init_weights is not None:
            from safetensors.torch import load_file

            state = load_file(str(self.init_weights), device=str(self.device))
            missing, unexpected = self.dit.load_state_dict(
                {k: v.float() for k, v in state.items()}, strict=False)
            # Only a style path the exported model lacks may be missing (it starts at init).
            if unexpected or any(not k.startswith("style") for k in missing):
                raise ConfigError(f"init {cfg.init!r} does not fit the model: missing "
                                  f"{missing}, unexpected {unexpected}")
        self.n_params = self.dit.num_params()
        self.lora_scale = None
        if cfg.lora.rank:
            trainable = add_lora(self.dit, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
            self.lora_scale = cfg.lora.alpha / cfg.lora.rank
            self._print(f"lora: rank {cfg.lora.rank} adapters on {', '.join(cfg.lora.targets)}: "
                        f"{trainable / 1e6:.3f} M trainable of {self.n_params / 1e6:.2f} M")
        self.dit.checkpoint_blocks = checkpoint_blocks(cfg, self.model_cfg, self.n_params,
                                                      self.device, self._print)
        self.ema = EMA(self.dit, cfg.optim.ema_decay, cfg.optim.ema_warmup)
        module = LossModule(self.dit, MaskedDiffusion(self.diff_cfg))
        if cfg.compile:
            self.dit.compile()
        self.model = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda"
                         else None) if self.env.enabled else module
        self.opt = build_optimizer(self.dit, cfg.optim, self.device)
        self.sched = build_scheduler(self.opt, cfg.optim, cfg.total_steps, cfg.init_step)
        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.compute = "bf16 autocast" if bf16 else "fp32"
        self.autocast = (functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
                         if bf16 else contextlib.nullcontext)
        if self.device.type == "cpu" and cfg.dtype == "bf16" and not cpu_has_bf16():
            self._print("warning: dtype bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) "
                        "is emulated and slower than fp32; set dtype = \"fp32\"")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # A warm start (init_step) goes on where the exported run stood; load() replaces all of
        # this when the run has a checkpoint of its own.
        self.step = cfg.init_step
        self.ema.num_updates = cfg.init_step
        self.data_state: dict | None = None  # sampler position after the last trained batch
        self.data_stage: int | None = None  # curriculum stage the data state belongs to
        self._loader_stage: int | None = None
        self._batches = None
        self.gen = torch.Generator(self.device)  # reseeded per micro-batch (stateless draws)
        # On CUDA the context dropout is drawn on the host (training/dit/step.py: no sync).
        self.host_gen = torch.Generator() if self.device.type == "cuda" else None

        self.evaluator = Evaluator(cfg, self.manifest, self.model_cfg, self.diff_cfg, self.device,
                                   self.autocast) if self.env.is_main else None
        if self.env.is_main and cfg.init_step:
            self._carry_history()
        self.log = MetricsLog(self.run_dir, cfg.log.tensorboard) if self.env.is_main else None
        peak = peak_flops(self.device, cfg.log.peak_tflops)
        self.meter = Throughput(peak, self.env.world_size)

    def _carry_history(self) -> None:
        """A warm start's metrics.jsonl begins with the exported run's own rows up to init_step
        (export ships them next to the weights), so curves, hours and the card span the whole run
        across machines. Only when the run has no log of its own yet."""
        mine = self.run_dir / METRICS_FILE
        theirs = Path(self.cfg.init) / METRICS_FILE
        if mine.exists():
            return
        if not theirs.is_file():
            self._print(f"note: {self.cfg.init} has no {METRICS_FILE}: this run's log starts at "
                        f"step {self.cfg.init_step}")
            return
        n = copy_metrics(theirs, mine, self.cfg.init_step)
        self._print(f"warm start at step {self.cfg.init_step} from {self.cfg.init}: fresh optimiser "
                    f"(lr ramps over {self.cfg.optim.rewarm_steps} steps), {n} earlier "
                    "log rows carried over")

    # ------------------------------------------------------------------ data
    def _open_loader(self, stage_idx: int, state: dict | None) -> None:
        cfg = self.cfg
        sampler = stage_sampler(self.train_set, cfg.curriculum.stages, stage_idx,
                                cfg.data.batch_size, cfg.seed, self.env.rank,
                                self.env.world_size, state,
                                uniform_layout=cfg.data.batch_layout == "uniform")
        self._batches = None  # drop the old iterator (and its workers) first
        self.loader = DataLoader(
            self.train_set, batch_sampler=sampler,
            # The layout never reads the left padding of short-context rows; 0 keeps the ids
            # valid for the diffusion's input check.
            collate_fn=functools.partial(collate_windows, pad_id=0),
            num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_stop_signals if cfg.data.num_workers else None,
            # Own generator: creating an iterator must not consume the global torch RNG.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self._loader_stage = stage_idx

    def _next_batch(self) -> dict:
        for _ in range(2):
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return next(self._batches)
            except StopIteration:  # end of an epoch: the sampler has moved to the next one
                self._batches = None
        raise RuntimeError("the data loader yields no batches")

    # ------------------------------------------------------------------ checkpoints
    def config_record(self) -> dict:
        return dict(train=self.cfg.to_dict(), model=self.model_cfg.to_dict(),
                    diffusion=self.diff_cfg.to_dict(), codec=self.manifest["codec"],
                    n_params=self.n_params)

    def save(self) -> None:
        rngs = D.gather_objects(self.env, capture_rng())
        if self.env.is_main:
            state = dict(
                step=self.step, optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                ema_updates=self.ema.num_updates, rng=rngs, world_size=self.env.world_size,
                data=dict(stage=self.data_stage, state=self.data_state),
            )
            weights = {"model": self.dit.state_dict(), "ema": self.ema.state_dict()}
            path = ckpt_io.save_checkpoint(self.run_dir, self.step, weights, self.config_record(),
                                           state, self.cfg.ckpt.keep)
            self._print(f"saved {path}")
        D.barrier(self.env)

    def load(self, path) -> None:
        ck = ckpt_io.load_checkpoint(path, map_location="cpu")
        try:
            self.dit.load_state_dict(ck["weights"]["model"])
        except RuntimeError as e:
            raise ConfigError(f"{ck['path']} does not fit this model config: {e}") from e
        self.ema.load_state_dict(ck["weights"]["ema"], ck["trainer"]["ema_updates"])
        tr = ck["trainer"]
        self.opt.load_state_dict(tr["optimizer"])
        self.step = int(tr["step"])
        # The scheduler counts steps from the step its run started at (0, or a warm start's
        # init_step), so a checkpoint knows that start. A re-run whose --init_step names
        # another step (e.g. the step of a snapshot exported from this very run) must not move
        # the schedule: the run's own start wins.
        start = self.step - int(tr["scheduler"]["last_epoch"])
        if start != self.cfg.init_step:
            self._print(f"note: {ck['path']} belongs to a run started at step {start}; "
                        f"init_step {self.cfg.init_step} ignored (it only applies to a run "
                        "without checkpoints)")
            self.cfg = dataclasses.replace(self.cfg, init_step=start)
            self.sched = build_scheduler(self.opt, self.cfg.optim, self.cfg.total_steps, start)
        self.sched.load_state_dict(tr["scheduler"])
        # The lr of the next step is the schedule's at the checkpoint's counter.
        for group, base, fn in zip(self.opt.param_groups, self.sched.base_lrs,
                                   self.sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(self.sched.last_epoch)
        self.data_stage, self.data_state = tr["data"]["stage"], tr["data"]["state"]
        if tr["world_size"] != self.env.world_size:
            self._print(f"warning: checkpoint was written by {tr['world_size']} ranks, resuming "
                        f"with {self.env.world_size}: data order and RNG streams differ from an "
                        "uninterrupted run")
        rngs = tr["rng"]
        restore_rng(rngs[self.env.rank] if self.env.rank < len(rngs) else rngs[0])
        self._print(f"resumed from {ck['path']} at step {self.step}")

    # ------------------------------------------------------------------ loop
    def _print(self, msg: str) -> None:
        if self.env.is_main:
            if self._bar is not None:  # above the progress bar, which redraws below
                self._bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr, flush=True)

    def train_step(self) -> dict:
        """One optimizer step; returns its named terms as detached tensors (no host sync)."""
        cfg = self.cfg
        stage_idx, _ = stage_at(cfg.curriculum.stages, self.step)
        if self._loader_stage != stage_idx:
            resume = self.data_state if self.data_stage == stage_idx else None
            self._open_loader(stage_idx, resume)
        accum = cfg.optim.grad_accum
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = self._next_batch()
            windows = [t.to(self.device, non_blocking=True) for t in batch["tokens"]]
            n_ctx = batch["n_ctx"].tolist()
            n_after = batch["n_after"].tolist() if self.editing else [0] * len(n_ctx)
            seed = step_seed(cfg.seed, self.step, micro, self.env.rank)
            self.gen.manual_seed(seed)
            if self.host_gen is not None:
                self.host_gen.manual_seed(seed)
            sync = micro == accum - 1 or not self.env.enabled
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self.autocast():
                    # Windows carry an after chunk only when some row of the batch has one.
                    terms = self.model(windows, n_ctx, self.gen,
                                       n_after if any(n_after) else None, self.host_gen,
                                       step=self.step)
                (terms["loss"] / accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
            fpc = self.model_cfg.frames_per_chunk
            tokens = sum(sequence_tokens(n, fpc, a) for n, a in zip(n_ctx, n_after, strict=True))
            self.meter.add(tokens, train_flops(self.model_cfg, n_ctx, n_after))
            self.data_state, self.data_stage = batch["data_state"], stage_idx
        clip = cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.dit.parameters(), clip if clip > 0 else math.inf)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.dit)
        self.step += 1
        sums["grad_norm"] = norm.detach().float()
        return sums

    def fit(self) -> int:
        """Train to the end of the curriculum (or a signal); returns the process exit status."""
        cfg, total = self.cfg, self.cfg.total_steps
        end = min(total, cfg.stop_at) if cfg.stop_at else total
        if self.step >= end:
            self._print(f"already at step {self.step} of {end}: nothing to train (lengthen a "
                        "curriculum stage or raise stop_at to go on)")
            return 0
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(self.cfg.to_json())
            self._print(f"run {self.run_dir}: {self.n_params / 1e6:.2f} M params, {total} steps, "
                        f"{self.env.world_size} rank(s) on {self.device} ({self.compute}), train windows "
                        f"{self.train_set.describe()['windows_per_n_ctx']}")
        bar = None
        if self.env.is_main and cfg.log.progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc=cfg.name, dynamic_ncols=True,
                       file=sys.stderr)
        self._bar = bar
        window: dict[str, torch.Tensor] = {}
        n_window = 0
        if cfg.eval.every and cfg.eval.at_start and self.step == cfg.init_step:
            self.evaluate()
        self.meter.reset()
        with StopFlag() as stop_flag:  # SIGINT/SIGTERM: finish the step, save, stop
            try:
                while self.step < end:
                    terms = self.train_step()
                    for k, v in terms.items():
                        window[k] = window.get(k, 0.0) + v
                    n_window += 1
                    done = self.step >= end
                    if self.step % cfg.log.every == 0 or done:
                        self._log_train(window, n_window, bar)
                        window, n_window = {}, 0
                    # Also at stop_at: that checkpoint is the one a working period exports.
                    if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == total
                                           or self.step == cfg.stop_at):
                        self.evaluate()
                    # Ranks agree on stopping through an all-reduce and a host read: every
                    # step that would be a sync per step, so it happens on logging steps (which
                    # read the loss anyway) and at the end; alone, the flag is just read.
                    if not self.env.enabled:
                        stop = stop_flag.stopped
                    elif self.step % cfg.log.every == 0 or done:
                        stop = D.any_flag(self.env, stop_flag.stopped)
                    else:
                        stop = False
                    if stop or done or self.step % cfg.ckpt.every == 0:
                        self.save()
                    if stop:
                        signum = stop_flag.signum or signal.SIGTERM  # another rank's signal
                        self._print(f"{signal.Signals(signum).name}: stopped after step {self.step}, "
                                    "checkpoint saved; the same command continues the run")
                        return 128 + int(signum)
                return 0
            finally:
                self._bar = None
                if bar is not None:
                    bar.close()
                if self.log is not None:
                    self.log.close()

    def _log_train(self, window: dict, n: int, bar) -> None:
        names = sorted(window)
        vec = torch.stack([torch.as_tensor(window[k], device=self.device) / n for k in names])
        vec = D.mean_across(self.env, vec).tolist()  # the one host sync per log interval
        values = dict(zip(names, vec, strict=True))
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at step {self.step}; stopping "
                                     "(lower optim.lr, or resume from an earlier checkpoint)")
        rate = self.meter.read()
        self.meter.reset()
        _, stage = stage_at(self.cfg.curriculum.stages, self.step - 1)
        values.update(lr=self.sched.get_last_lr()[0], stage=stage.name, **rate)
        if self.log is not None:
            self.log.write(self.step, "train", values)
        mfu = f"{100 * rate['mfu']:.1f}%" if rate["mfu"] is not None else "n/a"
        summary = dict(loss=f"{values['loss']:.3f}", tok_s=f"{rate['tokens_per_s']:.0f}", mfu=mfu,
                       stage=stage.name)
        if bar is not None:
            bar.set_postfix(summary, refresh=False)
            bar.update(self.step - bar.n)
        elif self.env.is_main:
            self._print(f"step {self.step}/{self.cfg.total_steps} " +
                        " ".join(f"{k}={v}" for k, v in summary.items()))

    def evaluate(self) -> dict | None:
        result = None
        if self.evaluator is not None:
            t0 = time.perf_counter()
            weights = self.ema.state_dict() if self.cfg.eval.use_ema else self.dit.state_dict()
            if self.lora_scale is not None:  # the evaluator's model is a plain DiT
                weights = merge_state(weights, self.lora_scale)
            result = self.evaluator.run(weights, self.step, self.run_dir)
            if result:
                result["eval_seconds"] = round(time.perf_counter() - t0, 3)
                self.log.write(self.step, "eval", result)
                self._print(f"eval at step {self.step}: val CE mean {result['ce_mean']:.3f} ("
                            f"{result['eval_seconds']:.0f} s)")
        D.barrier(self.env)
        self.meter.reset()  # evaluation time is not training throughput
        return result
