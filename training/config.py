"""Training configuration: nested dataclasses, filled from TOML and `--key value` overrides.

Precedence: dataclass defaults < `--config FILE.toml` < command-line `--section.key value`.
The dataclass defaults *are* the default run (`training/configs/default.toml` spells them out
and a test keeps the two equal). No exec()/import-based configurators: a config is data.

The model and diffusion sections are plain dicts of overrides on top of `DiTConfig.from_name(
model["preset"])` and `DiffusionConfig()`: those dataclasses belong to `model/`, so this module
stays importable (and testable) without them, and they are validated when the run is built.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (pyproject: tomli)
    import tomli as tomllib

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
    tokens: str = "data/tokens"  # output dir of `python -m training.tokenize`
    batch_size: int = 32  # rows per micro-batch per rank
    num_workers: int = 2  # DataLoader workers (0 = load in the training process)
    # Weights of the context kinds a window with context draws (training/data.py): encoded =
    # as `/continue` encodes it, mixed = the second /extend chunk's, generated = whole-file
    # tokens (later /extend chunks). A directory tokenised without tiles trains on generated.
    contexts: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.25])


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


@dataclass
class EvalConfig:
    every: int = 2000  # steps; 0 disables
    batches: int = 4  # per (n_ctx, mask ratio) cell
    batch_size: int = 16
    mask_ratios: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])
    n_ctx: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed: int = 1234  # fixed: the same val windows and masks at every eval, comparable curves
    use_ema: bool = True
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
class TrainConfig:
    name: str = "default"  # run directory: {out_dir}/{name}
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "bf16"  # CUDA compute: bf16 autocast (fp32 master weights) or fp32; CPU is fp32
    compile: bool = False  # torch.compile the model
    resume: str = ""  # "" = fresh run, "latest" = newest checkpoint of this run, or a ckpt dir
    # Stop (saving a checkpoint) at this step although the curriculum goes on: for jobs with a
    # time limit. The schedule still spans the whole curriculum. 0 = run to the end.
    stop_at: int = 0
    # Fine-tune: start from the weights of an exported model (a `save_pretrained` directory,
    # e.g. weights/demo/dit); its architecture replaces [model]. "" = from scratch.
    init: str = ""
    model: dict = field(default_factory=lambda: {"preset": "base"})  # DiTConfig overrides
    diffusion: dict = field(default_factory=dict)  # DiffusionConfig overrides
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

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


class ConfigError(ValueError):
    pass


# ----------------------------------------------------------------------------- coercion
def _coerce(value, tp, where: str):
    """Check/convert a TOML or command-line value to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is typing.Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for t in typing.get_args(tp):
            try:
                return _coerce(value, t, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e4 on the command line means 10000
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in [{where or 'top level'}]; known: {sorted(names)}"
        )
    base = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}".lstrip("."))
        else:
            kwargs[f.name] = getattr(base, f.name)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- overrides
def _parse_value(text: str):
    """A command-line value: a TOML literal when it parses as one (1e-4, true, [0, 1]), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(data: dict, key: str, value) -> None:
    """data[a][b][c] = value for key "a.b.c"; integer parts index lists (curriculum.stages.0.steps)."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise ConfigError(f"--{key}: index {idx} out of range (have {len(node)})")
            node = node[idx]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() else {})
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if not -len(node) <= idx < len(node):
            raise ConfigError(f"--{key}: index {idx} out of range (have {len(node)})")
        node[idx] = value
    else:
        node[last] = value


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, object]]]:
    """Split argv into (--config path, [(dotted key, value)]). `--resume` alone means "latest"."""
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if has_value:
                val, i = argv[i + 1], i + 1
            elif key == "resume":
                val = "latest"
            elif key in _BOOL_KEYS:
                val = "true"  # --compile alone switches it on
            else:
                raise ConfigError(f"--{key} needs a value")
        if key == "config":
            config_path = val
        else:
            pairs.append((key.replace("-", "_"), _parse_value(val)))
        i += 1
    return config_path, pairs


_BOOL_KEYS = {"compile", "log.tensorboard", "log.progress", "eval.audio", "eval.use_ema"}


def usage() -> str:
    return (
        "usage: python training/train.py [--config FILE.toml] [--section.key value ...]\n"
        "  e.g. --config training/configs/debug.toml --name try1 --optim.lr 1e-3 "
        "--curriculum.stages.0.steps 100 --model.preset small --resume\n"
        "  sections: " + ", ".join(f.name for f in dataclasses.fields(TrainConfig)) + "\n"
        "  see docs/training.md"
    )


def load_config(path: str | Path | None = None, overrides=(), base: dict | None = None) -> TrainConfig:
    """Defaults (or `base`, e.g. a checkpoint's saved config) <- TOML file <- overrides, validated.

    overrides: [(dotted key, value)] as `parse_overrides` returns them.
    """
    data = TrainConfig().to_dict()
    if base is not None:
        _merge(data, base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            file_data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from e
        _merge(data, file_data)
    for key, value in overrides:
        top = key.split(".")[0]
        if top not in data:
            raise ConfigError(f"unknown option --{key}; sections: {sorted(data)}")
        _set_path(data, key, value)
    cfg = _from_dict(TrainConfig, data)
    validate(cfg)
    return cfg


def _merge(base: dict, new: dict) -> None:
    """Recursive table merge; lists (e.g. curriculum.stages) are replaced, not merged."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("model", "diffusion"):
            _merge(base[k], v)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v


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
    need(cfg.optim.grad_accum >= 1, "optim.grad_accum must be >= 1")
    need(cfg.optim.lr > 0 and 0 <= cfg.optim.min_lr <= cfg.optim.lr, "need 0 <= optim.min_lr <= optim.lr, lr > 0")
    need(len(cfg.optim.betas) == 2, "optim.betas must have two values")
    need(0.0 <= cfg.optim.ema_decay < 1.0, "optim.ema_decay must be in [0, 1)")
    need(cfg.ckpt.keep >= 1 and cfg.ckpt.every >= 1, "ckpt.keep and ckpt.every must be >= 1")
    need(cfg.log.every >= 1, "log.every must be >= 1")
    need(cfg.eval.every >= 0 and cfg.eval.batches >= 1 and cfg.eval.batch_size >= 1,
         "eval.every must be >= 0, eval.batches and eval.batch_size >= 1")
    need(cfg.dtype in ("bf16", "fp32"), "dtype must be bf16 or fp32")
    need(all(0 < r <= 1 for r in cfg.eval.mask_ratios), "eval.mask_ratios must lie in (0, 1]")
    need(bool(cfg.eval.n_ctx) and all(0 <= n <= N_CTX_MAX for n in cfg.eval.n_ctx),
         f"eval.n_ctx must be non-empty, values in 0..{N_CTX_MAX}")
    need(bool(cfg.eval.mask_ratios), "eval.mask_ratios must be non-empty")
    need(all(s >= 1 for s in cfg.eval.sample_steps), "eval.sample_steps must be >= 1")
    need("preset" in cfg.model, "model.preset is required (a name from model.dit.PRESETS)")
    need(bool(cfg.name) and "/" not in cfg.name, "name must be a non-empty directory name")
