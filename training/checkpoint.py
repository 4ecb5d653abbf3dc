"""Atomic checkpoints with keep-last-K, and `latest` resolution by scanning the run directory.

Layout of one checkpoint (everything needed to continue bit for bit, or to export):

    {run_dir}/ckpt-000100/
        model.safetensors   raw weights
        ema.safetensors     EMA weights (what export serves by default)
        config.json         {"train": TrainConfig, "model": DiTConfig, "diffusion": ..., "step": ...}
        trainer.pt          optimizer, scheduler, step, RNG states per rank, data position per rank

It is written into `{run_dir}/.tmp-ckpt-000100-{pid}/`, every file fsynced, then renamed into
place: a `ckpt-*` directory either is complete or does not exist, even under SIGKILL. Leftover
temp directories of killed writers are removed on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^ckpt-(\d+)$")
FILES = ("model.safetensors", "ema.safetensors", "config.json", "trainer.pt")


class CheckpointError(RuntimeError):
    pass


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in FILES):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its newest checkpoint)."""
    p = Path(path)
    if p.is_dir() and all((p / f).is_file() for f in FILES):
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
        raise CheckpointError(f"{p} is neither a checkpoint nor a run directory with checkpoints")
    raise CheckpointError(f"checkpoint {p} does not exist")


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


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, ema_state: dict,
                    config: dict, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for p in run_dir.glob(".tmp-ckpt-*"):  # a writer killed mid-save left this; never loadable
        shutil.rmtree(p, ignore_errors=True)
    final = run_dir / ckpt_name(step)
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file(_state_for_safetensors(model_state), tmp / "model.safetensors")
    save_file(_state_for_safetensors(ema_state), tmp / "ema.safetensors")
    (tmp / "config.json").write_text(json.dumps({**config, "step": step}, indent=2))
    torch.save(trainer_state, tmp / "trainer.pt")
    for f in FILES:
        _fsync(tmp / f)
    _fsync(tmp)
    if final.exists():  # re-saving a step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(run_dir)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_config(ckpt_dir: str | Path) -> dict:
    """config.json of a checkpoint (or a run dir's newest): train/model/diffusion/codec configs."""
    ckpt = resolve(ckpt_dir)
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"could not read {ckpt / 'config.json'}: {e}") from e


def load_checkpoint(ckpt_dir: str | Path, map_location="cpu") -> dict:
    """{"model", "ema", "config", "trainer"} of a checkpoint directory (or a run dir's latest)."""
    ckpt = resolve(ckpt_dir)
    try:
        return dict(
            path=ckpt,
            model=load_file(ckpt / "model.safetensors", device=str(map_location)),
            ema=load_file(ckpt / "ema.safetensors", device=str(map_location)),
            config=read_config(ckpt),
            trainer=torch.load(ckpt / "trainer.pt", map_location=map_location, weights_only=True),
        )
    except Exception as e:  # corrupt or foreign files: say which checkpoint
        raise CheckpointError(f"could not load checkpoint {ckpt}: {e}") from e
