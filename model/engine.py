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

Editing (inpaint, vary, loop) lives in `model/editing.py`, mixed into the engine.

The join: the context is encoded alone, so its last tokens sound as if silence followed; the
decoder is given them re-encoded from the real audio followed by a first decoding of the
continuation (`heard_context`; the model keeps the tokens it was given). See docs/model.md.

Reproducibility: a request's seed fixes its tokens (per-row generators, see model/sampler.py)
and its decoder noise (keyed to a seed derived from its own, per row, as if it were decoded
alone: `model.codec.positional_noise`), so the output does not depend on what else is in the
batch, although a batch's join and output decodes run as one codec call each (tested bit for
bit on CPU). seed=None draws a fresh seed. Decoder noise is drawn on the codec's device, so a
seed sounds the same on every run of one device type, not across CPU and GPU.

A CUDA error other than out-of-memory leaves the process's CUDA context unusable: the engine
then reports `healthy = False` and refuses further work with `DeviceFault`, so a server's health
check can fail and the process be restarted. `warmup()` pays first-call costs on the shapes
serving runs (the full two-chunk context first).

Style (issue 37): a model trained with style actions (`DiTConfig.style_actions` > 0) takes a
style per request, `style_vector(reference=audio)` (the feel of another clip: the mean style of
its last whole chunks) or `style_vector(action=k)`; continue_batch, extend and edit requests
carry it, and SamplingParams.style_scale / style_guidance guide on it. A model without the path
raises `StyleUnsupported` (a ValueError: bad input, not a fault).

Checkpoints: a directory with `model.safetensors` and `config.json` = {"dit": DiTConfig fields,
...extra}; the engine also reads the optional extras "diffusion" (DiffusionConfig fields: the
schedules the model was trained with) and "sampling" (SamplingParams fields: defaults).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from model.codec import Codec
from model.diffusion import DiffusionConfig
from model.dit import DiT
from model.editing import (  # noqa: F401 - re-exported: the server's names for them
    JOIN_SAMPLES,
    EditingMixin,
    EditRequest,
    EditUnsupported,
    crossfade,
    join_input,
)
from model.fast import describe as describe_fast_path
from model.sampler import SamplingParams, derive_seed, generate, resolve_seed
from model.sampler import extend as extend_tokens
from model.style import example_file, read_action_notes
from model.weights import load_dit, read_dit_config

# Padding units (0.384 s at 32 kHz) of tokens decoded on each side of the samples wanted.
# SNAC's decoder reaches ~14,300 samples either way (measured, tests/test_engine.py), less
# than two units: decoding 0.768 s of neighbours gives the same samples as decoding everything.
HOLDBACK_PADS = 2  # after: how much of a chunk's end waits for the next chunk
LEFT_PADS = 2      # before: instead of the whole 12.288 s context (3x less decoding); a codec
#                    whose decoder reaches further says so (Codec.decode_left_pads)


class StyleUnsupported(ValueError):
    """A style was asked of a model trained without style actions (style_actions = 0)."""


@dataclass(frozen=True)
class StyleRequest:
    """A style to resolve where the engine runs (a server's engine thread): the style of a
    reference clip (mono float audio at the codec's rate) or of action k. Wherever the engine
    takes a style it takes one of these, a `style_vector`, or None."""

    reference: Tensor | None = None
    action: int | None = None


class DeviceFault(RuntimeError):
    """The engine's device failed earlier (a CUDA error other than out-of-memory: an illegal
    access, a device-side assert, a lost GPU). The CUDA context is unusable from then on, so
    every later call fails fast with this, and `healthy` is False: a server's health check should
    fail so the process is restarted."""


def is_device_fault(e: BaseException) -> bool:
    """A CUDA error that poisons the process, as opposed to one a later call can survive (out of
    memory frees up; bad input is a ValueError)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in (
        "CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert",
        "Triton Error [CUDA]"))


def _guarded(method):
    """Engine entry point: refuses work after a device fault and records one when it happens."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        self._check_device()
        try:
            out = method(self, *args, **kwargs)
        except BaseException as e:
            self._note_fault(e)
            raise
        return self._guard_iter(out) if isinstance(out, Iterator) else out
    return call


class ContinuationEngine(EditingMixin):
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
        self.left_pads = max(LEFT_PADS, codec.decode_left_pads)
        self.diffusion = diffusion or DiffusionConfig()
        if len(self.diffusion.schedules) != cfg.n_levels:
            raise ValueError("diffusion config and model disagree on the number of levels")
        self.default_params = (default_params or SamplingParams()).validated(cfg.n_levels)
        self.fault: BaseException | None = None  # the device error that ended this engine
        # what each style action means (read_action_notes; `load` reads them beside the weights)
        self.action_notes, self.action_notes_problem, self.actions_dir = None, None, None
        # Rows per codec call (encode or decode). On a GPU a batch's rows go in one call; on a
        # CPU one at a time, which measured 2-2.5x faster than 8 together with the demo codec on
        # one thread (docs/benchmarks.md): the batched activations outgrow the caches. The
        # samples are the same either way (per-row noise seeds, tested).
        self.codec_rows: int | None = None if codec.device.type == "cuda" else 1

    edit_batch = _guarded(EditingMixin.edit_batch)
    loop_batch = _guarded(EditingMixin.loop_batch)

    # ------------------------------------------------------------------ device health
    @property
    def healthy(self) -> bool:
        """False once a device fault happened (see `DeviceFault`)."""
        return self.fault is None

    def _check_device(self) -> None:
        if self.fault is not None:
            raise DeviceFault(f"the engine's device failed earlier and cannot recover: "
                              f"{self.fault}") from self.fault

    def _note_fault(self, e: BaseException) -> None:
        if self.fault is None and is_device_fault(e):
            self.fault = e

    def _guard_iter(self, it: Iterator) -> Iterator:
        try:
            for item in it:
                yield item
                self._check_device()
        except BaseException as e:
            self._note_fault(e)
            raise

    def warmup(self, params: SamplingParams | None = None, batch_sizes: Sequence[int] = (1,),
               lead_in: int = JOIN_SAMPLES) -> None:
        """Pay first-call costs (allocator, kernel compiles and autotuning) before a user does,
        on the shapes serving runs: a full context first (`context_chunks` whole chunks; the
        two-chunk layouts run other kernel shapes than one chunk's), then each shorter one, at
        each batch size, with the lead-in /continue asks for. One sampling step per level."""
        n = self.dit.config.n_levels
        p = replace(params or self.default_params, steps=(1,) * n, seed=0)
        for chunks in range(self.context_chunks, 0, -1):
            for b in batch_sizes:
                audio = torch.zeros(chunks * self.chunk_samples)
                self.continue_batch([audio] * b, [p] * b, lead_in=lead_in)

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
        engine = cls(codec, dit, diffusion, defaults)
        engine.read_action_notes(dit_dir)
        return engine

    # ------------------------------------------------------------------ style
    def read_action_notes(self, dit_dir) -> None:
        """What each style action means (model/style.py, ACTIONS_FILE beside the weights, written
        by `python -m training.dit.actions`), for /info and the actions' examples."""
        self.action_notes, self.action_notes_problem, self.actions_dir = None, None, None
        if self.style_actions:
            self.action_notes, self.action_notes_problem = read_action_notes(
                dit_dir, self.style_actions)
            self.actions_dir = dit_dir

    def action_example(self, action: int):
        """The example audio file of action k (an OGG path), or None if there is none."""
        if not self.action_notes or not 0 <= action < self.style_actions:
            return None
        path = example_file(self.actions_dir, action)
        return path if path.is_file() else None

    @property
    def style_actions(self) -> int:
        """K, the number of style actions; 0 = this model takes no style."""
        return self.dit.config.style_actions

    @_guarded
    @torch.no_grad()
    def style_vector(self, reference=None, action: int | None = None) -> Tensor:
        """(d_model,) style of a reference clip (mono float audio at the codec's rate: the mean
        style of its last whole chunks, as the context is read) or of action k."""
        if not self.style_actions:
            raise StyleUnsupported("this model has no style actions (it was trained without "
                                   "them): continue without a style")
        if (reference is None) == (action is None):
            raise ValueError("give either a reference clip or an action, not both or neither")
        if action is not None:
            if isinstance(action, bool) or not isinstance(action, int) or not (
                    0 <= action < self.style_actions):
                raise ValueError(f"action must be an int in [0, {self.style_actions}), "
                                 f"got {action!r}")
            return self.dit.style_action(torch.tensor([action], device=self.device))[0].float()
        tokens = self._encode([reference])  # [(1, n * F_l)]
        fpc = self.dit.config.frames_per_chunk
        n = tokens[0].shape[1] // fpc[0]
        chunks = [t.reshape(n, f) for t, f in zip(tokens, fpc, strict=True)]  # (n, F_l) each
        return self.dit.style_of(chunks).mean(0).float()

    def _styles(self, styles, n: int) -> Tensor | None:
        """(n, d) style rows (zeros where None) of per-request styles, or None if none has one."""
        styles = [None] * n if styles is None else list(styles)
        if len(styles) != n:
            raise ValueError(f"{len(styles)} styles for {n} requests")
        if all(s is None for s in styles):
            return None
        if not self.style_actions:
            raise StyleUnsupported("this model has no style actions")
        d = self.dit.config.d_model
        rows = [torch.zeros(d) if s is None
                else self.style_vector(s.reference, s.action).cpu() if isinstance(s, StyleRequest)
                else torch.as_tensor(s).float().cpu() for s in styles]
        if any(r.shape != (d,) for r in rows):
            raise ValueError(f"a style is a ({d},) vector (style_vector)")
        return torch.stack(rows).to(self.device)

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
        tokens = self._codec_encode(torch.stack(windows))
        for t, f in zip(tokens, self.dit.config.frames_per_chunk, strict=True):
            if t.shape[1] != n_chunks * f:  # the codec's grid divides a chunk
                raise RuntimeError(f"codec produced {t.shape[1]} frames, expected {n_chunks * f}")
        return [t.to(self.device) for t in tokens]

    def _decode_samples(self, seq: list[Tensor], start: int, end: int, seed: int) -> Tensor:
        """Samples [start, end) of one request's whole token sequence `seq` ((1, n_l) per level:
        the context, then every generated chunk): `_decode_rows` of one row."""
        return self._decode_rows(seq, start, end, [seed])[0]

    def _decode_rows(self, seq: list[Tensor], start: int, end: int,
                     seeds: Sequence[int]) -> Tensor:
        """(B, end - start): samples [start, end) of B requests' token sequences `seq` ((B, n_l)
        per level, alike in length), decoded together from the tokens around them only:
        `left_pads` padding units before, up to `holdback_samples` after (what exists of them).
        Both exceed the decoder's reach, so the result equals a decode of all of `seq` there.
        Each row's decoder noise is keyed to its own seed as if it were decoded alone
        (`model.codec.positional_noise`), so batching changes no sample."""
        codec, hop = self.codec, self.codec.hop_length
        total, pad = seq[0].shape[1] * codec.strides[0] * hop, codec.pad_samples
        # The window's ends lie on the codec's padding grid (tokens come in whole pad units).
        lo = max(0, (start - self.left_pads * pad) // pad * pad)
        hi = min(total, -(-(end + self.holdback_samples) // pad) * pad)
        window = [t[:, lo // (hop * s): hi // (hop * s)] for t, s in zip(seq, codec.strides,
                                                                          strict=True)]
        seeds = [derive_seed(s, 0, "decode") % 2**31 for s in seeds]
        step = self.codec_rows or len(seeds)
        audio = torch.cat([codec.decode([t[i: i + step] for t in window], seed=seeds[i: i + step],
                                        first_frame=lo // hop)
                           for i in range(0, len(seeds), step)])
        if audio.shape[-1] < end - lo:
            raise RuntimeError(f"codec decoded {audio.shape[-1]} samples, expected {hi - lo}")
        return audio[:, start - lo: end - lo].clamp(-1.0, 1.0).float().cpu()

    def _codec_encode(self, audio: Tensor) -> list[Tensor]:
        """codec.encode of (B, T) audio, `codec_rows` rows per call."""
        step = self.codec_rows or audio.shape[0]
        parts = [self.codec.encode(audio[i: i + step]) for i in range(0, audio.shape[0], step)]
        return [torch.cat(level) for level in zip(*parts, strict=True)]

    # ------------------------------------------------------------------ public API
    @_guarded
    def continue_batch(
        self, audios: Sequence, params: Sequence[SamplingParams | None] | None = None,
        lead_in: int = 0, styles: Sequence[Tensor | None] | None = None,
    ) -> list[Tensor]:
        """One continuation (chunk_samples,) per input audio; requests batch together.
        lead_in > 0: each result starts with the last `lead_in` samples of the decoded context,
        (lead_in + chunk_samples,): what a join to the input crossfades over (join_input).
        styles: per request a `style_vector` or None (models with style actions only)."""
        audios = list(audios)
        if not audios:
            return []
        params = [None] * len(audios) if params is None else list(params)
        if len(params) != len(audios):
            raise ValueError(f"{len(params)} SamplingParams for {len(audios)} audios")
        params = [self._params(p) for p in params]
        style = self._styles(styles, len(audios))
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
                           chunk_index=0, style=None if style is None else style[rows])
            start = n * self.chunk_samples
            # The join and the output decode run for the whole group at once, each row with
            # its own seed: the same samples as one request at a time, in one codec call each.
            seeds = [params[i].seed for i in rows]
            windows = torch.stack([self._window(audios[i]) for i in rows])
            heard = self.heard_context(context, windows, new, seeds)
            seq = [torch.cat([c, t], dim=1) for c, t in zip(heard, new, strict=True)]
            decoded = self._decode_rows(seq, start - lead_in, start + self.chunk_samples, seeds)
            for b, i in enumerate(rows):
                out[i] = decoded[b]
        return out

    def continue_audio(self, audio, params: SamplingParams | None = None,
                       style: Tensor | None = None) -> Tensor:
        return self.continue_batch([audio], [params], styles=[style])[0]

    @_guarded
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
        tokens = self._codec_encode(torch.stack(audios))
        return [self._decode_samples([t[b: b + 1] for t in tokens], start, end, seed)
                for b in range(len(audios))]

    def _check_lead_in(self, lead_in: int) -> None:
        if not 0 <= lead_in <= self.chunk_samples:
            raise ValueError(f"lead_in must lie in [0, {self.chunk_samples}], got {lead_in}")

    @_guarded
    def extend(
        self, audio, n_chunks: int, params: SamplingParams | None = None, lead_in: int = 0,
        style: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Yield `n_chunks` chained pieces as they finish: together n_chunks * chunk_samples,
        seam-exact (module docstring). The first piece is `continue_audio(audio, params)`'s first
        chunk_samples - holdback_samples for the same seed (all of it when n_chunks == 1);
        lead_in > 0 puts the last lead_in decoded context samples in front of it, as in
        `continue_batch`. Bad input raises here, at the call, not at the first `next()`."""
        if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
            raise ValueError(f"n_chunks must be a positive int, got {n_chunks!r}")
        p = self._params(params)
        rows = self._styles([style], 1)
        self._check_lead_in(lead_in)
        context = self._encode([audio])
        return self._chunks(context, n_chunks, p, lead_in, self._window(audio), rows)

    def _chunks(self, context: list[Tensor], n_chunks: int, p: SamplingParams,
                lead_in: int = 0, window: Tensor | None = None,
                style: Tensor | None = None) -> Iterator[Tensor]:
        tokens = extend_tokens(self.dit, context, n_chunks, p, self.diffusion.schedules,
                               style=style)
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
                      seed: int | Sequence[int]) -> list[Tensor]:
        """The context tokens to *decode* a continuation with (the model itself keeps the tokens
        it was given): one row with `window` (T,) and a seed, or B rows with windows (B, T) and
        one seed each. An encode of the context audio alone ends as if silence
        followed, and those last tokens decoded next to the continuation's make the decoder dip
        and burst at the join (measured: RMS 0.03 then 0.3 against the music's 0.1). So the
        context's last `codec.border_samples` are re-encoded from the real audio there followed
        by a first decoding of the continuation; nothing else changes."""
        return self._rehear(context, new, window, context_first=True, seed=seed)

    def _rehear(self, encoded: list[Tensor], other: list[Tensor], audio: Tensor,
                context_first: bool, seed: int | Sequence[int]) -> list[Tensor]:
        """`encoded` (tokens of `audio` encoded alone) with the border facing `other` (generated
        tokens, after it if context_first else before it) re-encoded from 2 borders of the real
        audio and 1 border of a first decoding of `other` across the join. Rows: audio (T,)
        with one int seed, or (B, T) with B seeds, decoded and re-encoded together."""
        B, hop = self.codec.border_samples, self.codec.hop_length
        if audio.shape[-1] < 2 * B:
            return encoded
        seeds = [seed] if isinstance(seed, int) else list(seed)
        audio = audio.float().cpu().reshape(len(seeds), -1)            # (rows, T)
        parts = (encoded, other) if context_first else (other, encoded)
        seq = [torch.cat([a, b.to(a.device)], dim=1) for a, b in zip(*parts, strict=True)]
        join = parts[0][0].shape[1] * self.codec.strides[0] * hop      # sample of the join
        if context_first:
            far = self._decode_rows(seq, join, join + B, seeds)
            heard = self._codec_encode(torch.cat([audio[:, -2 * B:], far], dim=1))
        else:
            far = self._decode_rows(seq, join - B, join, seeds)
            heard = self._codec_encode(torch.cat([far, audio[:, : 2 * B]], dim=1))
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
            style=self.style_info(),
            fast_path=describe_fast_path(self),
        )

    def style_info(self) -> dict:
        """What the model offers as style actions: each with its description (measured
        properties of the chunks that select it; null until `python -m training.dit.actions`
        has measured them), the share of chunks that select it, their medians, and whether an
        example chunk is there to hear."""
        cfg = self.dit.config
        if not cfg.style_actions:
            return dict(available=False, actions=[],
                        detail="this model has no style actions (trained without them)")
        notes = self.action_notes or [{} for _ in range(cfg.style_actions)]
        actions = [dict(action=k, description=n.get("description"), share=n.get("share"),
                        medians=n.get("medians"),
                        example=self.action_example(k) is not None if n else False)
                   for k, n in enumerate(notes)]
        info = dict(available=True, topk=cfg.style_topk, actions=actions)
        if self.action_notes_problem:
            info["detail"] = self.action_notes_problem
        return info
