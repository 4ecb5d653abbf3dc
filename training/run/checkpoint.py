"""The one checkpoint format of both trainers: atomic keep-last-K folders, `latest` by scanning.

Layout of one checkpoint (everything needed to continue bit for bit, or to export):

    {ckpt_dir}/ckpt-000100/
        model.safetensors   the trained network's weights (raw, as trained)
        ema.safetensors     ...one safetensors file per named part: the DiT adds its EMA, a
        disc.safetensors       GAN codec run its discriminator
        config.json         {"train": ..., "model": ..., "step": ..., "weights": [part names]}
        trainer.pt          optimisers, schedulers, step, RNG states, data position; plain
                            tensors and containers, read back with torch.load(weights_only=True)

It is written into `{ckpt_dir}/.tmp-ckpt-000100-{pid}/`, every file fsynced, then renamed into
place: a `ckpt-*` directory either is complete or does not exist, even under SIGKILL. Leftover
temp directories of killed writers are removed on the next save.

Codec runs from before this format wrote single pickles, `ckpt_000003165.pt`; they are still
listed, resumed and exported (`_read_legacy_codec`), and the next save writes a folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^ckpt-(\d+)$")
LEGACY_CODEC_RE = re.compile(r"^ckpt_(\d{9})\.pt$")
FILES = ("config.json", "trainer.pt")  # besides the weights files config.json names


class CheckpointError(RuntimeError):
    pass


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def is_complete(path: Path) -> bool:
    """A checkpoint folder with its config, trainer state and every weights file it names (or a
    legacy codec pickle)."""
    if path.is_file():
        return LEGACY_CODEC_RE.match(path.name) is not None
    if not (path.is_dir() and all((path / f).is_file() for f in FILES)):
        return False
    try:
        parts = json.loads((path / "config.json").read_text()).get("weights", ["model", "ema"])
    except (OSError, json.JSONDecodeError):
        return False
    return all((path / f"{name}.safetensors").is_file() for name in parts)


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in a directory, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name) or LEGACY_CODEC_RE.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    # At equal steps the folder (written after the conversion) wins: it sorts last.
    return sorted(found, key=lambda sp: (sp[0], sp[1].is_dir()))


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def resolve(path: str | Path) -> Path:
    """A checkpoint, or a directory of checkpoints (-> its newest)."""
    p = Path(path)
    if is_complete(p):
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
        raise CheckpointError(f"{p} is neither a checkpoint nor a run directory with checkpoints")
    raise CheckpointError(f"checkpoint {p} does not exist")


def resume_point(resume: str, ckpt_dir: str | Path) -> Path | None:
    """What a run's `resume` setting means: auto / latest = the newest checkpoint in
    `ckpt_dir` if there is one (else a fresh start), never (or "") = a fresh start, anything
    else = that checkpoint, which must exist."""
    if resume in ("auto", "latest"):
        return latest_checkpoint(ckpt_dir)
    if resume in ("never", ""):
        return None
    return resolve(resume)


def _state_for_safetensors(state: dict) -> dict:
    # safetensors refuses tensors that share storage (tied weights) and non-contiguous views;
    # a CPU clone of each is a plain, independent tensor.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: str | Path, step: int, weights: dict[str, dict], config: dict,
                    trainer_state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints.

    weights: {part name: state dict} (one safetensors file each); config: JSON-able record of
    how the run was configured; trainer_state: what torch.load(weights_only=True) reads back.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for p in ckpt_dir.glob(".tmp-ckpt-*"):  # a writer killed mid-save left this; never loadable
        shutil.rmtree(p, ignore_errors=True)
    final = ckpt_dir / ckpt_name(step)
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    for name, state in weights.items():
        save_file(_state_for_safetensors(state), tmp / f"{name}.safetensors")
    record = {**config, "step": step, "weights": list(weights)}
    (tmp / "config.json").write_text(json.dumps(record, indent=2))
    torch.save(trainer_state, tmp / "trainer.pt")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # re-saving a step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(ckpt_dir)
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:  # legacy pickles count and go too
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return final


def read_config(ckpt: str | Path) -> dict:
    """config.json of a checkpoint (or of a directory's newest)."""
    ckpt = resolve(ckpt)
    if ckpt.is_file():
        return _read_legacy_codec(ckpt)["config"]
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"could not read {ckpt / 'config.json'}: {e}") from e


def load_checkpoint(ckpt: str | Path, map_location="cpu") -> dict:
    """{"path", "config", "trainer", "weights": {part: state dict}} of a checkpoint (or of a
    directory's newest)."""
    ckpt = resolve(ckpt)
    try:
        if ckpt.is_file():
            return _read_legacy_codec(ckpt)
        config = read_config(ckpt)
        weights = {name: load_file(ckpt / f"{name}.safetensors", device=str(map_location))
                   for name in config.get("weights", ["model", "ema"])}
        trainer = torch.load(ckpt / "trainer.pt", map_location=map_location, weights_only=True)
        return dict(path=ckpt, config=config, trainer=trainer, weights=weights)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or foreign files: say which checkpoint
        raise CheckpointError(f"could not load checkpoint {ckpt}: {e}") from e


# ----------------------------------------------------------------------------- legacy codec
def _legacy_safe_globals() -> list:
    """The numpy pieces of the legacy pickles' RNG state, allowed by name for weights_only."""
    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _read_legacy_codec(path: Path) -> dict:
    """A pre-folder codec checkpoint (one torch.save pickle) in this module's structure."""
    with torch.serialization.safe_globals(_legacy_safe_globals()):
        old = torch.load(path, map_location="cpu", weights_only=True)
    step = int(old["step"])
    weights = {"model": old["model"]}
    if "disc" in old:
        weights["disc"] = old["disc"]
    rng = dict(old["rng"])
    name, keys, *rest = rng["numpy"]
    rng["numpy"] = [name, torch.from_numpy(np.asarray(keys).astype(np.int64)), *rest]
    trainer = {k: v for k, v in old.items()
               if k not in ("model", "disc", "model_config", "config", "rng")}
    trainer.update(step=step, rng=rng)
    config = {"train": old["config"], "model": old["model_config"], "step": step,
              "weights": list(weights)}
    return dict(path=path, config=config, trainer=trainer, weights=weights)
