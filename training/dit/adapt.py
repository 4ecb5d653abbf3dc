"""Adapt the demo model to your own music: `python -m training.dit.adapt ~/my-songs --out weights/mine`
(also `snac-dit-adapt`).

One command, four phases, each resumable (re-run the same command after Ctrl-C):

1. tokenise the folder with the codec the base model was trained on (`training.tokens`); a
   Hugging Face dataset (a `save_to_disk` directory, or a hub id, streamed) is first written
   to `--work`/songs as audio files (`training/tokens/hf_dataset.py`);
2. hold out a few songs (chosen by a hash of their paths, so every re-run holds out the same);
3. fine-tune the base DiT on the rest (`training/train.py` with `init`, one curriculum stage
   mixing 0, 1 and 2 context chunks, and after-context if the base model has it): rank-8
   low-rank adapters by default (`--lora-rank 0` trains every weight), scoring the held-out
   songs at the start and at every checkpoint;
4. export the EMA weights to `--out`, measure the held-out songs' per-level masked-token
   cross-entropy of the base and the adapted model, and print the line that serves it.

Everything but the export lives in `--work` (default `runs/adapt/<out name>`): the tokens, the
run (checkpoints, metrics.jsonl), `adapt.toml` (the training config, for inspection) and
`adapt_eval.json`. Exit status: 0 done; 1 nothing to learn from (no audio, nothing decodable,
songs too short); 2 refused (bad arguments, base model, codec or dataset missing); 130 / 143
interrupted by Ctrl-C / SIGTERM (what is done is kept).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

DEFAULT_BASE, DEFAULT_CODEC = "weights/demo/dit", "weights/demo/codec"
# Chosen by measurement on the demo DiT (docs/adapt.md): rank-8 adapters at 1e-3 lowered the
# held-out songs' CE where a full fine-tune at 3e-4 raised it, in the same time, 33x smaller.
DEFAULT_RANK, LORA_LR, FULL_LR = 8, 1e-3, 1e-4


class AdaptError(RuntimeError):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.dit.adapt",
                                description="Fine-tune the demo model on a folder of your songs "
                                            "or a Hugging Face dataset of them.")
    p.add_argument("songs", help="a folder of audio (searched recursively; any format the server "
                                 "reads), a Hugging Face dataset saved with save_to_disk, or a "
                                 "hub id (owner/name, streamed)")
    p.add_argument("--split", default="train", help="dataset split to read (default train)")
    p.add_argument("--audio-column", default=None,
                   help="dataset column holding the audio (default: the first Audio column)")
    p.add_argument("--out", type=Path, required=True, help="where to write the adapted model")
    p.add_argument("--base", default=DEFAULT_BASE, help=f"model to start from ({DEFAULT_BASE})")
    p.add_argument("--codec", default=DEFAULT_CODEC,
                   help=f"the codec the base model was trained on ({DEFAULT_CODEC})")
    p.add_argument("--work", type=Path, help="working directory (default runs/adapt/<out name>)")
    p.add_argument("--steps", type=int, default=400,
                   help="fine-tuning steps (default 400; the whole command takes about 31 "
                        "minutes for 14 songs on 2 CPU cores, docs/adapt.md)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {LORA_LR:g} for adapters, {FULL_LR:g} for a "
                        "full fine-tune)")
    p.add_argument("--lora-rank", type=int, default=DEFAULT_RANK,
                   help=f"train rank-r low-rank adapters (default {DEFAULT_RANK}; measured better "
                        "on held-out songs than a full fine-tune, docs/adapt.md); 0 trains every "
                        "weight. The export merges the adapters into a plain model")
    p.add_argument("--lora-heads", action=argparse.BooleanOptionalAction, default=False,
                   help="with adapters, adapt the per-level output heads too (default: off)")
    p.add_argument("--val-songs", type=int, default=None,
                   help="songs held out to measure the adaptation (default: 1 per 8, at least "
                        "1 when there are 3 or more)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.lr is None:
        a.lr = LORA_LR if a.lora_rank else FULL_LR
    return a


def _hash(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8")).hexdigest()


def hold_out(token_dir: Path, k: int | None) -> tuple[list[str], list[str]]:
    """Mark k songs of the token directory 'val' (the smallest path hashes), the rest 'train'."""
    from training.tokens import shards

    manifest = shards.read_manifest(token_dir)
    names = sorted((f["path"] for f in manifest["files"]), key=_hash)
    if k is None:
        k = max(1, len(names) // 8) if len(names) >= 3 else 0
    val = set(names[:k])
    changed = False
    for f in manifest["files"]:
        split = "val" if f["path"] in val else "train"
        changed |= f["split"] != split
        f["split"] = split
    if changed:
        shards.write_manifest(token_dir, manifest)
    return sorted(set(names) - val), sorted(val)


def training_toml(a, work: Path, editing: bool, has_val: bool, dtype: str = "auto") -> str:
    """The fine-tuning config: one stage over the context mix, a gentle learning rate."""
    from training.dit.lora import DEFAULT_TARGETS

    every = max(10, a.steps // 10)
    targets = [*DEFAULT_TARGETS, *(["heads"] if a.lora_heads else [])]
    return f"""# written by `python -m training.dit.adapt`; re-running that command resumes this run
name = "run"
out_dir = {json.dumps(str(work))}
init = {json.dumps(str(a.base))}
dtype = "{dtype}"

[data]
tokens = {json.dumps(str(work / "tokens"))}
batch_size = {a.batch_size}
num_workers = 0

[optim]
lr = {a.lr}
min_lr = {a.lr / 10}
warmup_steps = {min(50, max(1, a.steps // 10))}
grad_accum = 1
ema_decay = 0.999

[lora]
rank = {a.lora_rank}
targets = {json.dumps(targets)}

[[curriculum.stages]]
name = "adapt"
steps = {a.steps}
n_ctx = [0.1, 0.2, 0.7]
n_after = {0.2 if editing else 0.0}

# The held-out songs' CE at the start and at every checkpoint: the adaptation's curve, on the
# 32 windows adapt's final report scores, half the tokens masked (its own fixed masks).
[eval]
every = {every if has_val else 0}
at_start = true
batches = 8
batch_size = 4
mask_ratios = [0.5]
n_ctx = [2]
audio = false

[ckpt]
every = {every}
keep = 2

[log]
every = {every}
progress = {"false" if a.no_progress else "true"}
"""


def held_out_ce(model_dirs: dict[str, Path], token_dir: Path, max_windows: int = 32,
                progress: bool = False) -> dict:
    """Per-level masked-token CE (half the tokens masked) of each model on the val windows."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from model.diffusion import DiffusionConfig
    from model.weights import load_dit, read_dit_config
    from training.dit.evaluate import masked_token_metrics
    from training.tokens.windows import TokenWindows

    for n_ctx in (2, 1, 0):
        val = TokenWindows(token_dir, "val", n_ctx=n_ctx, contexts=(1.0, 0.0, 0.0))
        if len(val):
            break
    else:
        return {}
    picks = np.unique(np.linspace(0, len(val) - 1, max_windows).round().astype(int))
    items = [val[int(i)]["tokens"] for i in picks]
    windows = [torch.stack([it[lvl] for it in items]) for lvl in range(len(items[0]))]
    out = {"windows": len(picks), "n_ctx": n_ctx}
    # Batches of 4 windows (8 of them by default); with fewer than 8 windows one window each,
    # so that two held-out windows already give a standard error.
    size = 4 if len(picks) >= 8 else 1
    per_batch = {}  # model -> level -> (CE sum, masked count) of each batch of `size` windows
    bar = tqdm(total=len(model_dirs) * len(picks), desc="score held-out", unit="window",
               disable=not progress, file=sys.stderr)
    for name, path in model_dirs.items():
        model = load_dit(path, dtype=torch.float32)  # shipped weights may be fp16
        schedules = DiffusionConfig.from_dict(read_dit_config(path).get("diffusion", {})).schedules
        batches = per_batch.setdefault(name, {})
        with torch.no_grad():
            for lo in range(0, len(picks), size):
                batch = [w[lo:lo + size] for w in windows]
                for lvl, (ce, _, n) in masked_token_metrics(model, batch, n_ctx, 0.5, schedules,
                                                            seed=lo).items():
                    batches.setdefault(lvl, []).append((ce, n))
                bar.update(len(batch[0]))
        out[name] = {lvl: round(sum(ce for ce, _ in got) / sum(n for _, n in got), 4)
                     for lvl, got in batches.items()}
    bar.close()
    first, *others = model_dirs
    for name in others:
        # Paired over the batches (same windows, same masks): the change and its standard
        # error, so a difference can be told from the noise of which windows were scored. One
        # batch (one window) has no error to tell: se is None then, never NaN.
        change = {}
        for lvl, ref in per_batch[first].items():
            d = np.array([ce / n for ce, n in per_batch[name][lvl]]) - [ce / n for ce, n in ref]
            se = round(float(d.std(ddof=1) / np.sqrt(len(d))), 4) if len(d) > 1 else None
            change[lvl] = {"mean": round(float(d.mean()), 4), "se": se}
        out[f"change_{name}"] = change
    return out


def run(a) -> int:
    from training.dit import cli as train_cli
    from training.dit.export import export
    from training.tokens import hf_dataset
    from training.tokens.tokenizer import TokenizeConfig, TokenizeError, tokenize

    dataset = hf_dataset.is_saved_dataset(a.songs) or hf_dataset.looks_like_hub_id(a.songs)
    if not dataset and not Path(a.songs).is_dir():
        raise AdaptError(f"{a.songs}: not a folder of audio, a saved Hugging Face dataset or a "
                         "hub id (owner/name)")
    if (a.steps < 1 or a.batch_size < 1 or a.lr <= 0 or a.lora_rank < 0
            or (a.val_songs is not None and a.val_songs < 0)):
        raise AdaptError("--steps and --batch-size must be >= 1, --lr > 0, --val-songs and "
                         "--lora-rank >= 0")
    base = Path(a.base)
    if not (base / "config.json").is_file():
        raise AdaptError(f"base model {a.base}: not found (a directory with config.json and "
                         "model.safetensors, e.g. weights/demo/dit)")
    from model.weights import read_dit_config

    editing = read_dit_config(base)["dit"].get("max_after_chunks", 0) >= 1
    work = a.work or Path("runs/adapt") / a.out.name
    work.mkdir(parents=True, exist_ok=True)

    songs = Path(a.songs)
    if dataset:
        songs = work / "songs"
        print(f"1/4 writing the songs of dataset {a.songs} (split {a.split}) to {songs}",
              file=sys.stderr)
        try:
            got = hf_dataset.materialise(a.songs, songs, a.split, a.audio_column,
                                         progress=not a.no_progress)
        except hf_dataset.DatasetSourceError as e:
            raise AdaptError(str(e)) from e
        for line in got.failed:
            print(f"  skipped {line}", file=sys.stderr)
        if got.written + got.kept == 0:
            raise AdaptError(f"dataset {a.songs}: no row has audio; nothing to adapt to", code=1)
    print(f"1/4 tokenising {songs} with {a.codec}", file=sys.stderr)
    try:
        summary = tokenize(TokenizeConfig(audio_dir=songs, out_dir=work / "tokens",
                                          codec=a.codec, val_fraction=0.0,
                                          progress=not a.no_progress))
    except TokenizeError as e:
        raise AdaptError(str(e)) from e
    if summary.total_files == 0:
        what = "no audio files" if summary.found == 0 else "no file could be decoded"
        raise AdaptError(f"{a.songs}: {what}; nothing to adapt to", code=1)

    train_songs, val_songs = hold_out(work / "tokens", a.val_songs)
    print(f"2/4 {len(train_songs)} songs to learn from, {len(val_songs)} held out: "
          f"{', '.join(val_songs) or '-'}", file=sys.stderr)
    from training.tokens.windows import TokenWindows

    if len(TokenWindows(work / "tokens", "train", n_ctx=1)) == 0:
        raise AdaptError(
            "every song to learn from is shorter than 12.288 s (one 6.144 s chunk of context "
            "and one to predict); add longer songs", code=1)

    from training.dit.trainer import cpu_has_bf16

    # bf16 autocast where the CPU computes bf16 natively (1.5-1.9x, docs/benchmarks.md); auto
    # (fp32 on CPU, bf16 on CUDA) elsewhere. The master weights are fp32 either way.
    config = work / "adapt.toml"
    config.write_text(training_toml(a, work, editing, bool(val_songs),
                                    "bf16" if cpu_has_bf16() else "auto"))
    how = f"rank-{a.lora_rank} adapters of" if a.lora_rank else "every weight of"
    print(f"3/4 fine-tuning {how} {a.base} for {a.steps} steps (config {config})", file=sys.stderr)
    rc = train_cli.main(["--config", str(config), "--resume"])
    if rc in (130, 143):  # stopped by a signal after saving: the same command goes on
        return rc
    if rc != 0:
        raise AdaptError(f"training stopped with status {rc} (see above)", code=rc)

    print(f"4/4 exporting to {a.out}", file=sys.stderr)
    export(work / "run", a.out, fp16=True)  # half the size; the engine computes in fp32/bf16
    report = (held_out_ce({"base": base, "adapted": a.out}, work / "tokens",
                          progress=not a.no_progress) if val_songs else {})
    (work / "adapt_eval.json").write_text(json.dumps(report, indent=1) + "\n")
    if report:
        print(f"held-out masked-token cross-entropy, {report['windows']} windows "
              f"(lower is better):", file=sys.stderr)
        for lvl, ce in report["base"].items():
            d = report["change_adapted"][lvl]
            error = "" if d["se"] is None else f" ± {d['se']:.3f}"
            print(f"  level {lvl}: base {ce:.3f} -> adapted {report['adapted'][lvl]:.3f} "
                  f"({d['mean']:+.3f}{error})", file=sys.stderr)
        if report["windows"] < 2:
            print("  the error of these changes is unknown: the held-out songs gave one window "
                  "to score; hold out longer or more songs (--val-songs) to know it",
                  file=sys.stderr)
    codec = "" if a.codec == DEFAULT_CODEC else f"SNAC_DIT_CODEC={a.codec} "
    print(f"done. Serve it with:\n\n    {codec}SNAC_DIT_WEIGHTS={a.out} make serve\n",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        return run(a)
    except AdaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ninterrupted; what is done is kept. Re-run the same command to go on.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
