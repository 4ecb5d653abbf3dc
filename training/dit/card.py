"""MODEL_CARD.md for a shipped DiT snapshot, from what was measured: the run's config and
`metrics.jsonl`, the token directory's manifest (data, splits, codec), the corpus manifest
(licences) and, when given, `bench/eval_continuation.py`'s result.

    python -m training.dit.card --run runs/dit_demo --weights weights/demo/dit \
        --corpus data/corpus [--eval bench/results/continuation_demo.json] [--notes NOTES.md]

Training time is summed from the log windows' wall seconds at quiet-machine speed
(`training.run.card.quiet_hours`: a window paused for tests counts at the median speed).
Masked cross-entropy and accuracy come from the trainer's own evaluation (EMA weights, fixed
held-out windows and masks; training/dit/evaluate.py), next to two baselines on the same
targets: the untrained model (zero-initialised output heads predict uniformly, so its
cross-entropy is exactly ln V) and the unigram model (the train split's token frequencies).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

from model.diffusion import LEVEL_NAMES
from model.weights import read_dit_config
from training.run.card import LICENCE_NOTE, corpus_table, quiet_hours
from training.run.observe import METRICS_FILE
from training.tokens.shards import read_manifest


class CardError(ValueError):
    """The inputs do not describe one snapshot (missing files, mismatched run and weights)."""


def read_metrics(run: Path) -> list[dict]:
    path = run / METRICS_FILE
    if not path.is_file():
        raise CardError(f"{run} has no metrics.jsonl: is it a training run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def level_summary(row: dict, levels: str) -> dict[str, dict[str, float]]:
    """Per level: masked CE and accuracy averaged over the evaluation's (n_ctx, mask) cells,
    and the same for the cells at the largest n_ctx (what /continue runs)."""
    out = {}
    for name in levels:
        cells = {k: v for k, v in row.items() if k.startswith(f"ce_{name}/")}
        if not cells:
            if f"ce_{name}" in row:  # a row recovered as per-level means only
                out[name] = dict(ce=row[f"ce_{name}"], acc=math.nan, ce_full=math.nan,
                                 acc_full=math.nan, n_max=-1, unigram_ce=math.nan,
                                 unigram_acc=math.nan)
            continue
        n_max = max(int(re.search(r"/n(\d+)/", k).group(1)) for k in cells)
        full = [k for k in cells if f"/n{n_max}/" in k]
        out[name] = dict(
            ce=statistics.fmean(cells.values()),
            acc=statistics.fmean(row[k.replace("ce_", "acc_", 1)] for k in cells),
            ce_full=statistics.fmean(row[k] for k in full),
            acc_full=statistics.fmean(row[k.replace("ce_", "acc_", 1)] for k in full),
            n_max=n_max,
            unigram_ce=row.get(f"unigram_ce_{name}", math.nan),
            unigram_acc=row.get(f"unigram_acc_{name}", math.nan),
        )
    return out


def split_hours(manifest: dict) -> dict[str, tuple[int, float]]:
    out: dict[str, list] = {}
    for f in manifest["files"]:
        s = out.setdefault(f["split"], [0, 0.0])
        s[0] += 1
        s[1] += f["duration"] / 3600
    return {k: (n, h) for k, (n, h) in out.items()}


def stage_rows(train: dict) -> list[str]:
    rows = ["| stage | steps | n_ctx 0 / 1 / 2 | with after-context |", "|---|---|---|---|"]
    for st in train["curriculum"]["stages"]:
        w = " / ".join(f"{x:g}" for x in st["n_ctx"])
        rows.append(f"| {st['name']} | {st['steps']:,} | {w} | {st.get('n_after', 0):g} |")
    return rows


CONTINUATION_METRICS = (("frechet", "Fréchet (MFCC + chroma) ↓"), ("harmony", "harmony ↑"),
                        ("timbre", "timbre ↑"), ("retrieval", "retrieval ↑"),
                        ("seam", "seam"), ("copy", "copy"))


def _metrics_table(table: dict) -> str:
    head = "| system | " + " | ".join(label for _, label in CONTINUATION_METRICS) + " |"
    rows = [head, "|---|" + "---|" * len(CONTINUATION_METRICS)]
    for system, values in table.items():
        rows.append(f"| {system} | " + " | ".join(f"{values[k]:.3f}" for k, _ in
                                                   CONTINUATION_METRICS) + " |")
    return "\n".join(rows)


def continuation_text(result: dict) -> str:
    """`bench/eval_continuation.py`'s result as a card section: the table against the original
    audio, then (results since it has one) the table in the codec's domain."""
    coded = result.get("metrics_codec_domain")
    coded_text = "" if coded is None else f"""
In the codec's domain (the DiT alone): every window encoded and decoded whole, so the contexts
are the codec's renderings, "real" is the true continuation through the codec (perfect
tokens), "repeat" the rendered context's last chunk and "random" another window's rendered
continuation:

{_metrics_table(coded)}
"""
    steps = ",".join(map(str, result.get("steps", [])))
    return f"""
## Continuations (held-out tracks)

`python bench/eval_continuation.py` ({result.get('date')}): {result.get('windows')} windows of
{result.get('tracks')} held-out tracks, 12.288 s of context each, sampling steps {steps}, seed
{result.get('seed')}. "codec" is the true continuation through the codec (what perfect tokens
would give: the gap from it to "real" is the codec's), "repeat" plays the context's last chunk
again, "random" is another held-out track, "real" the true continuation (the metrics are
defined in that script and in
docs/benchmarks.md; seam: the real continuation's value is the scale, copy: "repeat" shows
what a copy scores).

{_metrics_table(result["metrics"])}
{coded_text}"""


def warm_text(train: dict) -> str:
    """The recipe's line on a warm start (training.init_step), or nothing."""
    at = train.get("init_step") or 0
    if not at:
        return ""
    return (f"- Warm-started at step {at:,} from `{shown_path(train.get('init'))}` on a machine "
            "without the run directory: weights and EMA from that snapshot, the optimiser state "
            f"fresh (its lr ramped back onto the schedule over "
            f"{train['optim'].get('rewarm_steps', 0)} steps), the log carried over.\n")


def shown_path(source) -> str:
    """A source path as the card shows it: relative to the working directory when inside it
    (the card is committed; the machine's absolute paths mean nothing elsewhere)."""
    if source is None:
        return "unknown"
    p = Path(str(source))
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve())) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def _style_line(dit: dict) -> str:
    """The card's line on style actions (issue 37; configs before it have none)."""
    k = dit.get("style_actions", 0)
    if not k:
        return "none (requests with a style or an action get a 422)."
    return (f"{k} learned without labels (top-{dit['style_topk']} after "
            f"{dit['style_warmup']:,} steps, dropout {dit['style_dropout']:g}); "
            "docs/model.md, \"Style actions\".")


def style_section(weights: Path, style_eval: dict | None = None) -> str:
    """The card's section on what the style actions mean (`python -m training.dit.actions`
    beside the weights) and how well a reference's style is followed (bench/eval_style.py)."""
    from model.style import ACTIONS_FILE

    parts = []
    path = weights / ACTIONS_FILE
    if path.is_file():
        notes = json.loads(path.read_text())
        rows = ["| action | share of chunks | description | example |", "|---|---|---|---|"]
        for a in notes["actions"]:
            example = f"`{a['example']['file']}`" if a.get("example") else "-"
            rows.append(f"| {a['action']} | {100 * a['share']:.0f} % | {a['description']} | "
                        f"{example} |")
        parts.append(f"What each action means, measured on {notes['chunks']} chunks of "
                     f"`{shown_path(notes['tokens'])}` (`python -m training.dit.actions`; "
                     f"{notes['method']}):\n\n" + "\n".join(rows))
    if style_eval:
        cols = ("ref_retrieval", "style_retrieval", "toward_timbre", "toward_chroma", "seam_ratio")
        rows = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        rows += [f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |"
                 for name, r in style_eval["rows"].items()]
        parts.append(f"Following a reference clip's style (`bench/eval_style.py`, "
                     f"{style_eval['windows']} held-out windows, chance retrieval "
                     f"{style_eval['chance']:.3f}; the seam ratio is against the unstyled "
                     "continuation's, the issue's bound 1.2):\n\n" + "\n".join(rows))
    if not parts:
        return ""
    return "\n## Style actions\n\n" + "\n\n".join(parts) + "\n"


def card(run: Path, weights: Path, corpus: Path | None = None, result: dict | None = None,
         notes: str = "", tokens: Path | None = None, style_eval: dict | None = None) -> str:
    served = read_dit_config(weights)
    if not (run / "config.json").is_file():
        raise CardError(f"{run} has no config.json: is it a training run directory?")
    train = json.loads((run / "config.json").read_text())
    step = served.get("training", {}).get("step")
    if step is None:
        raise CardError(f"{weights}/config.json does not say which step it was exported at "
                        "(export it with snac-dit-export)")
    if served.get("training", {}).get("run") not in (None, train["name"]):
        raise CardError(f"{weights} was exported from run {served['training']['run']!r}, "
                        f"not {train['name']!r} ({run})")
    rows = [r for r in read_metrics(run) if r.get("step", 0) <= step]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    if not eval_rows:
        raise CardError(f"{run}/metrics.jsonl has no evaluation up to step {step}: the card "
                        "reports held-out figures (set eval.every)")
    windows, prev = [], 0
    for r in train_rows:
        if "seconds" in r:
            windows.append((r["step"] - prev, r["seconds"]))
        prev = r["step"]
    hours = quiet_hours(windows) + sum(r.get("eval_seconds", 0) for r in eval_rows) / 3600

    dit = served["dit"]
    V, n_levels = int(dit["codebook_size"]), int(dit["n_levels"])
    levels = LEVEL_NAMES[:n_levels]
    token_dir = Path(tokens or train["data"]["tokens"])
    manifest = read_manifest(token_dir)
    codec = manifest["codec"]
    splits = split_hours(manifest)
    last = eval_rows[-1]
    summ = level_summary(last, levels)
    n_params = None
    weights_file = weights / "model.safetensors"
    if weights_file.is_file():
        from safetensors import safe_open

        with safe_open(str(weights_file), "pt") as f:
            n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    untrained = math.log(V)

    metric_rows = [
        "| level | masked CE (all cells) | accuracy | CE at n_ctx {n} | accuracy at n_ctx {n} | "
        "unigram CE | unigram accuracy | untrained CE |".format(
            n=max(s["n_max"] for s in summ.values())),
        "|---|---|---|---|---|---|---|---|"]
    for name, s in summ.items():
        metric_rows.append(
            f"| {name} | {s['ce']:.3f} | {100 * s['acc']:.1f} % | {s['ce_full']:.3f} | "
            f"{100 * s['acc_full']:.1f} % | {s['unigram_ce']:.3f} | {100 * s['unigram_acc']:.1f} % "
            f"| {untrained:.3f} |")
    curve = ["| step | mean CE | " + " | ".join(f"CE {n}" for n in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    for r in eval_rows:
        s = level_summary(r, levels)
        curve.append(f"| {r['step']:,} | {r.get('ce_mean', math.nan):.3f} | "
                     + " | ".join(f"{s[n]['ce']:.3f}" if n in s else "–" for n in levels) + " |")
    last_train = train_rows[-1] if train_rows else {}

    data = []
    if corpus is not None:
        table, by_file = corpus_table(corpus)
        data += ["The six Debian music packages (`python -m training.corpus.debian_music`, 32 kHz "
                 "mono, deduplicated; per-track licences in the corpus `manifest.jsonl`). "
                 + LICENCE_NOTE, "", *table, ""]
    else:
        by_file = {}
    n_tr, h_tr = splits.get("train", (0, 0.0))
    n_va, h_va = splits.get("val", (0, 0.0))
    held = manifest.get("hold_out") or []
    data.append(f"Tokens: `{token_dir}` ({n_tr} training files, {h_tr:.2f} h; {n_va} held-out "
                f"files, {h_va:.2f} h, never trained on).")
    if by_file and n_tr + n_va < len(by_file):
        data[-1] += (f" They cover {n_tr + n_va} of the corpus's {len(by_file)} tracks: the latest "
                     "working period tokenised a part of it (`python -m training.tokens --part "
                     "K/N`, docs/data.md); earlier periods trained on the whole corpus or on "
                     "other parts.")
    if held:
        data += ["", f"Held out by name ({len(held)}: the codec's own validation tracks, so "
                 "neither model trained on them):", ""]
        data += [f"- `{t}` ({by_file[Path(t).name]['package']}, {by_file[Path(t).name]['licence']})"
                 if Path(t).name in by_file else f"- `{t}`" for t in held]

    opt = train["optim"]
    codes = (f" (codes fingerprint `{codec['codes_fingerprint']}`)"
             if codec.get("codes_fingerprint") else "")
    shipped = Path("training/configs") / f"{train['name']}.toml"
    command = (f"`python training/train.py --config {shipped}`" if shipped.is_file()
               else "`python training/train.py` with the settings below")
    cont = continuation_text(result) if result else ""
    total = sum(s["steps"] for s in train["curriculum"]["stages"])
    status = ("The curriculum is complete: this is its last step, trained across several "
              "working periods." if step >= total else
              "**Work in progress**: training continues across working periods; the figures\n"
              "below are what this snapshot measures.")
    return f"""# Demo DiT (snac-dit) — snapshot at step {step:,}

The hierarchical masked-diffusion transformer that continues music in `make serve`, trained
from scratch on a 2-core CPU on the demo codec's tokens, so that a fresh checkout continues
music offline. {status}

- Architecture: preset `{train['model'].get('preset')}`, d_model {dit['d_model']}, {dit['n_layers']}
  layers, {dit['n_heads']} heads, {n_levels} levels of {V:,} codes
  ({f'{n_params:,} parameters' if n_params else 'parameters: see model.safetensors'}).
- Style actions: {_style_line(dit)}
- Files: `config.json` (model, diffusion schedules, codec, provenance) and `model.safetensors`
  ({', '.join(dtypes) if n_params else '?'}; the engine computes in fp32 on CPU, bf16 on CUDA).
- Codec: the tokens were made by codec fingerprint `{codec['fingerprint']}`{codes} from
  `{shown_path(codec.get('source'))}`; serve with that codec (a decoder-only fine-tune of it is fine).

## Data and licences

{chr(10).join(data)}

## Recipe

{command} (re-running it resumes; the run's full config is `{run}/config.json`).
Batch {train['data']['batch_size']} windows × {opt['grad_accum']} accumulation; AdamW lr
{opt['lr']:g} → {opt['min_lr']:g} (warmup {opt['warmup_steps']}, cosine), EMA {opt['ema_decay']};
compute `{train['dtype']}`; curriculum (n_ctx drawn per row from the weights):

{chr(10).join(stage_rows(train))}

{warm_text(train)}- Steps: {step:,} of {total:,} (EMA weights
  exported); last logged training loss {last_train.get('loss', math.nan):.3f} at
  {last_train.get('tokens_per_s', 0):.0f} tokens/s.
- Training time: {hours:.2f} h on a 2-core AMD EPYC VM (no GPU), evaluations included, counted
  at quiet-machine speed (`training/dit/card.py` says how).

## Held-out masked-token metrics (step {last['step']:,})

The trainer's evaluation: fixed windows of the held-out files, a share of each level's target
tokens masked (ratios {', '.join(k.split('/m')[1] for k in last if k.startswith(f'ce_{levels[0]}/n0/'))}) at
each context length, EMA weights; cross-entropy in nats (lower is better) and accuracy of the
masked tokens. Untrained: the zero-initialised heads predict uniformly (ln {V:,}). Unigram: the
train split's token frequencies per level, on the same targets.

{chr(10).join(metric_rows)}

Evaluation curve (mean masked CE over all cells, and per level):

{chr(10).join(curve)}
{cont}{style_section(weights, style_eval) if dit.get("style_actions") else ""}
{f"{chr(10)}## What it sounds like{chr(10)}{chr(10)}{notes.strip()}{chr(10)}" if notes.strip() else ""}"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="the training run directory")
    ap.add_argument("--weights", required=True, type=Path,
                    help="the exported snapshot (snac-dit-export RUN DIR); the card goes there")
    ap.add_argument("--tokens", type=Path, help="token directory (default: the run's data.tokens)")
    ap.add_argument("--corpus", type=Path, help="the corpus the tokens came from (licence table)")
    ap.add_argument("--eval", type=Path, help="bench/eval_continuation.py --out JSON")
    ap.add_argument("--style-eval", type=Path, help="bench/eval_style.py --out JSON")
    ap.add_argument("--notes", type=Path, help="Markdown: what listening shows")
    a = ap.parse_args(argv)
    try:
        result = json.loads(a.eval.read_text()) if a.eval else None
        style_eval = json.loads(a.style_eval.read_text()) if a.style_eval else None
        text = card(a.run, a.weights, a.corpus, result,
                    a.notes.read_text() if a.notes else "", a.tokens, style_eval)
    except (CardError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (a.weights / "MODEL_CARD.md").write_text(text)
    print(f"wrote {a.weights / 'MODEL_CARD.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
