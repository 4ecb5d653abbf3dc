"""How good are the model's continuations? Held-out tracks, the model against three references.

    python bench/eval_continuation.py --weights weights/demo/dit --codec weights/demo/codec \
        --audio data/corpus --tokens data/tokens --split val \
        [--per-track 4] [--steps 16,12,8,8] [--seed 0] [--samples docs/samples/continuation]

For windows of 18.432 s cut from held-out tracks (12.288 s of context, then the real 6.144 s),
five systems continue each context by one 6.144 s chunk:

    model    the DiT through the engine (`ContinuationEngine.continue_batch`)
    codec    the true continuation through the codec, encoded with its context and decoded as
             the model's is (`ContinuationEngine.round_trip`): what perfect tokens would give,
             so the gap between "codec" and "real" is the codec's, the rest the DiT's
    repeat   the context's last chunk, played again (a loop of the context)
    random   6.144 s of another held-out track (right distribution, no relation to the context)
    real     the true continuation

and every continuation is scored with features that need no downloaded weights: 19 MFCCs
(timbre) and a 12-bin chroma (harmony) per 64 ms frame.

Two tables. The audio table (`metrics`) scores against the original audio: what a listener
gets, codec included. The codec-domain table (`metrics_codec_domain`) judges the DiT alone:
every window is encoded and decoded whole (context and true continuation), and all of its
systems live in that rendering: the contexts are the codec's contexts (what the model's output
joins), "real" is the true continuation through the codec (perfect tokens), "repeat" the codec
context's last chunk, "random" another window's true continuation through the codec. So a
codec that blurs every track alike no longer hides the DiT: there, perfect tokens score as
"real" does, by construction.

    frechet      Fréchet distance between the system's frames and the real continuations' frames
                 (all windows pooled): is it the right kind of music at all? lower is better
    harmony      cosine of the continuation's mean chroma with its context's: same key? higher
    timbre       cosine of mean MFCCs with the context's: same instruments? higher
    retrieval    share of continuations whose own context is the most similar of all contexts
                 (chroma + MFCC means): does it follow *this* context? higher
    seam         spectral flux over the 64 ms around the join, over the continuation's own median
                 flux: a click or jump at the join is large; the real one sets the scale
    copy         mean over continuation frames of the best cosine to any context frame (MFCC +
                 chroma): 1 = copies the context; "repeat" shows what a copy scores

Sampling ablation: `--variants all` (or a comma list of names from VARIANTS) runs the model
once per variant of the sampling defaults (per-level step budgets at equal total, confidence
rule, Gumbel scale, guidance) on the same windows and seeds, and adds a row per variant, with
its wall seconds, next to the references (which are computed once).

Held-out tracks: `--tokens DIR --split val` takes the files of that token directory's split
(their paths relative to `--audio`), so the tracks the DiT was trained on stay out; or give the
files/folders to use with `--audio` alone. Results: stdout (a markdown table) and `--out` JSON.
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

from audio import read_audio  # noqa: E402
from audio.plots import spectrogram_sheet  # noqa: E402
from model.engine import ContinuationEngine  # noqa: E402
from model.fast import FastPath, apply_fast_path  # noqa: E402
from training.codec.data import find_audio_files  # noqa: E402
from training.codec.losses import mel_filterbank, stft_magnitude  # noqa: E402

SYSTEMS = ("model", "codec", "repeat", "random", "real")
METRICS = ("frechet", "harmony", "timbre", "retrieval", "seam", "copy")

# The sampling ablation (`--variants`): each changes the model's defaults in one respect.
# Step budgets keep the default total (16 + 12 + 8 + 8 = 44 network calls) and move it
# between the coarse and the fine levels; half_steps halves it (the latency lever). The
# model row itself is the defaults; "reseed" is the defaults again with other seeds, so the
# gap between it and the model row is what chance alone moves each metric; "reseed_2" and
# "reseed_3" are two more such draws, for a mean over seeds where there are few windows.
VARIANTS = {
    "reseed": dict(seed_offset=100_000),
    "reseed_2": dict(seed_offset=200_000),
    "reseed_3": dict(seed_offset=300_000),
    "a_heavy": dict(steps=(24, 10, 5, 5)),
    "d_heavy": dict(steps=(8, 8, 12, 16)),
    "flat": dict(steps=(11, 11, 11, 11)),
    "half_steps": dict(steps=(8, 6, 4, 4)),
    "confidence_sampled": dict(confidence="sampled"),
    "gumbel_0": dict(gumbel=(0.0,) * 4),
    "gumbel_2": dict(gumbel=(2.0,) * 4),
    "guidance_2": dict(guidance=(2.0,) * 4),
    "temperature_0.8": dict(temperature=(0.8,) * 4),
}
N_FFT, HOP, N_MELS, N_MFCC = 2048, 2048, 64, 20   # 64 ms frames at 32 kHz


# ---------------------------------------------------------------- features
class Features:
    """Per-frame 19 MFCCs (c1..c19) and a 12-bin chroma of mono audio at `sample_rate`."""

    def __init__(self, sample_rate: int):
        self.sr = sample_rate
        self.window = torch.hann_window(N_FFT)
        self.mel = mel_filterbank(sample_rate, N_FFT, N_MELS)                   # (M, F)
        k = torch.arange(N_MELS, dtype=torch.float64)
        dct = torch.cos(torch.pi / N_MELS * (k[None, :] + 0.5) * torch.arange(N_MFCC)[:, None])
        self.dct = (dct * (2.0 / N_MELS) ** 0.5).float()                       # DCT-II, ortho-ish
        freqs = torch.linspace(0, sample_rate / 2, N_FFT // 2 + 1)
        usable = (freqs >= 55) & (freqs <= 4200)
        pitch = torch.round(12 * torch.log2(freqs.clamp(min=1) / 440.0)).long() % 12
        self.chroma_map = torch.zeros(12, freqs.numel())
        self.chroma_map[pitch[usable], torch.nonzero(usable)[:, 0]] = 1.0

    def spectrum(self, x: np.ndarray) -> torch.Tensor:
        return stft_magnitude(torch.as_tensor(x, dtype=torch.float32)[None], N_FFT, HOP,
                              self.window)[0]                                     # (F, frames)

    def frames(self, x: np.ndarray) -> np.ndarray:
        """(frames, 31): MFCC c1..c19 then chroma (each frame's chroma sums to 1)."""
        s = self.spectrum(x)
        mfcc = self.dct @ torch.log(self.mel @ s.pow(2) + 1e-8)                  # (20, frames)
        chroma = self.chroma_map @ s.pow(2)
        chroma = chroma / chroma.sum(0, keepdim=True).clamp(min=1e-10)
        return torch.cat([mfcc[1:], chroma]).T.numpy().astype(np.float64)

    def flux(self, x: np.ndarray, hop: int = 512) -> np.ndarray:
        """Positive spectral flux per 16 ms step (1024-sample Hann frames)."""
        s = stft_magnitude(torch.as_tensor(x, dtype=torch.float32)[None], 1024, hop,
                           torch.hann_window(1024))[0]
        return torch.clamp(s.diff(dim=1), min=0).sum(0).numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a and b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ cb @ root_a)             # eig(sqrt(A) B sqrt(A))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def score(features: Features, contexts: list[np.ndarray], outs: dict[str, list[np.ndarray]],
          join: int = 2048) -> dict[str, dict[str, float]]:
    """Every metric of the module docstring, per system."""
    ctx_frames = [features.frames(c) for c in contexts]
    # Standardise the feature dims on the contexts, so MFCC scale does not drown the chroma.
    pool = np.concatenate(ctx_frames)
    mean, std = pool.mean(0), pool.std(0) + 1e-8
    z = lambda f: (f - mean) / std  # noqa: E731
    ctx_means = np.stack([z(f).mean(0) for f in ctx_frames])
    real_frames = np.concatenate([features.frames(x) for x in outs["real"]])
    table = {}
    for system, conts in outs.items():
        frames = [features.frames(x) for x in conts]
        harmony, timbre, copy, seam, hits = [], [], [], [], 0
        for i, (f, c, x) in enumerate(zip(frames, ctx_frames, conts, strict=True)):
            harmony.append(cosine(f[:, 19:].mean(0), c[:, 19:].mean(0)))
            timbre.append(cosine(z(f)[:, :19].mean(0), z(c)[:, :19].mean(0)))
            sims = _unit(ctx_means) @ _unit(z(f).mean(0))
            hits += int(np.argmax(sims) == i)
            copy.append(float((_unit(z(f)) @ _unit(z(c)).T).max(1).mean()))
            joined = np.concatenate([contexts[i][-4 * join:], x[: 4 * join]])
            fl = features.flux(joined)
            at = 4 * join // 512                                     # the join's flux step
            seam.append(float(fl[at - 2: at + 3].max() / (np.median(features.flux(x)) + 1e-9)))
        table[system] = dict(
            frechet=frechet(np.concatenate(frames), real_frames),
            harmony=float(np.mean(harmony)), timbre=float(np.mean(timbre)),
            retrieval=hits / len(conts), seam=float(np.median(seam)), copy=float(np.mean(copy)),
        )
    return table


# ---------------------------------------------------------------- data and systems
def held_out_files(audio: list[Path], tokens: Path | None, split: str) -> list[Path]:
    if tokens is None:
        return find_audio_files([str(p) for p in audio])
    from training.tokens.shards import read_manifest

    if len(audio) != 1 or not audio[0].is_dir():
        raise SystemExit("--tokens needs --audio to be the one folder the tokens were made from")
    files = [audio[0] / f["path"] for f in read_manifest(tokens)["files"] if f["split"] == split]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} {split} files of {tokens} are not under {audio[0]}, "
                         f"e.g. {missing[0]}")
    return files


def sample_licence(path: Path) -> str:
    """' (package, licence)' of a track of a corpus built by training.corpus.debian_music."""
    from training.run.card import corpus_table

    for root in path.parents:  # the corpus root: OUT/audio/PKG/NAME.flac, or nearer
        if all((root / f).is_file() for f in ("manifest.jsonl", "summary.json")):
            row = corpus_table(root)[1].get(path.name)
            return f" ({row.get('package', '?')}, {row.get('licence', '?')})" if row else ""
    return ""


def windows(files: list[Path], rate: int, chunk: int, context: int, per_track: int):
    """(track index, context (context,), real continuation (chunk,), start sample) evenly
    spread per track."""
    out = []
    for t, path in enumerate(files):
        x = read_audio(path, rate)
        span = context + chunk
        if len(x) < span:
            continue
        for start in np.linspace(0, len(x) - span, per_track).astype(int):
            out.append((t, x[start:start + context], x[start + context:start + span], int(start)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="DiT checkpoint directory")
    p.add_argument("--codec", required=True, help="codec directory or hub id")
    p.add_argument("--audio", type=Path, nargs="+", required=True,
                   help="held-out audio files/folders, or the corpus folder with --tokens")
    p.add_argument("--tokens", type=Path, help="token directory whose --split files to use")
    p.add_argument("--split", default="val")
    p.add_argument("--per-track", type=int, default=4, help="windows per track")
    p.add_argument("--steps", default=None, help="per-level steps (default: the model's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/continuation_eval.json"))
    p.add_argument("--samples", type=Path, help="write the first windows' WAVs here")
    p.add_argument("--levers", default="",
                   help="the engine's fast path (model/fast.py), e.g. maskless,int8 or none; "
                        "default: the engine's own")
    p.add_argument("--variants", default="",
                   help="sampling ablation: 'all' or a comma list of " + ", ".join(VARIANTS))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    engine = ContinuationEngine.load(a.weights, a.codec)
    if a.levers:
        apply_fast_path(engine, FastPath.from_names(a.levers))
    rate, chunk, context = engine.sample_rate, engine.chunk_samples, engine.context_samples
    files = held_out_files(a.audio, a.tokens, a.split)
    wins = windows(files, rate, chunk, context, a.per_track)
    if len({w[0] for w in wins}) < 2:
        print(f"error: need windows of {(context + chunk) / rate:g} s from at least 2 tracks "
              f"(found {len(wins)} windows in {len(files)} files)", file=sys.stderr)
        return 1
    base = engine.default_params
    if a.steps:
        steps = tuple(int(s) for s in a.steps.split(","))
        base = replace(base, steps=steps * engine.codec.n_levels if len(steps) == 1 else steps)
    names = list(VARIANTS) if a.variants == "all" else [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; choose from "
              f"{', '.join(VARIANTS)} or all", file=sys.stderr)
        return 2
    contexts = [w[1] for w in wins]

    def continue_all(params_base, label: str, seed_offset: int = 0
                     ) -> tuple[list[np.ndarray], float]:
        got_all, t0 = [], time.perf_counter()
        for lo in range(0, len(wins), a.batch):
            part = wins[lo:lo + a.batch]
            params = [replace(params_base, seed=a.seed + seed_offset + lo + i)
                      for i in range(len(part))]
            got = engine.continue_batch([torch.from_numpy(w[1]) for w in part], params)
            got_all += [g.numpy() for g in got]
            print(f"{label}: {lo + len(part)}/{len(wins)} windows, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return got_all, time.perf_counter() - t0

    outs: dict[str, list[np.ndarray]] = {s: [] for s in SYSTEMS}
    outs["model"], model_s = continue_all(base, "model")
    coded_contexts = []  # each whole window through the codec, cut at the join
    for lo in range(0, len(wins), a.batch):
        part = [torch.from_numpy(np.concatenate([w[1], w[2]])) for w in wins[lo:lo + a.batch]]
        for g in engine.round_trip(part, 0, context + chunk, seed=a.seed + lo):
            coded_contexts.append(g[:context].numpy())
            outs["codec"].append(g[context:].numpy())
        print(f"codec: {len(outs['codec'])}/{len(wins)} windows", file=sys.stderr)
    rng = np.random.default_rng(a.seed)
    picks = []  # the window each "random" row takes its clip from
    for t, c, real, _start in wins:
        outs["repeat"].append(c[-chunk:])
        others = [j for j, w in enumerate(wins) if w[0] != t]
        picks.append(others[rng.integers(len(others))])
        outs["random"].append(wins[picks[-1]][2])
        outs["real"].append(real)
    coded = {"model": outs["model"], "repeat": [c[-chunk:] for c in coded_contexts],
             "random": [outs["codec"][j] for j in picks], "real": outs["codec"]}
    features = Features(rate)
    table = score(features, contexts, outs)
    table_coded = score(features, coded_contexts, coded)
    variants = {}
    for name in names:
        change = dict(VARIANTS[name])
        seed_offset = change.pop("seed_offset", 0)
        params = replace(base, **change).validated(engine.codec.n_levels)
        got, seconds = continue_all(params, name, seed_offset)
        variants[name] = dict(
            params={k: VARIANTS[name][k] for k in VARIANTS[name]}, steps=list(params.steps),
            seconds=round(seconds, 1),
            metrics=score(features, contexts, {**outs, "model": got})["model"],
            metrics_codec_domain=score(features, coded_contexts,
                                       {**coded, "model": got})["model"])

    result = dict(
        date=time.strftime("%Y-%m-%d"), weights=str(a.weights), codec=str(a.codec),
        tracks=len({w[0] for w in wins}), windows=len(wins),
        steps=list(base.steps), seed=a.seed, model_seconds=round(model_s, 1),
        platform=platform.platform(), torch=torch.__version__,
        fast_path={k: v["on"] for k, v in engine.info()["fast_path"].items()}, metrics=table,
        metrics_codec_domain=table_coded,
    )
    if variants:
        result["variants"] = variants
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for title, key, tab in (("against the original audio", "metrics", table),
                            ("in the codec's domain (the DiT alone)", "metrics_codec_domain",
                             table_coded)):
        print(f"\n{title}\n\n| system | " + " | ".join(METRICS) + " | seconds |\n|---|"
              + "---|" * (len(METRICS) + 1))
        for system, row in tab.items():
            secs = f"{model_s:.0f}" if system == "model" else ""
            print(f"| {system} | " + " | ".join(f"{row[n]:.3f}" for n in METRICS) + f" | {secs} |")
        for name, v in variants.items():
            print(f"| model, {name} {v['params'] or ''} | "
                  + " | ".join(f"{v[key][n]:.3f}" for n in METRICS) + f" | {v['seconds']:.0f} |")
    if a.samples:
        import soundfile as sf

        a.samples.mkdir(parents=True, exist_ok=True)
        firsts = [i for i, w in enumerate(wins) if i == 0 or wins[i - 1][0] != w[0]][:3]
        lines, spec_rows = [], []
        for n, i in enumerate(firsts):  # the first window of three different tracks
            sigs = {system: np.concatenate([contexts[i][-chunk:], outs[system][i]])
                    for system in ("model", "codec", "real")}
            for system, sig in sigs.items():
                sf.write(a.samples / f"window{n}_{system}.wav", sig, rate, subtype="PCM_16")
            path = files[wins[i][0]]
            spec_rows.append((f"window{n} ({path.name})", sigs))
            names = ", ".join(f"`window{n}_{s}.wav`" for s in ("model", "codec", "real"))
            lines.append(f"- {names}: {path.name} from "
                         f"{(wins[i][3] + context - chunk) / rate:.1f} s{sample_licence(path)}")
        (a.samples / "README.md").write_text(
            f"Continuations of held-out tracks by `{a.weights}` (codec `{a.codec}`, steps "
            f"{','.join(map(str, base.steps))}, seed {a.seed}), written by `bench/eval_continuation.py`. Each file "
            "is the context's last 6.144 s, then 6.144 s of continuation: the model's, the real one "
            "through the codec (what perfect tokens would sound like), or the real one. "
            "Excerpts of the corpus tracks named, under those tracks' licences.\n\n"
            + "\n".join(lines) + "\n")
        if not spectrogram_sheet(a.samples / "spectrograms.png", spec_rows, rate, chunk / rate):
            print("spectrograms.png not drawn: needs matplotlib (pip install "
                  "'snac-dit[bench]')", file=sys.stderr)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
