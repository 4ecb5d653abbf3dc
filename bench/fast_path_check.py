"""Same music? Each fast-path lever (model/fast.py) against the unoptimised path, held-out tracks.

    python bench/fast_path_check.py --audio HELD_OUT_FILES... --levers maskless,int8 \
        --out bench/results/fast_path_check.json

Two measurements per lever set, both against the engine with every lever off:

    masked CE   the trainer's held-out metric (training/dit/evaluate.py): 18.432 s windows
                encoded whole, each level's target masked at ratios 0.3 / 0.6 / 0.9 with the
                full context (n_ctx 2), cross-entropy of the masked tokens per level. Its noise
                floor is the unoptimised model on other masks (`--seed` + 1): a lever that moves
                CE by less than other masks do does not change what the model predicts
    tokens      one continuation per window with each path, same seed: the share of generated
                tokens that are identical per level (1.0 = the same music bit for bit)

The continuation table (bench/eval_continuation.py --levers ...) is the listening-side check.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from audio import read_audio
from model.engine import ContinuationEngine
from model.fast import FastPath, apply_fast_path
from model.sampler import SamplingParams, generate
from training.dit.evaluate import masked_token_metrics

RATIOS = (0.3, 0.6, 0.9)


def held_out_windows(engine, files, per_track: int) -> list[torch.Tensor]:
    """Per level (n, 3 * F_l) tokens of 18.432 s windows (two context chunks, one target),
    evenly spread over each file, each encoded whole."""
    span = engine.context_samples + engine.chunk_samples
    rows = []
    for path in files:
        x = read_audio(path, engine.sample_rate)
        for start in np.linspace(0, len(x) - span, per_track).astype(int):
            rows.append(engine._codec_encode(torch.from_numpy(x[start:start + span])[None]))
    return [torch.cat(level) for level in zip(*rows, strict=True)]


def masked_ce(model, windows, schedules, seed: int) -> dict[str, float]:
    """Mean masked CE per level over the ratios (and the mean over levels)."""
    sums: dict[str, list[float]] = {}
    for i, r in enumerate(RATIOS):
        for name, (ce, _, n) in masked_token_metrics(model, windows, 2, r, schedules,
                                                     seed + 1000 * i).items():
            sums.setdefault(name, []).append(ce / n)
    out = {k: round(float(np.mean(v)), 4) for k, v in sums.items()}
    out["mean"] = round(float(np.mean(list(out.values()))), 4)
    return out


@torch.no_grad()
def continuations(engine, windows, steps) -> list[torch.Tensor]:
    fpc = engine.dit.config.frames_per_chunk
    ctx = [w[:, : 2 * f] for w, f in zip(windows, fpc, strict=True)]
    params = [SamplingParams(steps=steps, seed=i) for i in range(ctx[0].shape[0])]
    return [torch.cat(level) for level in zip(*(
        generate(engine.dit, [c[i:i + 1] for c in ctx], params[i:i + 1],
                 engine.diffusion.schedules) for i in range(ctx[0].shape[0])), strict=True)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="weights/demo/dit")
    ap.add_argument("--codec", default="weights/demo/codec")
    ap.add_argument("--audio", type=Path, nargs="+", required=True, help="held-out audio files")
    ap.add_argument("--per-track", type=int, default=2)
    ap.add_argument("--levers", nargs="+", default=["maskless", "maskless,int8"],
                    help="lever sets to check, each a comma list (model/fast.py)")
    ap.add_argument("--steps", default="", help="per-level steps of the token check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    engine = ContinuationEngine.load(a.weights, a.codec)
    apply_fast_path(engine, FastPath.from_names("none"))
    windows = held_out_windows(engine, a.audio, a.per_track)
    steps = tuple(int(s) for s in a.steps.split(",")) if a.steps else engine.default_params.steps
    sched = engine.diffusion.schedules
    exact_tokens = continuations(engine, windows, steps)
    result = dict(date=time.strftime("%Y-%m-%d"), weights=a.weights, codec=a.codec,
                  files=[str(f) for f in a.audio], windows=int(windows[0].shape[0]),
                  ratios=list(RATIOS), steps=list(steps),
                  masked_ce={"none": masked_ce(engine.dit, windows, sched, a.seed),
                             "none, other masks": masked_ce(engine.dit, windows, sched,
                                                            a.seed + 1)},
                  same_tokens={})
    for levers in a.levers:
        apply_fast_path(engine, FastPath.from_names(levers))
        result["masked_ce"][levers] = masked_ce(engine.dit, windows, sched, a.seed)
        got = continuations(engine, windows, steps)
        result["same_tokens"][levers] = [round(float((x == y).float().mean()), 4)
                                         for x, y in zip(exact_tokens, got, strict=True)]
        apply_fast_path(engine, FastPath.from_names("none"))
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
