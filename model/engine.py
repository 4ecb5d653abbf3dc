"""Audio in, audio out: the one object the server calls. Knows nothing of HTTP.

    engine = ContinuationEngine.load("weights/base", "hubertsiuzdak/snac_32khz", device="cuda")
    chunk = engine.continue_audio(audio)              # (196608,) float32: the next 6.144 s
    for chunk in engine.extend(audio, 3): ...         # chained chunks, yielded as they finish

Input audio is mono float32 at the codec's rate. The context is its last whole chunks, up to
`context_chunks` (2 = 12.288 s): an input of 9 s gives one chunk of context (its last 6.144 s),
not 12.288 s with 3.3 s of silence in front, which the model never saw as context (DESIGN §5b).
Input shorter than one chunk is left-padded with zeros to one chunk (a track that starts after
silence looks like that); the server refuses input under SNAC_DIT_MIN_INPUT_SECONDS (1 s). The
context is encoded once; chained chunks slide the window in token space (no re-encode).

Seam-exact chaining: the decoder is non-causal, so the last ~0.45 s of a decoded chunk still
change once the next chunk's tokens follow it. `extend` therefore holds back the last
`holdback_samples` (0.768 s) of each chunk and sends them with the next one, re-decoded with that
chunk's tokens after them; the decoder noise is keyed to absolute positions
(`model.codec.positional_noise`). Each piece is decoded from its own tokens plus 0.768 s of
tokens on either side (the decoder reaches ~0.45 s), not from the whole 12.288 s context: the
same samples for a third of the work. The concatenated output equals a one-pass decode of the
context and all generated tokens (same seed) to fp precision. The pieces `extend` yields are
therefore 6.144 s - 0.768 s (the first), 6.144 s (the middle ones) and 6.144 s + 0.768 s (the
last), n x 6.144 s in all; a single chunk is 6.144 s, exactly `continue_audio`'s.

Editing (`edit_batch`, `loop_batch`; DESIGN §5.5) runs the same sampler with the chunk after
the target as context and given target tokens fixed: an inpaint regenerates a span of the
input at every level; a variation regenerates a chunk's finer levels under its own coarse ones;
a loop generates the chunk that follows the input's end and leads into its start. Results are
spliced into the input with raised-cosine crossfades of `JOIN_SAMPLES` (64 ms) at each join, so
nothing steps at a boundary even where the codec does not reconstruct the input exactly.
Inpaint and loop need a model trained with after-context (`can_edit`); else `EditUnsupported`.

The join: the context is encoded alone, so its last tokens sound as if silence followed; the
decoder is given them re-encoded from the real audio followed by a first decoding of the
continuation (`heard_context`; the model keeps the tokens it was given). See docs/model.md.

Reproducibility: a request's seed fixes its tokens (per-row generators, see model/sampler.py)
and its decoder noise (each request is decoded on its own with a seed derived from its seed), so
the output does not depend on what else is in the batch. seed=None draws a fresh seed.

Checkpoints: a directory with `model.safetensors` and `config.json` = {"dit": DiTConfig fields,
...extra}; the engine also reads the optional extras "diffusion" (DiffusionConfig fields: the
schedules the model was trained with) and "sampling" (SamplingParams fields: defaults).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor

from model.codec import Codec
from model.diffusion import DiffusionConfig
from model.dit import DiT
from model.sampler import SamplingParams, derive_seed, generate, resolve_seed
from model.sampler import extend as extend_tokens
from model.weights import load_dit, read_dit_config

JOIN_SAMPLES = 2048  # 64 ms at 32 kHz: the crossfade at every join of generated and given audio


class EditUnsupported(ValueError):
    """The model was not trained for this edit (no after-context layouts)."""


@dataclass
class EditRequest:
    """Regenerate samples [start, end) of `audio` (mono float at the codec rate): at every level
    (keep = 0, an inpaint) or only the levels finer than the `keep` coarsest (a variation)."""

    audio: Tensor
    start: int
    end: int
    keep: int = 0
    params: SamplingParams | None = None


def crossfade(a: Tensor, b: Tensor) -> Tensor:
    """Raised-cosine crossfade from a into b (same length)."""
    n = a.shape[-1]
    w = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(n, dtype=torch.float32) + 0.5) / n)
    return a * (1 - w) + b * w


# The join between a user's audio and its continuation (include_input): the continuation was
# decoded from the codec's tokens, so its first sample need not meet the input's last one (a
# click) nor its level (a jump). The output crossfades, over JOIN_SAMPLES (64 ms), from the
# input into the codec's own decoding of the input's end, which the continuation follows
# seamlessly (same decode). The engine splices its edits the same way.


def join_input(audio: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """input (T,) + [decoded input end (F,) + continuation] -> one signal: the input unchanged
    up to its last F samples, a raised-cosine crossfade from it into the decoded end there,
    then the continuation. F = min(JOIN_SAMPLES, T)."""
    audio = np.asarray(audio, dtype=np.float32)
    lead = np.asarray(lead, dtype=np.float32)
    f = min(JOIN_SAMPLES, len(audio))
    decoded_end, continuation = lead[JOIN_SAMPLES - f: JOIN_SAMPLES], lead[JOIN_SAMPLES:]
    fade = crossfade(torch.from_numpy(audio[len(audio) - f:]), torch.from_numpy(decoded_end))
    return np.concatenate([audio[: len(audio) - f], fade.numpy(), continuation])


# Padding units (0.384 s at 32 kHz) of tokens decoded on each side of the samples wanted.
# SNAC's decoder reaches ~14,300 samples either way (measured, tests/test_engine.py), less
# than two units: decoding 0.768 s of neighbours gives the same samples as decoding everything.
HOLDBACK_PADS = 2  # after: how much of a chunk's end waits for the next chunk
LEFT_PADS = 2      # before: instead of the whole 12.288 s context (3x less decoding)


class ContinuationEngine:
    def __init__(
        self,
        codec: Codec,
        dit: DiT,
        diffusion: DiffusionConfig | None = None,
        default_params: SamplingParams | None = None,
    ):
        cfg = dit.config
        got = (cfg.n_levels, cfg.codebook_size, cfg.frames_per_chunk, cfg.strides)
        want = (codec.n_levels, codec.codebook_size, codec.frames_per_chunk, codec.strides)
        if got != want:
            raise ValueError(
                "DiT and codec disagree on (levels, codebook, frames per chunk, strides): "
                f"{got} vs {want}"
            )
        if cfg.max_ctx_chunks < 1:
            raise ValueError("a continuation model needs max_ctx_chunks >= 1")
        self.codec, self.dit = codec, dit.eval()
        self.device = next(dit.parameters()).device
        self.dtype = next(dit.parameters()).dtype
        self.sample_rate = codec.sample_rate
        self.chunk_samples = codec.samples_per_chunk
        self.context_chunks = cfg.max_ctx_chunks
        self.context_samples = self.context_chunks * self.chunk_samples
        # How much of a chunk's end waits for the next chunk (module docstring): 24,576 samples
        # at 32 kHz. The decoder's reach depends on its rates, kernels and attention window,
        # which all snac_32khz-geometry codecs share, not on the widths.
        self.holdback_samples = HOLDBACK_PADS * codec.pad_samples
        self.diffusion = diffusion or DiffusionConfig()
        if len(self.diffusion.schedules) != cfg.n_levels:
            raise ValueError("diffusion config and model disagree on the number of levels")
        self.default_params = (default_params or SamplingParams()).validated(cfg.n_levels)

    @classmethod
    def load(
        cls, dit_dir, codec: str | dict | Codec, device="cpu", dtype=None
    ) -> ContinuationEngine:
        """dit_dir: a `save_pretrained` directory; codec: hub id, local dir, config dict or Codec.
        dtype: the DiT's dtype (default bfloat16 on CUDA, float32 otherwise); the codec's own
        precision is the codec's business."""
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        config = read_dit_config(dit_dir)
        dit = load_dit(dit_dir, device=device, dtype=dtype)
        codec = codec if isinstance(codec, Codec) else Codec.load(codec, device=device)
        diffusion = (
            DiffusionConfig.from_dict(config["diffusion"]) if "diffusion" in config else None
        )
        defaults = None
        if "sampling" in config:
            fields = {
                k: tuple(v) if isinstance(v, list) else v for k, v in config["sampling"].items()
            }
            defaults = SamplingParams(**fields)
        return cls(codec, dit, diffusion, defaults)

    # ------------------------------------------------------------------ helpers
    def context_chunks_for(self, n_samples: int) -> int:
        """How many whole chunks of context an input of n_samples gives: up to context_chunks;
        an input shorter than one chunk still gives one (left-padded, see `_window`)."""
        return max(1, min(self.context_chunks, n_samples // self.chunk_samples))

    def _window(self, audio) -> Tensor:
        """The context audio of mono audio (T,): its last whole chunks (up to context_chunks),
        or, if it is shorter than one chunk, all of it left-padded with zeros to one chunk."""
        audio = torch.as_tensor(audio)
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono (T,), got shape {tuple(audio.shape)}")
        if not audio.is_floating_point():
            raise ValueError(f"audio must be float samples, got {audio.dtype}")
        if audio.numel() == 0:
            raise ValueError("audio is empty")
        n = self.context_chunks_for(audio.shape[0]) * self.chunk_samples
        audio = audio[-n:].float().cpu()
        if not torch.isfinite(audio).all():
            raise ValueError("audio contains NaN or infinite samples")
        return torch.nn.functional.pad(audio, (n - audio.shape[0], 0))

    def _params(self, params: SamplingParams | None) -> SamplingParams:
        p = (params or self.default_params).validated(self.dit.config.n_levels)
        return replace(p, seed=resolve_seed(p.seed))  # fixed now: tokens and decoder share it

    def _encode(self, audios: list) -> list[Tensor]:
        """Context tokens of inputs that give the same number of context chunks."""
        windows = [self._window(a) for a in audios]
        if len({w.shape[0] for w in windows}) != 1:
            raise ValueError("_encode needs inputs with the same number of context chunks")
        n_chunks = windows[0].shape[0] // self.chunk_samples
        tokens = self.codec.encode(torch.stack(windows))
        for t, f in zip(tokens, self.dit.config.frames_per_chunk, strict=True):
            if t.shape[1] != n_chunks * f:  # the codec's grid divides a chunk
                raise RuntimeError(f"codec produced {t.shape[1]} frames, expected {n_chunks * f}")
        return [t.to(self.device) for t in tokens]

    def _decode_samples(self, seq: list[Tensor], start: int, end: int, seed: int) -> Tensor:
        """Samples [start, end) of one request's whole token sequence `seq` ((1, n_l) per level:
        the context, then every generated chunk), decoded from the tokens around them only:
        LEFT_PADS padding units before, up to `holdback_samples` after (what exists of them).
        Both exceed the decoder's reach, so the result equals a decode of all of `seq` there."""
        codec, hop = self.codec, self.codec.hop_length
        total, pad = seq[0].shape[1] * codec.strides[0] * hop, codec.pad_samples
        # The window's ends lie on the codec's padding grid (tokens come in whole pad units).
        lo = max(0, (start - LEFT_PADS * pad) // pad * pad)
        hi = min(total, -(-(end + self.holdback_samples) // pad) * pad)
        window = [t[:, lo // (hop * s): hi // (hop * s)] for t, s in zip(seq, codec.strides,
                                                                          strict=True)]
        audio = codec.decode(window, seed=derive_seed(seed, 0, "decode") % 2**31,
                             first_frame=lo // hop)
        if audio.shape[-1] < end - lo:
            raise RuntimeError(f"codec decoded {audio.shape[-1]} samples, expected {hi - lo}")
        return audio[0, start - lo: end - lo].clamp(-1.0, 1.0).float().cpu()

    # ------------------------------------------------------------------ public API
    def continue_batch(
        self, audios: Sequence, params: Sequence[SamplingParams | None] | None = None,
        lead_in: int = 0,
    ) -> list[Tensor]:
        """One continuation (chunk_samples,) per input audio; requests batch together.
        lead_in > 0: each result starts with the last `lead_in` samples of the decoded context,
        (lead_in + chunk_samples,): what a join to the input crossfades over (join_input)."""
        audios = list(audios)
        if not audios:
            return []
        params = [None] * len(audios) if params is None else list(params)
        if len(params) != len(audios):
            raise ValueError(f"{len(params)} SamplingParams for {len(audios)} audios")
        params = [self._params(p) for p in params]
        self._check_lead_in(lead_in)
        # Inputs with as many context chunks run together (encode, sample, decode): one group
        # for a uniform batch; a request's result never depends on the others (per-row seeds).
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(audios):
            groups.setdefault(self.context_chunks_for(torch.as_tensor(a).shape[-1]), []).append(i)
        out: list[Tensor | None] = [None] * len(audios)
        for n, rows in groups.items():
            context = self._encode([audios[i] for i in rows])
            new = generate(self.dit, context, [params[i] for i in rows], self.diffusion.schedules,
                           chunk_index=0)
            start = n * self.chunk_samples
            for b, i in enumerate(rows):
                heard = self.heard_context([c[b : b + 1] for c in context],
                                           self._window(audios[i]),
                                           [t[b : b + 1] for t in new], params[i].seed)
                seq = [torch.cat([c, t[b : b + 1]], dim=1)
                       for c, t in zip(heard, new, strict=True)]
                out[i] = self._decode_samples(seq, start - lead_in, start + self.chunk_samples,
                                              params[i].seed)
        return out

    def continue_audio(self, audio, params: SamplingParams | None = None) -> Tensor:
        return self.continue_batch([audio], [params])[0]

    def round_trip(self, audios: Sequence, start: int, end: int, seed: int = 0) -> list[Tensor]:
        """Samples [start, end) of each mono audio (T,) as the codec renders them: all of the
        audio encoded, that span decoded the way a continuation is (`_decode_samples`). The
        codec's share of any continuation's error: what perfect tokens would sound like."""
        if not 0 <= start < end:
            raise ValueError(f"need 0 <= start < end, got [{start}, {end})")
        audios = [torch.as_tensor(a).float() for a in audios]
        if not audios or len({a.shape for a in audios}) != 1 or audios[0].ndim != 1:
            raise ValueError("round_trip needs one or more mono audios (T,) of the same length")
        if end > audios[0].shape[0]:
            raise ValueError(f"end {end} is past the audio's {audios[0].shape[0]} samples")
        tokens = self.codec.encode(torch.stack(audios))
        return [self._decode_samples([t[b: b + 1] for t in tokens], start, end, seed)
                for b in range(len(audios))]

    def _check_lead_in(self, lead_in: int) -> None:
        if not 0 <= lead_in <= self.chunk_samples:
            raise ValueError(f"lead_in must lie in [0, {self.chunk_samples}], got {lead_in}")

    def extend(
        self, audio, n_chunks: int, params: SamplingParams | None = None, lead_in: int = 0
    ) -> Iterator[Tensor]:
        """Yield `n_chunks` chained pieces as they finish: together n_chunks * chunk_samples,
        seam-exact (module docstring). The first piece is `continue_audio(audio, params)`'s first
        chunk_samples - holdback_samples for the same seed (all of it when n_chunks == 1);
        lead_in > 0 puts the last lead_in decoded context samples in front of it, as in
        `continue_batch`. Bad input raises here, at the call, not at the first `next()`."""
        if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
            raise ValueError(f"n_chunks must be a positive int, got {n_chunks!r}")
        p = self._params(params)
        self._check_lead_in(lead_in)
        context = self._encode([audio])
        return self._chunks(context, n_chunks, p, lead_in, self._window(audio))

    def _chunks(self, context: list[Tensor], n_chunks: int, p: SamplingParams,
                lead_in: int = 0, window: Tensor | None = None) -> Iterator[Tensor]:
        tokens = extend_tokens(self.dit, context, n_chunks, p, self.diffusion.schedules)
        seq = list(context)                 # the request's whole token sequence so far, as decoded
        ctx = context[0].shape[1] // self.codec.frames_per_chunk[0] * self.chunk_samples
        start = ctx - lead_in               # first sample not yet sent
        for k, new in enumerate(tokens):
            if k == 0 and window is not None:   # the model keeps its context; the decoder hears on
                seq = self.heard_context(seq, window, new, p.seed)
            seq = [torch.cat([s, n.to(s.device)], dim=1) for s, n in zip(seq, new, strict=True)]
            end = ctx + (k + 1) * self.chunk_samples
            if k < n_chunks - 1:            # the last holdback_samples wait for the next chunk
                end -= self.holdback_samples
            yield self._decode_samples(seq, start, end, p.seed)
            start = end

    # ------------------------------------------------------------------ the join
    def heard_context(self, context: list[Tensor], window: Tensor, new: list[Tensor],
                      seed: int) -> list[Tensor]:
        """The context tokens to *decode* a continuation with (one row; the model itself keeps
        the tokens it was given). An encode of the context audio alone ends as if silence
        followed, and those last tokens decoded next to the continuation's make the decoder dip
        and burst at the join (measured: RMS 0.03 then 0.3 against the music's 0.1). So the
        context's last `codec.border_samples` are re-encoded from the real audio there followed
        by a first decoding of the continuation; nothing else changes."""
        return self._rehear(context, new, window, context_first=True, seed=seed)

    def heard_head(self, before: list[Tensor], after: list[Tensor], audio: Tensor,
                   seed: int) -> list[Tensor]:
        """The mirror of `heard_context` for a chunk encoded alone that follows generated
        tokens (the loop's first chunk after its bridge): its first `codec.border_samples` are
        re-encoded from a first decoding of what precedes it followed by its real audio."""
        return self._rehear(after, before, audio, context_first=False, seed=seed)

    def _rehear(self, encoded: list[Tensor], other: list[Tensor], audio: Tensor,
                context_first: bool, seed: int) -> list[Tensor]:
        """`encoded` (tokens of `audio` encoded alone) with the border facing `other` (generated
        tokens, after it if context_first else before it) re-encoded from 2 borders of the real
        audio and 1 border of a first decoding of `other` across the join."""
        B, hop = self.codec.border_samples, self.codec.hop_length
        if audio.shape[-1] < 2 * B:
            return encoded
        parts = (encoded, other) if context_first else (other, encoded)
        seq = [torch.cat([a, b.to(a.device)], dim=1) for a, b in zip(*parts, strict=True)]
        join = parts[0][0].shape[1] * self.codec.strides[0] * hop      # sample of the join
        audio = audio.float().cpu()
        if context_first:
            far = self._decode_samples(seq, join, join + B, seed)
            heard = self.codec.encode(torch.cat([audio[-2 * B:], far])[None])
        else:
            far = self._decode_samples(seq, join - B, join, seed)
            heard = self.codec.encode(torch.cat([far, audio[: 2 * B]])[None])
        out = []
        for t, h, s in zip(encoded, heard, self.codec.strides, strict=True):
            b = B // (hop * s)                                         # border tokens, this level
            t = t.clone()
            if context_first:
                t[:, -b:] = h[:, b: 2 * b].to(t.device)
            else:
                t[:, :b] = h[:, b: 2 * b].to(t.device)
            out.append(t)
        return out

    # ------------------------------------------------------------------ editing
    @property
    def can_edit(self) -> bool:
        """Trained with the chunk after the target as context: inpaint and loop work."""
        return self.dit.config.max_after_chunks >= 1

    def edit_plan(self, n_samples: int, start: int, end: int, keep: int = 0) -> tuple[int, int, int]:
        """(t0, n_ctx, n_after) of an edit of [start, end) in an input of n_samples: the target
        chunk [t0, t0 + chunk) on the codec's grid holds the span (centred where it can), with
        the whole chunks before it as context (up to context_chunks) and the chunk after it as
        after-context when the input has it and the model can use it. ValueError says why not."""
        chunk, pad = self.chunk_samples, self.codec.pad_samples
        if not 0 <= keep < self.codec.n_levels:
            raise ValueError(f"keep must lie in [0, {self.codec.n_levels}), got {keep}")
        if not 0 <= start < end <= n_samples:
            raise ValueError(f"the span [{start}, {end}) must lie inside the input's "
                             f"{n_samples} samples and not be empty")
        if n_samples < chunk:
            raise ValueError(f"editing needs at least one whole chunk of input "
                             f"({chunk / self.sample_rate:g} s), got {n_samples / self.sample_rate:.2f} s")
        lo = max(0, -(-(end - chunk) // pad) * pad)             # smallest grid t0 holding the end
        hi = min(start // pad * pad, (n_samples - chunk) // pad * pad)
        if lo > hi:
            raise ValueError(
                f"a span of {(end - start) / self.sample_rate:.3f} s there does not fit one "
                f"{chunk / self.sample_rate:g} s chunk on the {pad / self.sample_rate:g} s grid "
                "inside the input; shorten it")
        want = (start + end - chunk) / 2
        t0 = min(max(round(want / pad) * pad, lo), hi)
        n_ctx = min(self.context_chunks, t0 // chunk)
        n_after = int(self.can_edit and t0 + 2 * chunk <= n_samples)
        return t0, n_ctx, n_after

    def _free_tokens(self, target: list[Tensor], t0: int, start: int, end: int,
                     keep: int) -> list[Tensor]:
        """The target tokens with those overlapping [start, end) set to -1 at levels >= keep."""
        given = []
        for lvl, (t, s) in enumerate(zip(target, self.codec.strides, strict=True)):
            g = t.clone()
            if lvl >= keep:
                span = self.codec.hop_length * s                # samples per token here
                g[:, (start - t0) // span: -(-(end - t0) // span)] = -1
            given.append(g)
        return given

    def edit_batch(self, requests: Sequence[EditRequest]) -> list[Tensor]:
        """One edited copy of each request's audio, same length: the span regenerated, joined
        to the untouched audio by crossfades of JOIN_SAMPLES on either side (inside the input).
        Requests with the same layout batch together; results do not depend on batch mates."""
        requests = list(requests)
        plans = []
        for r in requests:
            audio = torch.as_tensor(r.audio)
            if audio.ndim != 1 or not audio.is_floating_point() or not torch.isfinite(audio).all():
                raise ValueError("audio must be mono (T,) finite float samples")
            if r.keep == 0 and not self.can_edit:
                raise EditUnsupported(
                    "this model was trained without after-context (max_after_chunks = 0), so it "
                    "cannot fill in a span between given audio; variations (keep >= 1) work")
            plans.append((audio.float().cpu(), *self.edit_plan(audio.shape[0], r.start, r.end,
                                                               r.keep)))
        params = [self._params(r.params) for r in requests]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, _, n_ctx, n_after) in enumerate(plans):
            groups.setdefault((n_ctx, n_after), []).append(i)
        out: list[Tensor | None] = [None] * len(requests)
        chunk, fpc = self.chunk_samples, self.codec.frames_per_chunk
        for (n_ctx, n_after), rows in groups.items():
            w0 = [plans[i][1] - n_ctx * chunk for i in rows]
            span = (n_ctx + 1 + n_after) * chunk
            tokens = self.codec.encode(torch.stack([plans[i][0][a:a + span]
                                                    for i, a in zip(rows, w0, strict=True)]))
            tokens = [t.to(self.device) for t in tokens]
            ctx = [t[:, :n_ctx * f] for t, f in zip(tokens, fpc, strict=True)]
            target = [t[:, n_ctx * f:(n_ctx + 1) * f] for t, f in zip(tokens, fpc, strict=True)]
            after = [t[:, (n_ctx + 1) * f:] for t, f in zip(tokens, fpc, strict=True)] \
                if n_after else None
            given = [torch.cat(g) for g in zip(*[
                self._free_tokens([t[b:b + 1] for t in target], plans[i][1], requests[i].start,
                                  requests[i].end, requests[i].keep)
                for b, i in enumerate(rows)], strict=True)]
            new = generate(self.dit, ctx, [params[i] for i in rows], self.diffusion.schedules,
                           after=after, given=given)
            for b, i in enumerate(rows):
                parts = [ctx, new] + ([after] if after else [])
                seq = [torch.cat([p[lvl][b:b + 1] for p in parts], 1)
                       for lvl in range(self.codec.n_levels)]
                out[i] = self._splice(plans[i][0], seq, w0[b], requests[i].start,
                                      requests[i].end, params[i].seed)
        return out

    def _splice(self, audio: Tensor, seq: list[Tensor], w0: int, start: int, end: int,
                seed: int) -> Tensor:
        """audio with [start, end) replaced by the decoding of seq (whose first sample is at
        w0), crossfaded over JOIN_SAMPLES before start and after end where the input has them."""
        n, seq_end = audio.shape[0], w0 + seq[0].shape[1] * self.codec.strides[0] * \
            self.codec.hop_length
        a, b = max(w0, start - JOIN_SAMPLES), min(seq_end, n, end + JOIN_SAMPLES)
        decoded = self._decode_samples(seq, a - w0, b - w0, seed)
        result = audio.clone()
        result[a:b] = decoded
        if start - a:                                  # fade in: input -> decoded
            result[a:start] = crossfade(audio[a:start], decoded[: start - a])
        if b - end:                                    # fade out: decoded -> input
            result[end:b] = crossfade(decoded[end - a:], audio[end:b])
        return result

    def loop_batch(self, audios: Sequence, params: Sequence[SamplingParams | None] | None = None
                   ) -> list[Tensor]:
        """Per input, a loopable track (T + chunk_samples,): the input, then a generated chunk
        that continues its end and leads back into its start (its first chunk is the
        after-context). Played on repeat, every join is a crossfade into what the decoder made
        there: from the input's end into the bridge, and from the bridge into the input's start."""
        if not self.can_edit:
            raise EditUnsupported(
                "this model was trained without after-context (max_after_chunks = 0), so it "
                "cannot generate a chunk that leads back into the clip's start")
        audios = [torch.as_tensor(a).float().cpu() for a in audios]
        params = [self._params(p) for p in (params or [None] * len(audios))]
        chunk, J = self.chunk_samples, JOIN_SAMPLES
        for a in audios:
            if a.ndim != 1 or not torch.isfinite(a).all():
                raise ValueError("audio must be mono (T,) finite float samples")
            if a.shape[0] < chunk:
                raise ValueError(f"a loop needs at least one whole chunk of input "
                                 f"({chunk / self.sample_rate:g} s), got "
                                 f"{a.shape[0] / self.sample_rate:.2f} s")
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(audios):
            groups.setdefault(self.context_chunks_for(a.shape[0]), []).append(i)
        out: list[Tensor | None] = [None] * len(audios)
        for n_ctx, rows in groups.items():
            ctx = self._encode([audios[i] for i in rows])
            after = [t.to(self.device) for t in self.codec.encode(
                torch.stack([audios[i][:chunk] for i in rows]))]
            new = generate(self.dit, ctx, [params[i] for i in rows], self.diffusion.schedules,
                           after=after)
            for b, i in enumerate(rows):
                # Decoded, both joins hear the other side: the input's end the bridge, the
                # clip's first chunk (the after-context, encoded alone) the bridge's end.
                bridge = [x[b:b + 1] for x in new]
                ctx_b = self.heard_context([c[b:b + 1] for c in ctx],
                                           self._window(audios[i]), bridge, params[i].seed)
                before = [torch.cat([c, x], 1) for c, x in zip(ctx_b, bridge, strict=True)]
                after_b = self.heard_head(before, [a[b:b + 1] for a in after],
                                          audios[i][:chunk], params[i].seed)
                seq = [torch.cat([c, a], 1) for c, a in zip(before, after_b, strict=True)]
                s0 = n_ctx * chunk                       # the bridge's first sample in seq
                pieces = self._decode_samples(seq, s0 - J, s0 + chunk + J, params[i].seed)
                x = audios[i].clone()
                x[-J:] = crossfade(x[-J:], pieces[:J])               # input end -> bridge
                x[:J] = crossfade(pieces[-J:], x[:J])                # bridge -> input start
                out[i] = torch.cat([x, pieces[J:J + chunk]])
        return out

    def info(self) -> dict:
        """JSON-able description: model, codec, geometry, sampling defaults."""
        return dict(
            model=dict(
                config=asdict(self.dit.config),
                params=self.dit.num_params(),
                device=str(self.device),
                dtype=str(self.dtype).removeprefix("torch."),
            ),
            codec=dict(config=self.codec.config, fingerprint=self.codec.fingerprint),
            geometry=dict(
                sample_rate=self.sample_rate,
                chunk_samples=self.chunk_samples,
                chunk_seconds=self.chunk_samples / self.sample_rate,
                context_samples=self.context_samples,
                context_seconds=self.context_samples / self.sample_rate,
                n_levels=self.codec.n_levels,
                frames_per_chunk=list(self.codec.frames_per_chunk),
                strides=list(self.codec.strides),
                codebook_size=self.codec.codebook_size,
            ),
            diffusion=asdict(self.diffusion),
            defaults=asdict(self.default_params),
            editing=dict(inpaint=self.can_edit, loop=self.can_edit, vary=True),
        )
