"""Validation during training: masked-token CE / accuracy per level at fixed mask ratios and n_ctx,
plus (when the codec loads) a WAV of a fixed val window continued by the staged sampler.

Comparability across steps: the val windows, the masked positions and the audio sample's seed
are fixed (`eval.seed`); only the weights change. The masks do not depend on n_ctx, so the n_ctx
columns measure exactly what the context adds on the same targets.

A fixed mask ratio r stands for the diffusion time t with gamma_l(t) = r (the model is told that
t), and exactly round(r * F_l) (at least one) tokens of each target level are masked. All levels
are masked at once: a noised level sees only the *clean* copies of the levels below it (teacher
forcing), so each level is scored as if it were the only one being denoised.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
import torch.nn.functional as F

from model.diffusion import LEVEL_NAMES, corrupt, mask_fraction, target_logits
from model.dit import DiT
from model.layout import collate, fill_tokens
from training.dit.config import TrainConfig
from training.tokens.shards import same_codes
from training.tokens.windows import TokenWindows


@functools.lru_cache(maxsize=256)
def time_for_ratio(schedule: str, ratio: float) -> float:
    """t with gamma(t) = ratio, by bisection (every schedule is increasing on [0, 1])."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(mask_fraction(schedule, torch.tensor(mid, dtype=torch.float64))) < ratio:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fixed_masks(B: int, frames_per_chunk, ratio: float, seed: int) -> list[torch.Tensor]:
    """Per level a (B, F_l) bool mask with exactly max(1, round(ratio * F_l)) True per row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for f in frames_per_chunk:
        k = max(1, round(ratio * f))
        order = torch.rand(B, f, generator=g).argsort(dim=1)
        out.append(order < k)  # positions whose random rank is among the first k
    return out


@torch.no_grad()
def masked_token_metrics(model: DiT, windows: list[torch.Tensor], n_ctx: int, ratio: float,
                         schedules, seed: int, autocast=None) -> dict[str, tuple[float, float, int]]:
    """{level name: (CE sum, correct count, masked count)} for one batch of val windows.

    windows[l]: (B, (W+1) * F_l) int64 clean tokens with W >= n_ctx context chunks.
    """
    cfg = model.config
    fpc, V = cfg.frames_per_chunk, cfg.codebook_size
    dev = model.tok_emb.weight.device
    B = windows[0].shape[0]
    batch = collate([n_ctx] * B, fpc, cfg.strides).to(dev)
    tokens = fill_tokens(batch, [w.to(dev) for w in windows])  # (B, N)
    masks = [m.to(dev) for m in fixed_masks(B, fpc, ratio, seed)]
    t = torch.tensor([time_for_ratio(s, ratio) for s in schedules], device=dev).expand(B, -1)
    seg_t, idx, clean = corrupt(batch, tokens, masks, t, mask_id=V)
    with (autocast or contextlib.nullcontext)():
        logits_per_level = target_logits(model, tokens, batch, seg_t, idx)
    out = {}
    for lvl, logits in enumerate(logits_per_level):
        ce = F.cross_entropy(logits.transpose(1, 2), clean[lvl], reduction="none")  # (B, F_l)
        m = masks[lvl]
        hit = (logits.argmax(-1) == clean[lvl]) & m
        out[LEVEL_NAMES[lvl]] = (float(ce[m].sum()), float(hit.sum()), int(m.sum()))
    return out


def unigram_baseline(token_dir, manifest: dict, windows: list[torch.Tensor]) -> dict:
    """Per level {"ce", "acc"} of guessing every target token of the val windows from the train
    split's token frequencies alone (add-one smoothed): what a model that ignores context and
    position scores. A trained DiT's masked CE must come in well under it."""
    from training.tokens.shards import file_tokens

    V = int(manifest["codec"]["geometry"]["codebook_size"])
    counts = [np.ones(V, dtype=np.float64) for _ in windows]
    for entry in manifest["files"]:
        if entry["split"] == "train":
            for lvl, tokens in enumerate(file_tokens(token_dir, manifest, entry)):
                counts[lvl] += np.bincount(np.asarray(tokens, dtype=np.int64), minlength=V)[:V]
    out = {}
    fpc = manifest["codec"]["geometry"]["frames_per_chunk"]
    for name, c, w, f in zip(LEVEL_NAMES, counts, windows, fpc, strict=False):
        logp = np.log(c / c.sum())
        target = w[:, -f:].numpy().astype(np.int64)   # the chunk the model predicts
        out[name] = {"ce": float(-logp[target].mean()),
                     "acc": float((target == int(c.argmax())).mean())}
    return out


class Evaluator:
    """Holds the fixed val windows, a spare model for the evaluated weights, and the codec."""

    def __init__(self, cfg: TrainConfig, manifest: dict, model_cfg, diff_cfg, device, autocast):
        self.cfg, self.ecfg = cfg, cfg.eval
        self.manifest, self.device, self.autocast = manifest, device, autocast
        self.schedules = tuple(diff_cfg.schedules)
        self.model = DiT(model_cfg).to(device).eval()
        self.model.requires_grad_(False)
        self._codec, self._codec_error = None, None
        self.windows = self._val_windows() if self.ecfg.every else None
        self.baseline = (unigram_baseline(cfg.data.tokens, manifest, self.windows)
                         if self.windows is not None else {})
        if self.windows is None and self.ecfg.every:
            print(f"eval: {cfg.data.tokens} has no val windows of {max(self.ecfg.n_ctx) + 1} "
                  "chunks; evaluation is skipped (tokenise more audio or raise --val-fraction)")

    def _val_windows(self) -> list[torch.Tensor] | None:
        """Fixed windows (batches * batch_size, spread evenly over the split), or None."""
        W = max(self.ecfg.n_ctx)
        # Contexts as `/continue` encodes them, where the directory has the tiles for it.
        kinds = (1.0, 0.0, 0.0) if "tiles" in self.manifest else (0.0, 0.0, 1.0)
        val = TokenWindows(self.cfg.data.tokens, "val", n_ctx=W, contexts=kinds)
        if len(val) == 0:
            return None
        k = self.ecfg.batches * self.ecfg.batch_size
        picks = np.unique(np.linspace(0, len(val) - 1, k).round().astype(np.int64))
        items = [val[int(i)]["tokens"] for i in picks]
        return [torch.stack([it[lvl] for it in items]) for lvl in range(len(items[0]))]

    def run(self, weights: dict, step: int, run_dir) -> dict:
        if self.windows is None:
            return {}
        self.model.load_state_dict(weights)
        e, out = self.ecfg, {}
        n_rows = self.windows[0].shape[0]
        ce_all = []
        for n in e.n_ctx:
            for ri, r in enumerate(e.mask_ratios):
                acc = {}
                for b, lo in enumerate(range(0, n_rows, e.batch_size)):
                    win = [w[lo : lo + e.batch_size] for w in self.windows]
                    res = masked_token_metrics(self.model, win, n, r, self.schedules,
                                               seed=e.seed + 1000 * ri + b, autocast=self.autocast)
                    for name, (ce, hit, cnt) in res.items():
                        a = acc.setdefault(name, [0.0, 0.0, 0])
                        a[0], a[1], a[2] = a[0] + ce, a[1] + hit, a[2] + cnt
                for name, (ce, hit, cnt) in acc.items():
                    out[f"ce_{name}/n{n}/m{r:g}"] = ce / cnt
                    out[f"acc_{name}/n{n}/m{r:g}"] = hit / cnt
                    ce_all.append(ce / cnt)
        out["ce_mean"] = float(np.mean(ce_all))  # one number to watch: mean over every cell
        for name, b in self.baseline.items():     # the same targets by token frequency alone
            out[f"unigram_ce_{name}"], out[f"unigram_acc_{name}"] = b["ce"], b["acc"]
        if e.audio:
            path = self._write_sample(step, run_dir)
            if path is not None:
                out["sample"] = str(path)
        return out

    # ------------------------------------------------------------------ audio
    def codec(self):
        """The tokens' codec, or None (with the reason printed once) when it cannot be loaded."""
        if self._codec is None and self._codec_error is None:
            from model.codec import DEBUG_CODEC_CONFIG, Codec

            info = self.manifest["codec"]
            source = self.ecfg.codec or info["source"]
            try:
                codec = Codec.load(DEBUG_CODEC_CONFIG if source == "debug" else source,
                                   device=self.device)
                if not same_codes(info, codec.fingerprint, codec.codes_fingerprint):
                    raise ValueError(f"codec {source!r} makes other codes than the codec the "
                                     f"tokens were made by ({info['fingerprint']})")
                self._codec = codec
            except Exception as e:  # offline hub, moved directory, other weights: skip audio
                self._codec_error = e
                print(f"eval: no audio samples, the codec does not load ({e})")
        return self._codec

    @torch.no_grad()
    def _write_sample(self, step: int, run_dir):
        """Continue the first val window's context; write context + continuation as a WAV."""
        from audio import write_wav
        from model.sampler import SamplingParams, generate

        codec = self.codec()
        if codec is None:
            return None
        fpc = self.model.config.frames_per_chunk
        W = max(self.ecfg.n_ctx)
        ctx = [w[:1, : W * f].to(self.device) for w, f in zip(self.windows, fpc, strict=True)]
        params = SamplingParams(seed=self.ecfg.seed)
        if self.ecfg.sample_steps:
            params = SamplingParams(steps=tuple(self.ecfg.sample_steps), seed=self.ecfg.seed)
        # No autocast here: the sampler's KV cache takes the weights' dtype (fp32), and one row
        # of sampling is cheap at full precision.
        new = generate(self.model, ctx, params, self.schedules)
        out_dir = run_dir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        sr = codec.sample_rate
        if not (out_dir / "reference.wav").exists():  # the real continuation, for comparison
            real = [w[:1].to(self.device) for w in self.windows]
            (out_dir / "reference.wav").write_bytes(write_wav(codec.decode(real)[0].cpu().numpy(), sr))
        both = [torch.cat([c, x], dim=1) for c, x in zip(ctx, new, strict=True)]
        path = out_dir / f"step-{step:06d}.wav"
        path.write_bytes(write_wav(codec.decode(both)[0].cpu().numpy(), sr))
        return path
