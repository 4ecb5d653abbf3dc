"""Training configuration: nested dataclasses, filled from TOML and `--key value` overrides.

Precedence: dataclass defaults < `--config FILE.toml` < command-line `--section.key value`
(the loader, shared with the codec trainer, is training/run/config.py).
The dataclass defaults *are* the default run (`training/configs/default.toml` spells them out
and a test keeps the two equal). No exec()/import-based configurators: a config is data.

The model and diffusion sections are plain dicts of overrides on top of `DiTConfig.from_name(
model["preset"])` and `DiffusionConfig()`: those dataclasses belong to `model/`, so this module
stays importable (and testable) without them, and they are validated when the run is built.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.run import config as run_config
from training.run.config import ConfigError

N_CTX_MAX = 2  # DESIGN §2: up to two context chunks


@dataclass
class Stage:
    """One curriculum stage: `steps` optimizer steps with n_ctx drawn from `n_ctx` weights."""

    name: str = "full"
    steps: int = 1000
    # Relative weights of n_ctx = 0, 1, 2 (normalised; zeros allowed). Non-zero weights for
    # shorter contexts in later stages keep the model good at them (the server left-pads short
    # input, and classifier-free guidance needs the no-context branch).
    n_ctx: list[float] = field(default_factory=lambda: [0.0, 0.0, 1.0])
    # Share of rows that also see the chunk after the target (the editing layouts: inpaint,
    # loop; DESIGN §2). Any stage with a positive share makes the model an editing model
    # (DiTConfig.max_after_chunks = 1); 0 everywhere trains the continuation layouts only.
    n_after: float = 0.0


def _default_stages() -> list[Stage]:
    # The plan's curriculum (seeds/plan-snac-diffusion.txt): pretraining without context (A alone,
    # B from A, C from AB, D from ABC — all in one n_ctx=0 pass), then the chunk just before the
    # target, then the full two chunks, each later stage still mixing in shorter contexts.
    # A fifth of the later stages' rows train the editing layouts (context after the target).
    return [
        Stage("pretrain", 20_000, [1.0, 0.0, 0.0]),
        Stage("one_chunk", 20_000, [0.2, 0.8, 0.0], n_after=0.2),
        Stage("full", 60_000, [0.1, 0.2, 0.7], n_after=0.2),
    ]


@dataclass
class CurriculumConfig:
    # Each row of a batch draws its n_ctx from the current stage's weights (the data sampler
    # does the drawing, so short files still give n_ctx = 0 windows); rows are padded to the
    # longest. Stages run in order; step counts add up to the run's length.
    stages: list[Stage] = field(default_factory=_default_stages)


@dataclass
class DataConfig:
    tokens: str = "data/tokens"  # output dir of `python -m training.tokens`
    batch_size: int = 32  # rows per micro-batch per rank
    num_workers: int = 2  # DataLoader workers (0 = load in the training process)
    # Weights of the context kinds a window with context draws (training/tokens/windows.py): encoded =
    # as `/continue` encodes it, mixed = the second /extend chunk's, generated = whole-file
    # tokens (later /extend chunks). A directory tokenised without tiles trains on generated.
    contexts: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.25])
    # uniform = every row of a batch draws the same layout (n_ctx, after chunk or not), so no row
    # is padded to a longer one; mixed = each row draws its own. Same shares over the stage.
    batch_layout: str = "uniform"


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5  # cosine floor: the last steps still learn
    warmup_steps: int = 2000
    weight_decay: float = 0.1  # matrices only; norms, biases and embeddings get none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.9999  # EMA of the weights: what export serves by default
    ema_warmup: bool = True  # decay ramps as (1+n)/(10+n) so early EMA is not stuck at init
    # After a warm start mid-curriculum (init_step > 0) the fresh optimiser's lr ramps from zero
    # back onto the schedule over this many steps: Adam's moment estimates start empty.
    rewarm_steps: int = 50


@dataclass
class EvalConfig:
    every: int = 2000  # steps; 0 disables
    batches: int = 4  # per (n_ctx, mask ratio) cell
    batch_size: int = 16
    mask_ratios: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])
    n_ctx: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed: int = 1234  # fixed: the same val windows and masks at every eval, comparable curves
    use_ema: bool = True
    # Also evaluate before the first step of a fresh run: the starting point of a fine-tune's
    # curve (what the init weights score on the same windows and masks).
    at_start: bool = False
    audio: bool = True  # continue a fixed val window and write a WAV when the codec loads
    codec: str = ""  # codec for the audio sample; "" = the one the tokens were made with
    sample_steps: list[int] = field(default_factory=list)  # per level; [] = sampler defaults


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; the last step and a SIGINT/SIGTERM always save
    keep: int = 3  # newest checkpoints kept on disk


@dataclass
class LogConfig:
    every: int = 10  # steps between JSONL / TensorBoard / progress-bar updates
    tensorboard: bool = False  # needs the `tensorboard` package (pip install snac-dit[tensorboard])
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float = 0.0  # per device, for MFU; 0 = guess from the device name


@dataclass
class LoraConfig:
    # Low-rank adapters (training/dit/lora.py) for fine-tuning from `init`: 0 = full fine-tune
    # (every weight trains); r >= 1 trains only rank-r adapters on `targets`, merged on export.
    rank: int = 0
    alpha: float = 16.0  # the adapters' scale is alpha / rank
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.0", "mlp.2", "adaLN"])


@dataclass
class TrainConfig:
    name: str = "default"  # run directory: {out_dir}/{name}
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu
    # Compute: bf16 autocast (fp32 master weights) or fp32. auto = bf16 on CUDA, fp32 on CPU;
    # bf16 on a CPU with native bf16 (AVX512-BF16 / AMX) trains ~1.9x faster (docs/training.md)
    dtype: str = "auto"
    compile: bool = False  # torch.compile the model
    # Per-block activation checkpointing: on, off, or auto = on only where the batch would not
    # fit the GPU without it at the curriculum's longest layout (training/dit/memory.py; off on
    # CPU). Checked at start-up: a batch that fits neither way stops the run before step 1.
    activation_checkpointing: str = "auto"
    # auto (or latest) = this run's newest checkpoint if it has one, never = start over, or a
    # checkpoint directory. Re-running a command continues it (both trainers, run/checkpoint).
    resume: str = "auto"
    # Stop (saving a checkpoint) at this step although the curriculum goes on: for jobs with a
    # time limit. The schedule still spans the whole curriculum. 0 = run to the end.
    stop_at: int = 0
    # Fine-tune: start from the weights of an exported model (a `save_pretrained` directory,
    # e.g. weights/demo/dit); its architecture replaces [model]. "" = from scratch.
    init: str = ""
    # With init: continue an exported run from this step of its curriculum and lr schedule (a
    # fresh machine without the run directory goes on from the shipped snapshot, e.g. the step in
    # its config.json's training.step). Weights and EMA start from the export; the optimiser
    # state and data order start fresh. 0 = a new run from step 0.
    init_step: int = 0
    model: dict = field(default_factory=lambda: {"preset": "base"})  # DiTConfig overrides
    diffusion: dict = field(default_factory=dict)  # DiffusionConfig overrides
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.curriculum.stages)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def validate(self) -> None:
        validate(self)


def usage() -> str:
    return (
        "usage: python training/train.py [--config FILE.toml] [--section.key value ...]\n"
        "  e.g. --config training/configs/debug.toml --name try1 --optim.lr 1e-3 "
        "--curriculum.stages.0.steps 100 --model.preset small --resume\n"
        "  sections: " + ", ".join(f.name for f in dataclasses.fields(TrainConfig)) + "\n"
        "  see docs/training.md"
    )


def load_config(path: str | Path | None = None, overrides=(), base: dict | None = None) -> TrainConfig:
    """Defaults (or `base`, e.g. a checkpoint's saved config) <- TOML file <- overrides, validated
    (training/run/config.py). overrides: [(dotted key, value)] as `parse_overrides` returns them."""
    return run_config.load(TrainConfig, path, overrides, base)


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, object]]]:
    """Split argv into (--config path, [(dotted key, value)]). `--resume` alone means "latest"."""
    return run_config.parse_overrides(argv, TrainConfig)


def validate(cfg: TrainConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    need(bool(cfg.curriculum.stages), "curriculum.stages is empty")
    for i, s in enumerate(cfg.curriculum.stages):
        need(s.steps >= 0, f"curriculum.stages[{i}].steps must be >= 0")
        need(
            len(s.n_ctx) == N_CTX_MAX + 1 and all(w >= 0 for w in s.n_ctx) and sum(s.n_ctx) > 0,
            f"curriculum.stages[{i}].n_ctx must be {N_CTX_MAX + 1} non-negative weights "
            f"(n_ctx = 0..{N_CTX_MAX}) with a positive sum, got {s.n_ctx}",
        )
        need(
            0.0 <= s.n_after <= 1.0,
            f"curriculum.stages[{i}].n_after must be a share in [0, 1], got {s.n_after}",
        )
    need(cfg.total_steps > 0, "the curriculum has no steps")
    need(cfg.stop_at >= 0, "stop_at must be >= 0")
    need(cfg.data.batch_size >= 1, "data.batch_size must be >= 1")
    need(cfg.data.num_workers >= 0, "data.num_workers must be >= 0")
    need(len(cfg.data.contexts) == 3 and all(w >= 0 for w in cfg.data.contexts)
         and sum(cfg.data.contexts) > 0,
         f"data.contexts must be 3 non-negative weights (encoded, mixed, generated) with a "
         f"positive sum, got {cfg.data.contexts}")
    need(cfg.data.batch_layout in ("uniform", "mixed"),
         f"data.batch_layout must be 'uniform' or 'mixed', got {cfg.data.batch_layout!r}")
    need(cfg.optim.grad_accum >= 1, "optim.grad_accum must be >= 1")
    need(cfg.optim.lr > 0 and 0 <= cfg.optim.min_lr <= cfg.optim.lr, "need 0 <= optim.min_lr <= optim.lr, lr > 0")
    need(len(cfg.optim.betas) == 2, "optim.betas must have two values")
    need(0.0 <= cfg.optim.ema_decay < 1.0, "optim.ema_decay must be in [0, 1)")
    need(cfg.ckpt.keep >= 1 and cfg.ckpt.every >= 1, "ckpt.keep and ckpt.every must be >= 1")
    need(cfg.log.every >= 1, "log.every must be >= 1")
    need(cfg.eval.every >= 0 and cfg.eval.batches >= 1 and cfg.eval.batch_size >= 1,
         "eval.every must be >= 0, eval.batches and eval.batch_size >= 1")
    need(cfg.dtype in ("auto", "bf16", "fp32"), "dtype must be auto, bf16 or fp32")
    need(cfg.activation_checkpointing in ("auto", "on", "off"),
         "activation_checkpointing must be auto, on or off")
    need(all(0 < r <= 1 for r in cfg.eval.mask_ratios), "eval.mask_ratios must lie in (0, 1]")
    need(bool(cfg.eval.n_ctx) and all(0 <= n <= N_CTX_MAX for n in cfg.eval.n_ctx),
         f"eval.n_ctx must be non-empty, values in 0..{N_CTX_MAX}")
    need(bool(cfg.eval.mask_ratios), "eval.mask_ratios must be non-empty")
    need(all(s >= 1 for s in cfg.eval.sample_steps), "eval.sample_steps must be >= 1")
    need("preset" in cfg.model, "model.preset is required (a name from model.dit.PRESETS)")
    need(cfg.lora.rank >= 0 and cfg.lora.alpha > 0 and bool(cfg.lora.targets),
         "lora.rank must be >= 0 (0 = full fine-tune), lora.alpha > 0, lora.targets non-empty")
    need(cfg.lora.rank == 0 or bool(cfg.init),
         "lora.rank >= 1 fine-tunes an exported model: set init (e.g. weights/demo/dit)")
    need(cfg.init_step >= 0, "init_step must be >= 0")
    need(cfg.init_step == 0 or bool(cfg.init),
         "init_step continues an exported run: set init (e.g. weights/demo/dit) too")
    need(cfg.init_step < cfg.total_steps,
         f"init_step {cfg.init_step} is not inside the curriculum ({cfg.total_steps} steps)")
    need(cfg.optim.rewarm_steps >= 0, "optim.rewarm_steps must be >= 0")
    need(bool(cfg.name) and "/" not in cfg.name, "name must be a non-empty directory name")
