"""Does "continue with the style of that clip" move the music toward that clip, and at what
cost at the join? Issue 37's measurement, on held-out tracks.

    python bench/eval_style.py --weights weights/next/dit --codec weights/next/codec \
        --audio data/corpus --tokens data/tokens_next --split val --per-track 4 \
        [--modes cfg:1,cfg:2,icg:2] [--steps 16,12,8,8] --out bench/results/style_eval.json

For windows of 18.432 s cut from held-out tracks (12.288 s of context, the real 6.144 s after
it), each window i gets a reference: the context of a window of *another* track (a fixed
derangement, so a reference never shares its window's track). The model continues every
context once without a style (`unstyled`, the baseline) and once per `--modes` entry with the
reference's style (`kind:scale`: `cfg` or `icg` guidance, `style_scale`; `cfg:1` is plain
conditioning, no guidance row), with the same seeds throughout. Scored:

    ref_retrieval    share of continuations whose own reference is the most similar of all
                     references (z-scored 19 MFCC + 12 chroma means, bench/eval_continuation's
                     features): does the continuation follow *this* reference? chance = 1/N
    style_retrieval  the same in the model's own terms: the continuation's style vector (the
                     DiT's style of its tokens, `engine.style_vector`) against every
                     reference's; cosine, nearest wins
    toward_timbre    mean over windows of cos(continuation, reference) - cos(unstyled
                     continuation, reference) on the MFCC means: > 0 = moved toward the reference
    toward_chroma    the same on the mean chroma (key and harmony)
    context_timbre   cos of the continuation's MFCC means with its own context's (does it still
                     belong where it is?)
    seam             spectral flux at the join over the continuation's median flux (median over
                     windows), and seam_ratio, that over the unstyled row's: the issue asks <= 1.2

Without a style the model is the base model exactly (tested bit for bit), so the unstyled row's
quality is bench/eval_continuation.py's table. Results: a markdown table on stdout and `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_continuation import (  # noqa: E402
    Features,
    _unit,
    cosine,
    held_out_files,
    windows,
)

COLUMNS = ("ref_retrieval", "style_retrieval", "toward_timbre", "toward_chroma",
           "context_timbre", "seam", "seam_ratio")


def parse_modes(text: str) -> list[tuple[str, float]]:
    modes = []
    for item in (m.strip() for m in text.split(",") if m.strip()):
        kind, _, scale = item.partition(":")
        if kind not in ("cfg", "icg"):
            raise SystemExit(f"error: mode {item!r}: the guidance kind is cfg or icg")
        try:
            value = float(scale or 1.0)
        except ValueError:
            raise SystemExit(f"error: mode {item!r}: the scale must be a number") from None
        modes.append((kind, value))
    if not modes:
        raise SystemExit("error: --modes names no mode (e.g. cfg:1,cfg:2,icg:2)")
    return modes


def derangement(tracks: list[int], seed: int) -> list[int]:
    """For each window the index of another window of a different track (fixed by seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in tracks:
        others = [j for j, u in enumerate(tracks) if u != t]
        if not others:
            raise SystemExit("error: the references must come from other tracks: give at least "
                             "two held-out tracks")
        out.append(int(rng.choice(others)))
    return out


def seam_ratio(features: Features, context: np.ndarray, x: np.ndarray, join: int = 2048):
    joined = np.concatenate([context[-4 * join:], x[: 4 * join]])
    flux = features.flux(joined)
    at = 4 * join // 512
    return float(flux[at - 2: at + 3].max() / (np.median(features.flux(x)) + 1e-9))


def score(features: Features, contexts, references, ref_styles, outs, unstyled,
          style_of) -> dict:
    """One row: every column of the module docstring for continuations `outs`; ref_styles
    (N, d): the references' style vectors; style_of: audio -> its style vector."""
    ctx = [features.frames(c) for c in contexts]
    refs = [features.frames(r) for r in references]
    pool = np.concatenate(ctx + refs)
    mean, std = pool.mean(0), pool.std(0) + 1e-8
    z = lambda f: (f - mean) / std  # noqa: E731
    ref_means = _unit(np.stack([z(f).mean(0) for f in refs]))
    ref_styles = _unit(ref_styles)
    hits, style_hits, d_timbre, d_chroma, c_timbre, seams = 0, 0, [], [], [], []
    for i, x in enumerate(outs):
        f, g = features.frames(x), features.frames(unstyled[i])
        hits += int(np.argmax(ref_means @ _unit(z(f).mean(0))) == i)
        style_hits += int(np.argmax(ref_styles @ _unit(style_of(x))) == i)
        r = z(refs[i])
        d_timbre.append(cosine(z(f)[:, :19].mean(0), r[:, :19].mean(0))
                        - cosine(z(g)[:, :19].mean(0), r[:, :19].mean(0)))
        d_chroma.append(cosine(f[:, 19:].mean(0), refs[i][:, 19:].mean(0))
                        - cosine(g[:, 19:].mean(0), refs[i][:, 19:].mean(0)))
        c_timbre.append(cosine(z(f)[:, :19].mean(0), z(ctx[i])[:, :19].mean(0)))
        seams.append(seam_ratio(features, contexts[i], x))
    n = len(outs)
    return dict(ref_retrieval=hits / n, style_retrieval=style_hits / n,
                toward_timbre=float(np.mean(d_timbre)), toward_chroma=float(np.mean(d_chroma)),
                context_timbre=float(np.mean(c_timbre)), seam=float(np.median(seams)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="DiT directory (trained with style actions)")
    p.add_argument("--codec", required=True, help="codec directory or hub id")
    p.add_argument("--audio", type=Path, nargs="+", required=True,
                   help="audio folder (with --tokens: the folder the tokens were made from)")
    p.add_argument("--tokens", type=Path, help="token directory whose --split files to use")
    p.add_argument("--split", default="val")
    p.add_argument("--per-track", type=int, default=4, help="windows per track")
    p.add_argument("--modes", default="cfg:1,cfg:2,icg:2",
                   help="kind:scale per styled row (cfg or icg guidance, style_scale)")
    p.add_argument("--steps", default=None, help="per-level steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/style_eval.json"))
    a = p.parse_args(argv)
    modes = parse_modes(a.modes)
    if a.threads:
        torch.set_num_threads(a.threads)
    from model.engine import ContinuationEngine, StyleRequest

    engine = ContinuationEngine.load(a.weights, a.codec)
    if not engine.style_actions:
        raise SystemExit(f"error: {a.weights} has no style actions (trained without them): "
                         "there is no style to evaluate")
    files = held_out_files(a.audio, a.tokens, a.split)
    wins = windows(files, engine.sample_rate, engine.chunk_samples, engine.context_samples,
                   a.per_track)
    if not wins:
        raise SystemExit("error: no held-out track is long enough for an 18.432 s window")
    tracks = [w[0] for w in wins]
    ref_of = derangement(tracks, a.seed)
    contexts = [w[1] for w in wins]
    references = [contexts[j] for j in ref_of]
    steps = tuple(int(s) for s in a.steps.split(",")) if a.steps else None
    base = replace(engine.default_params, **({"steps": steps} if steps else {}))

    def style_of(x: np.ndarray) -> np.ndarray:
        return engine.style_vector(reference=torch.as_tensor(x, dtype=torch.float32)).cpu().numpy()

    ref_styles = np.stack([style_of(r) for r in references])

    def run(mode: tuple[str, float] | None) -> tuple[list[np.ndarray], float]:
        outs, t0 = [], time.perf_counter()
        for i, ctx in enumerate(contexts):
            params = replace(base, seed=a.seed + i)
            style = None
            if mode is not None:
                params = replace(params, style_guidance=mode[0], style_scale=mode[1])
                style = StyleRequest(reference=torch.as_tensor(references[i]))
            y = engine.continue_batch([torch.as_tensor(ctx)], [params], styles=[style])[0]
            outs.append(y.reshape(-1).numpy()[: engine.chunk_samples])
        return outs, time.perf_counter() - t0

    features = Features(engine.sample_rate)
    unstyled, seconds = run(None)
    rows = {"unstyled": dict(score(features, contexts, references, ref_styles, unstyled,
                                   unstyled, style_of), seconds=seconds)}
    for mode in modes:
        outs, seconds = run(mode)
        rows[f"{mode[0]}:{mode[1]:g}"] = dict(
            score(features, contexts, references, ref_styles, outs, unstyled, style_of),
            seconds=seconds)
    for row in rows.values():
        row["seam_ratio"] = row["seam"] / max(rows["unstyled"]["seam"], 1e-9)
    result = dict(
        weights=a.weights, codec=a.codec, windows=len(wins), tracks=len(set(tracks)),
        chance=1 / len(wins), steps=list(base.validated(engine.codec.n_levels).steps),
        seed=a.seed, host=platform.node(), torch=torch.__version__, rows=rows,
        files=[str(f) for f in files])
    print(f"{len(wins)} windows of {len(set(tracks))} held-out tracks; chance "
          f"retrieval {1 / len(wins):.3f}\n")
    print("| row | " + " | ".join(COLUMNS) + " | seconds |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS)
              + f" | {row['seconds']:.0f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
