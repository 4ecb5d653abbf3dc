"""Full fine-tune against low-rank adapters for `adapt`: held-out gain per CPU-minute, and size.

    python bench/adapt_compare.py SONGS --base weights/demo/dit --codec weights/demo/codec \
        --steps 300 --ranks 0,8 --out bench/results/adapt_compare.json

SONGS is tokenised once (in `--work`/tokens, resumable). Then, for each rank (0 = every weight
trains), `training.dit.adapt` runs with the same songs, held-out songs, steps, batch and
learning rate in a work directory of its own that starts from those tokens. Per rank it
records: the wall seconds of the adapt call (fine-tune, export and held-out scoring; the
tokens are ready), adapt's own held-out masked-token cross-entropy per level for the base and
the adapted model, and the bytes written: the fp16 model, and what the adapters alone would
take in fp16. Prints a markdown table; `--out` gets the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from training.dit.adapt import FULL_LR, LORA_LR
from training.dit.adapt import main as adapt
from training.dit.lora import adapter_state
from training.run import checkpoint as ckpt_io
from training.tokens.tokenizer import TokenizeConfig, tokenize


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of the token directory whose shards are hard links (the manifest is rewritten
    by adapt's hold-out through a temp file and a rename, so the source keeps its own)."""
    if dst.exists():
        return
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns(".lock"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("songs", type=Path, help="a folder of audio")
    p.add_argument("--base", default="weights/demo/dit")
    p.add_argument("--codec", default="weights/demo/codec")
    p.add_argument("--ranks", default="0,8", help="comma list; 0 = full fine-tune")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", default="",
                   help="one value, or one per rank (comma list); default adapt's own per kind "
                        f"({LORA_LR:g} for adapters, {FULL_LR:g} for every weight)")
    p.add_argument("--lora-heads", action=argparse.BooleanOptionalAction, default=False,
                   help="adapters on the output heads too (adapt's --lora-heads)")
    p.add_argument("--work", type=Path, default=Path("runs/adapt_compare"))
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    ranks = [int(r) for r in a.ranks.split(",")]
    lrs = a.lr.split(",") if a.lr else [str(LORA_LR if r else FULL_LR) for r in ranks]
    if len(lrs) not in (1, len(ranks)) or any(r < 0 for r in ranks):
        print("error: --ranks must be >= 0 and --lr one value or one per rank", file=sys.stderr)
        return 2
    lrs = lrs * len(ranks) if len(lrs) == 1 else lrs

    tokens = a.work / "tokens"
    summary = tokenize(TokenizeConfig(audio_dir=a.songs, out_dir=tokens, codec=a.codec,
                                      val_fraction=0.0, progress=False))
    if summary.total_files == 0:
        print(f"error: no audio could be tokenised under {a.songs}", file=sys.stderr)
        return 1
    rows = []
    for rank, lr in zip(ranks, lrs, strict=True):
        name = f"rank{rank}" + ("_heads" if a.lora_heads and rank else "")
        work, out = a.work / name, a.work / f"{name}_model"
        _link_tree(tokens, work / "tokens")
        args = [str(a.songs), "--out", str(out), "--base", a.base, "--codec", a.codec,
                "--work", str(work), "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                "--lr", lr, "--lora-rank", str(rank), "--no-progress",
                "--lora-heads" if a.lora_heads else "--no-lora-heads"]
        t0 = time.perf_counter()
        rc = adapt(args)
        seconds = time.perf_counter() - t0
        if rc != 0:
            print(f"error: adapt with rank {rank} exited {rc}", file=sys.stderr)
            return rc
        report = json.loads((work / "adapt_eval.json").read_text())
        weights = ckpt_io.load_checkpoint(work / "run")["weights"]["model"]
        adapters = sum(v.numel() for v in adapter_state(weights).values()) * 2  # fp16 bytes
        model_bytes = (out / "model.safetensors").stat().st_size
        rows.append(dict(rank=rank, lr=float(lr), lora_heads=a.lora_heads and rank > 0,
                         steps=a.steps, seconds=round(seconds, 1),
                         ce_base=report.get("base", {}), ce_adapted=report.get("adapted", {}),
                         ce_change=report.get("change_adapted", {}),
                         model_bytes=model_bytes,
                         written_bytes=adapters if rank else model_bytes))
    result = dict(date=time.strftime("%Y-%m-%d"), songs=str(a.songs), base=a.base,
                  codec=a.codec, batch_size=a.batch_size, threads=torch.get_num_threads(),
                  platform=platform.platform(), torch=torch.__version__, runs=rows)
    levels = list(rows[0]["ce_base"])
    print("| rank | lr | seconds | " + " | ".join(f"CE {lv} base → adapted" for lv in levels)
          + " | written |\n|---|---|---|" + "---|" * len(levels) + "---|")
    for r in rows:
        cells = " | ".join(f"{r['ce_base'][lv]:.3f} → {r['ce_adapted'][lv]:.3f} "
                           f"({r['ce_change'][lv]['mean']:+.3f} ± {r['ce_change'][lv]['se']:.3f})"
                           for lv in levels)
        kind = f"{r['rank'] or 'full'}{' + heads' if r['lora_heads'] else ''}"
        print(f"| {kind} | {r['lr']:g} | {r['seconds']:.0f} | {cells} | "
              f"{r['written_bytes'] / 1e6:.2f} MB |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
