"""Codec training config: one typed dataclass and the architecture presets; TOML files and
`--key value` overrides go through the loader both trainers share (training/run/config.py).

    python training/train_codec.py --config training/configs/codec_small.toml --steps 1000 \
        --loss_weights.mel 10 --model.decoder_dim 256

Values on the command line are parsed as TOML literals (`--gan false`, `--betas [0.8, 0.99]`);
anything that is not a TOML literal is taken as a string (`--train data/corpus`). Dotted keys
reach into the dict fields (`model`, `loss_weights`). Unknown keys and wrong types are errors,
not silently ignored, so a typo cannot train the wrong model for a week.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model.codec import DEBUG_CODEC_CONFIG, SNAC_32KHZ_CONFIG
from training.run import config as run_config
from training.run.config import ConfigError

# SNAC constructor kwargs. All three share the 32 kHz rates and strides, so tokens from any of
# them have the project's chunk geometry (DESIGN §1); only the widths differ.
MODEL_PRESETS: dict[str, dict] = {
    # The released hubertsiuzdak/snac_32khz architecture: 54.5 M params.
    "snac32k": dict(SNAC_32KHZ_CONFIG),
    # The shipped CPU demo codec (weights/demo/codec): 2.26 M params (2.16 M with 1024 codes),
    # decodes a chunk with its context in about 2 s on 2 cores. See docs/codec-training.md §5.
    "demo": dict(SNAC_32KHZ_CONFIG, encoder_dim=16, decoder_dim=256),
    # CPU-servable: 8.55 M params (encoder 4.02 M, quantiser 0.17 M, decoder 4.36 M).
    "small": dict(SNAC_32KHZ_CONFIG, encoder_dim=32, decoder_dim=512),
    # Tests: 0.47 M params, a training step on 0.4 s of audio takes well under a second on CPU.
    "debug": dict(DEBUG_CODEC_CONFIG),
    # The pitch codec (training/configs/codec_pitch.toml): a wider encoder than the demo's, and
    # SNAC's decoder only as a tiny placeholder (decoder_dim 32, no noise) because `decoder`
    # replaces it with the inverse-STFT decoder of model/vocoder.py.
    "pitch": dict(SNAC_32KHZ_CONFIG, encoder_dim=24, decoder_dim=32, noise=False,
                  codebook_size=1024),
}


@dataclass
class CodecTrainConfig:
    # ---- model
    preset: str = "small"             # MODEL_PRESETS entry, used when `init` is empty
    model: dict = field(default_factory=dict)  # overrides on the preset's SNAC kwargs
    init: str = ""                    # fine-tune from: hub id, export dir or training checkpoint
    freeze_encoder: bool = False      # decoder-only fine-tune: encoder + quantiser frozen, so the
    #                                   codes (and any tokenised dataset) stay valid
    # A decoder that replaces SNAC's (model/vocoder.py), e.g. {kind = "istft", dim = 384,
    # layers = 8, n_fft = 1536}; its latent_dim and hop follow from the SNAC config. Empty =
    # SNAC's own decoder. A run from `init` keeps the decoder it was saved with (like `model`).
    decoder: dict = field(default_factory=dict)
    # An encoder that replaces SNAC's (model/spectral_encoder.py): a fixed log-magnitude STFT and
    # ConvNeXt blocks at the hop rate, e.g. {kind = "stft", layers = 4}; latent_dim, hop and
    # sample_rate follow from the SNAC config. Empty = SNAC's waveform encoder. A run from `init`
    # keeps the encoder it was saved with.
    encoder: dict = field(default_factory=dict)
    # Griffin-Lim iterations when rendering training batches (0 = the decoder's own, which
    # validation and inference use): the waveform terms only need a plausible phase, and 32
    # iterations were a third of a step (0.38 of 1.1 s, batch 8 x 1.152 s, 2 threads)
    train_gl_iters: int = 0
    # Pitch distillation (training/codec/pitch_head.py): a head predicts each coarse frame's
    # chroma from levels < chroma_levels; its weight is loss_weights.chroma (0 = no head).
    chroma_levels: int = 2
    # > 0: the chroma head predicts the bass register's chroma (30 Hz to this, from 3.9 Hz bins)
    # apart from the rest's, so levels A and B must carry bass pitch too (pitch_head.py)
    chroma_split_hz: float = 0.0
    # The top of loss_weights.frequency_bass's bins (0 = pitch.BASS_TOP_HZ, 254 Hz). The decoder's
    # 20.8 Hz bins are wider than a semitone up to ~350 Hz and wider than half of one up to ~700
    # Hz, so the middle register's note is also the frequency the head plays.
    frequency_bass_hz: float = 0.0
    # Encoder warm-up: for the first N steps only the encoder and its spectrum head train
    # (loss_weights.encoder_spectrum; no quantiser, no decoder; the encoder is most of a step's
    # time anyway: 2.35 s against ~2.9 s a whole Griffin-Lim step on 2 threads), then
    # the codebooks are initialised from the warmed-up encoder and the codec trains whole. A
    # fresh encoder learns the fine spectrum from this head alone faster than from the whole
    # codec's gradient (docs/codec-training.md §8).
    encoder_warmup_steps: int = 0
    # ---- data
    train: list[str] = field(default_factory=lambda: ["data/corpus"])  # dirs, files, manifest.jsonl
    val: list[str] = field(default_factory=list)  # held-out dirs/files; empty = hold out from train
    val_files: int = 8                # files held out of `train` when `val` is empty
    val_seconds: float = 6.144        # one segment per val file, from its middle (one chunk)
    # Segment-length curriculum, as [from_step, seconds, batch_size] rows (the fine-tuning
    # recipe's 1 s -> 4 s, batch shrinking to keep memory flat). Seconds are rounded up to the
    # codec's padding grid (0.384 s at 32 kHz) so no step trains on zero padding.
    curriculum: list[list[int | float]] = field(default_factory=lambda: [
        [0, 1.0, 32], [100_000, 2.0, 16], [200_000, 3.0, 12], [300_000, 4.0, 8]])
    min_rms: float = 1e-3             # re-draw near-silent segments (up to 8 times)
    num_workers: int = 2
    # ---- keeping the codebooks alive (training/codec/vq.py). Without these the recipe
    #      collapses to one code per level on real music from random init (measured).
    centre_vq_input: bool = True      # subtract each level's batch mean from its quantiser input;
    #                                   validation and export fold in a calibrated mean instead
    centre_calibration_batches: int = 8  # training batches (fixed) the folded mean comes from
    codebook_init: str = "data"       # data = every code := an encoder output of the first batch
    #                                   (from-scratch runs only); random = snac's own init
    dead_code_every: int = 10         # check for dead codes every N steps; 0 = never
    dead_code_window: int = 10        # dead = not picked by any vector of its level in the
    #                                   last N steps
    dead_code_noise: float = 0.01     # relative noise on restarted codes
    vq_gradients: str = "raw"         # raw = DAC's VQ losses and straight-through; direction =
    #                                   losses on unit vectors, the code's gain learned from the
    #                                   decoder (codec_model.quantize): |z_e| cannot run away
    collapse_perplexity: float = 8.0  # validation warns loudly when a level's perplexity is below
    # ---- optimisation (SNAC paper: AdamW, lr 6e-4, exponential decay 0.999994 per step)
    steps: int = 400_000
    lr: float = 6e-4
    lr_decay: float = 0.999994
    # Annealing (warmup-stable-decay): from step `anneal_start` the rate falls linearly to
    # `anneal_to` x over `anneal_steps` steps, then stays there; 0 = never. A run at a steady
    # rate can branch into a short anneal from any checkpoint to ship a snapshot while the
    # steady run goes on (docs/codec-training.md, "Snapshots by annealing").
    anneal_start: int = 0
    anneal_steps: int = 1000
    anneal_to: float = 0.1
    encoder_lr_scale: float = 1.0     # encoder + quantiser learn at lr x this (decoder at lr)
    betas: list[float] = field(default_factory=lambda: [0.8, 0.99])  # DAC's; GAN training likes a low beta1
    weight_decay: float = 0.01
    grad_clip: float = 1000.0         # DAC's value: only catches blow-ups, not a regulariser
    # ---- losses: named terms and weights (DAC's where it has them)
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(
        mel=15.0, stft=1.0, l1=1.0, commitment=0.25, codebook=1.0, adv=1.0, feat=2.0))
    mel_windows: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024, 2048])
    mel_bins: list[int] = field(default_factory=lambda: [5, 10, 20, 40, 80, 160, 320])
    stft_ffts: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    # ---- GAN
    gan: bool = True
    gan_start_step: int = 0           # e.g. warm up on reconstruction losses when fine-tuning
    mpd_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    mpd_channels: int = 32            # HiFi-GAN widths are 32/128/512/1024/1024
    msd_ffts: list[int] = field(default_factory=lambda: [2048, 1024, 512])
    msd_channels: int = 32
    # ---- run
    out_dir: str = "runs/codec"
    resume: str = "auto"               # auto: the newest checkpoint in out_dir/checkpoints if any;
    #                                   never: start over; or a checkpoint path (run/checkpoint)
    seed: int = 0
    device: str = "auto"              # auto = cuda if available
    amp: str = "auto"                 # auto = bf16 autocast on cuda, fp32 on cpu; or bf16 / fp32
    threads: int = 0                  # torch CPU threads; 0 = torch's default. On a busy CPU
    #                                   box 1 can be several times faster than an oversubscribed 2
    log_every: int = 50
    val_every: int = 5000
    ckpt_every: int = 5000
    keep_last: int = 3
    progress: bool = True             # tqdm bar

    def lr_factor(self, step: int) -> float:
        """The learning rate at `step` as a multiple of the configured one."""
        factor = self.lr_decay ** step
        if self.anneal_start and step > self.anneal_start:
            done = min(1.0, (step - self.anneal_start) / self.anneal_steps)
            factor *= 1.0 - (1.0 - self.anneal_to) * done
        return factor

    def model_config(self) -> dict:
        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(MODEL_PRESETS)}")
        config = {**MODEL_PRESETS[self.preset], **self.model}
        if self.decoder:
            from model.vocoder import build_decoder, decoder_spec

            # the whole spec, defaults included, as the checkpoints and exports record it
            config["decoder"] = decoder_spec(build_decoder({
                "latent_dim": config["encoder_dim"] * 2 ** len(config["encoder_rates"]),
                "hop": math.prod(config["encoder_rates"]), **self.decoder}))
        if self.encoder:
            from model.spectral_encoder import build_encoder, encoder_spec

            config["encoder"] = encoder_spec(build_encoder({
                "latent_dim": config["encoder_dim"] * 2 ** len(config["encoder_rates"]),
                "hop": math.prod(config["encoder_rates"]),
                "sample_rate": config["sampling_rate"], **self.encoder}))
        return config

    def validate(self) -> CodecTrainConfig:
        try:
            return self._validate()
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def _validate(self) -> CodecTrainConfig:
        if not self.curriculum or any(len(row) != 3 for row in self.curriculum):
            raise ValueError("curriculum must be a non-empty list of [from_step, seconds, batch]")
        if self.curriculum[0][0] != 0:
            raise ValueError("the first curriculum row must start at step 0")
        starts = [row[0] for row in self.curriculum]
        if starts != sorted(starts):
            raise ValueError("curriculum rows must be sorted by from_step")
        if any(row[1] <= 0 or row[2] < 1 for row in self.curriculum):
            raise ValueError("curriculum seconds must be > 0 and batch sizes >= 1")
        if len(self.mel_windows) != len(self.mel_bins):
            raise ValueError("mel_windows and mel_bins must have the same length")
        unknown = set(self.loss_weights) - LOSS_TERMS
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {sorted(LOSS_TERMS)}")
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ValueError(f"amp must be auto, bf16 or fp32, not {self.amp!r}")
        if self.encoder_lr_scale <= 0:
            raise ValueError("encoder_lr_scale must be > 0")
        if not 0 < self.lr_decay <= 1:
            raise ValueError("lr_decay must be in (0, 1]")
        if self.anneal_start < 0 or self.anneal_steps < 1 or not 0 < self.anneal_to <= 1:
            raise ValueError("anneal_start must be >= 0 (0 = off), anneal_steps >= 1 and "
                             "anneal_to in (0, 1]")
        if self.steps < 0 or self.keep_last < 1 or self.log_every < 1 or self.ckpt_every < 1:
            raise ValueError("steps must be >= 0; keep_last, log_every, ckpt_every >= 1")
        if self.codebook_init not in ("data", "random"):
            raise ValueError(f"codebook_init must be data or random, not {self.codebook_init!r}")
        if self.vq_gradients not in ("raw", "direction"):
            raise ValueError(f"vq_gradients must be raw or direction, not {self.vq_gradients!r}")
        if self.centre_calibration_batches < 0:
            raise ValueError("centre_calibration_batches must be >= 0")
        if self.dead_code_every < 0 or self.dead_code_window < 1 or self.dead_code_noise < 0:
            raise ValueError("dead_code_every must be >= 0, dead_code_window >= 1, "
                             "dead_code_noise >= 0")
        if self.val_every < 0:
            raise ValueError("val_every must be >= 0 (0 = only at the end)")
        if self.decoder.get("kind", "istft") != "istft":
            raise ValueError(f"unknown decoder kind {self.decoder['kind']!r}; known: istft")
        if self.encoder.get("kind", "stft") != "stft":
            raise ValueError(f"unknown encoder kind {self.encoder['kind']!r}; known: stft")
        spectral = {"amp", "partials", "output_chroma", "phase", "consistency"} & {k for k, v in self.loss_weights.items()
                                                     if v}
        if spectral and not self.decoder and not self.init:
            raise ValueError(f"loss terms {sorted(spectral)} need a spectral `decoder`")
        if self.train_gl_iters < 0:
            raise ValueError("train_gl_iters must be >= 0 (0 = the decoder's own)")
        if self.encoder_warmup_steps < 0:
            raise ValueError("encoder_warmup_steps must be >= 0")
        if self.encoder_warmup_steps and not self.loss_weights.get("encoder_spectrum"):
            raise ValueError("encoder_warmup_steps needs loss_weights.encoder_spectrum > 0 "
                             "(the warm-up trains the encoder on that head alone)")
        if self.chroma_levels < 1:
            raise ValueError("chroma_levels must be >= 1")
        if self.chroma_split_hz and not 60.0 <= self.chroma_split_hz <= 1000.0:
            raise ValueError(f"chroma_split_hz must be 0 (one chroma) or between 60 and 1000 Hz "
                             f"(the bass register's top), not {self.chroma_split_hz}")
        if self.frequency_bass_hz and not 60.0 <= self.frequency_bass_hz <= 2000.0:
            raise ValueError(f"frequency_bass_hz must be 0 (pitch.BASS_TOP_HZ) or between 60 and "
                             f"2000 Hz (the top of the frequency_bass term), not "
                             f"{self.frequency_bass_hz}")
        if not self.init:
            self.model_config()  # raises on an unknown preset
        return self


LOSS_TERMS = {"mel", "stft", "l1", "commitment", "codebook", "adv", "feat",
              "amp", "partials", "output_chroma", "phase", "consistency", "chroma",
              "encoder_spectrum", "frequency", "frequency_bass"}


def segment_samples(seconds: float, sample_rate: int, pad_samples: int) -> int:
    """Seconds -> samples, rounded up to the codec's padding grid (at least one unit)."""
    return max(1, math.ceil(seconds * sample_rate / pad_samples)) * pad_samples


# ---------------------------------------------------------------- loading


def load_config(config_file: str | None, overrides: list[str], base: dict | None = None
                ) -> CodecTrainConfig:
    """Defaults <- base (e.g. a checkpoint's config) <- TOML file <- command-line overrides
    (`["--lr", "1e-4", "--model.decoder_dim=256"]`), by the loader both trainers share."""
    path, pairs = run_config.parse_overrides(list(overrides), CodecTrainConfig)
    if path is not None and config_file is not None:
        raise ConfigError("--config given twice")
    return run_config.load(CodecTrainConfig, config_file or path, pairs, base)


def to_dict(cfg: CodecTrainConfig) -> dict:
    return run_config.to_dict(cfg)


def curriculum_stage(rows: list, sample_rate: int, pad: int, step: int) -> tuple[int, int]:
    """(segment samples on the padding grid, batch size) at `step`. Module-level so that
    `functools.partial(curriculum_stage, ...)` pickles into DataLoader workers."""
    row = [r for r in rows if r[0] <= step][-1]
    return segment_samples(row[1], sample_rate, pad), int(row[2])
