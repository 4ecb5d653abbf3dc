"""Editing and joins: the engine's inpaint / variation / loop and the crossfades at every join.

Editing (`edit_batch`, `loop_batch`; DESIGN §5.5) runs the same sampler with the chunk after
the target as context and given target tokens fixed: an inpaint regenerates a span of the
input at every level; a variation regenerates a chunk's finer levels under its own coarse ones;
a loop generates the chunk that follows the input's end and leads into its start. Results are
spliced into the input with raised-cosine crossfades of `JOIN_SAMPLES` (64 ms) at each join, so
nothing steps at a boundary even where the codec does not reconstruct the input exactly.
Inpaint and loop need a model trained with after-context (`can_edit`); else `EditUnsupported`.

`EditingMixin` is mixed into `model.engine.ContinuationEngine` (whose helpers it calls: `_params`,
`_styles`, `_encode`, `_codec_encode`, `_window`, `_decode_samples`, `heard_context`, `_rehear`); the server
imports these names from `model.engine`, which re-exports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.sampler import SamplingParams, generate

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
    # Sample spans inside [start, end) whose tokens stay as given at every level (the windows
    # around the beats of a beat-driven variation); only the tokens between them are new.
    hold: tuple[tuple[int, int], ...] = ()
    # A style vector (engine.style_vector) for the regenerated tokens; None = no style.
    style: Tensor | None = None


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


class EditingMixin:
    """Inpaint, variation and loop on top of the continuation engine's encode/sample/decode."""

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
                     keep: int, hold: Sequence[tuple[int, int]] = ()) -> list[Tensor]:
        """The target tokens with those overlapping [start, end) set to -1 at levels >= keep,
        except those overlapping a `hold` span."""
        given = []
        for lvl, (t, s) in enumerate(zip(target, self.codec.strides, strict=True)):
            g = t.clone()
            if lvl >= keep:
                span = self.codec.hop_length * s                # samples per token here
                g[:, (start - t0) // span: -(-(end - t0) // span)] = -1
                for a, b in hold:
                    lo, hi = max(0, (a - t0) // span), -(-(b - t0) // span)
                    g[:, lo:hi] = t[:, lo:hi]
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
            if r.keep == 0 and not r.hold and not self.can_edit:
                raise EditUnsupported(
                    "this model was trained without after-context (max_after_chunks = 0), so it "
                    "cannot fill in a span between given audio; variations (keep >= 1) work")
            plans.append((audio.float().cpu(), *self.edit_plan(audio.shape[0], r.start, r.end,
                                                               r.keep)))
        params = [self._params(r.params) for r in requests]
        style = self._styles([r.style for r in requests], len(requests))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, _, n_ctx, n_after) in enumerate(plans):
            groups.setdefault((n_ctx, n_after), []).append(i)
        out: list[Tensor | None] = [None] * len(requests)
        chunk, fpc = self.chunk_samples, self.codec.frames_per_chunk
        for (n_ctx, n_after), rows in groups.items():
            w0 = [plans[i][1] - n_ctx * chunk for i in rows]
            span = (n_ctx + 1 + n_after) * chunk
            tokens = self._codec_encode(torch.stack([plans[i][0][a:a + span]
                                                    for i, a in zip(rows, w0, strict=True)]))
            tokens = [t.to(self.device) for t in tokens]
            ctx = [t[:, :n_ctx * f] for t, f in zip(tokens, fpc, strict=True)]
            target = [t[:, n_ctx * f:(n_ctx + 1) * f] for t, f in zip(tokens, fpc, strict=True)]
            after = [t[:, (n_ctx + 1) * f:] for t, f in zip(tokens, fpc, strict=True)] \
                if n_after else None
            given = [torch.cat(g) for g in zip(*[
                self._free_tokens([t[b:b + 1] for t in target], plans[i][1], requests[i].start,
                                  requests[i].end, requests[i].keep, requests[i].hold)
                for b, i in enumerate(rows)], strict=True)]
            new = generate(self.dit, ctx, [params[i] for i in rows], self.diffusion.schedules,
                           after=after, given=given,
                           style=None if style is None else style[rows])
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
            after = [t.to(self.device) for t in self._codec_encode(
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

    def heard_head(self, before: list[Tensor], after: list[Tensor], audio: Tensor,
                   seed: int) -> list[Tensor]:
        """The mirror of `heard_context` for a chunk encoded alone that follows generated
        tokens (the loop's first chunk after its bridge): its first `codec.border_samples` are
        re-encoded from a first decoding of what precedes it followed by its real audio."""
        return self._rehear(after, before, audio, context_first=False, seed=seed)
