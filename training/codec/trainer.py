"""One codec training step (generator + optional discriminator) and its resumable state.

Step order follows DAC: the discriminator updates on (real, generated.detach()), then the
generator updates on reconstruction + VQ + adversarial + feature-matching terms, with the
discriminator's real-audio features recomputed after its update. Returns a flat dict of
detached scalars; the caller decides when to sync them to floats (logging), so a GPU step has
no host sync.
"""

from __future__ import annotations

import copy
import math
import sys
from contextlib import contextmanager, nullcontext

import torch
from torch.nn.utils import clip_grad_norm_

from training.codec.config import CodecTrainConfig
from training.codec.discriminators import CodecDiscriminator
from training.codec.losses import (
    ReconstructionLosses,
    discriminator_loss,
    feature_matching_loss,
    generator_adv_loss,
    spectral_decoder_losses,
    weighted_total,
)
from training.codec.model import (
    codec_forward,
    fold_input_means,
    freeze_encoder_and_quantizer,
    load_for_training,
    quantize,
)
from training.codec.pitch import BASS_TOP_HZ
from training.codec.vq import CodebookKeeper
from training.run.distributed import pick_device


def schedule(opt: torch.optim.Optimizer, cfg: CodecTrainConfig):
    """The rate of every group: its configured rate x cfg.lr_factor(step) (decay, anneal)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cfg.lr_factor(step))


def load_schedule(sched, state: dict) -> None:
    """Also the ExponentialLR states runs saved before the anneal existed (its factor is the
    same function of the step)."""
    state = {k: v for k, v in state.items() if k != "gamma"}
    state.setdefault("lr_lambdas", [None] * len(sched.lr_lambdas))
    sched.load_state_dict(state)


class CodecTrainer:
    def __init__(self, cfg: CodecTrainConfig, model_source: str | dict | None = None):
        """model_source: a config dict / path / hub id; default: cfg.init, else cfg's preset.
        A resumed run passes the checkpoint's model config and then loads its weights."""
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_bf16 else None

        torch.manual_seed(cfg.seed)  # weight init of model and discriminator
        source = model_source if model_source is not None else (cfg.init or cfg.model_config())
        self.model, self.model_config = load_for_training(source)
        if cfg.init and model_source is None:
            ignored = dict(cfg.model)
            if cfg.decoder and hasattr(self.model.decoder, "cfg"):
                # render options (Griffin-Lim phase, its iterations) may change on a warm start
                from model.vocoder import decoder_spec, set_render_options

                rest = set_render_options(self.model.decoder, cfg.decoder)
                self.model_config["decoder"] = decoder_spec(self.model.decoder)
                ignored.update({f"decoder.{k}": v for k, v in rest.items()})
            elif cfg.decoder:
                ignored["decoder"] = cfg.decoder
            if cfg.encoder:
                ignored["encoder"] = cfg.encoder
            if ignored:
                print(f"warning: {', '.join(ignored)} ignored when fine-tuning from `init` "
                      "(the model keeps the architecture it was saved with)", file=sys.stderr)
        elif model_source is not None and cfg.decoder and hasattr(self.model.decoder, "cfg"):
            # a resume: the recipe's render options apply from here on (they change no weight)
            from model.vocoder import decoder_spec, set_render_options

            rest = set_render_options(self.model.decoder, cfg.decoder)
            self.model_config["decoder"] = decoder_spec(self.model.decoder)
            if rest:
                print(f"warning: {', '.join(f'decoder.{k}' for k in rest)} ignored on resume "
                      "(the run keeps the decoder it was built with)", file=sys.stderr)
        self.model.to(self.device).train()
        if cfg.freeze_encoder:
            freeze_encoder_and_quantizer(self.model)
        self.sample_rate = int(self.model_config["sampling_rate"])
        self.codebook_size = int(self.model_config["codebook_size"])
        # Pitch distillation into the coarse levels: a training-only head (not exported).
        self.chroma_head = None
        if cfg.loss_weights.get("chroma") and not cfg.freeze_encoder:
            from training.codec.pitch_head import ChromaHead

            rates, strides = self.model_config["encoder_rates"], self.model_config["vq_strides"]
            self.chroma_head = ChromaHead(
                self.model_config["encoder_dim"] * 2 ** len(rates), self.sample_rate,
                math.prod(rates), strides[0], cfg.chroma_levels,
                split_hz=cfg.chroma_split_hz).to(self.device).train()
        # The encoder taught to hear partials directly (pitch_head.SpectrumHead; not exported).
        self.spectrum_head = None
        if cfg.loss_weights.get("encoder_spectrum") and not cfg.freeze_encoder:
            from training.codec.pitch_head import SpectrumHead

            self.spectrum_head = SpectrumHead(
                self.model_config["encoder_dim"] * 2 ** len(self.model_config["encoder_rates"]),
                self.sample_rate, math.prod(self.model_config["encoder_rates"])
            ).to(self.device).train()
        self.spectral = hasattr(self.model.decoder, "spectrum") and any(
            cfg.loss_weights.get(k) for k in ("amp", "partials", "output_chroma", "phase",
                                              "consistency"))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        for head in (self.chroma_head, self.spectrum_head):
            if head is not None:
                self.trainable += list(head.parameters())

        self.recon = ReconstructionLosses(self.sample_rate, cfg.mel_windows, cfg.mel_bins,
                                          cfg.stft_ffts).to(self.device)
        # Two groups: encoder + quantiser may learn slower than the decoder (encoder_lr_scale).
        # Adam moves every weight by ~lr a step, and against the encoder's large DC offset those
        # moves add up: at lr 6e-4 and batch 8 the projected vectors outran their codes.
        front = [p for m in (self.model.encoder, self.model.quantizer) for p in m.parameters()
                 if p.requires_grad]
        front_ids = {id(p) for p in front}
        back = [p for p in self.trainable if id(p) not in front_ids]  # decoder (+ chroma head)
        groups = [g for g in ({"params": front, "lr": cfg.lr * cfg.encoder_lr_scale},
                              {"params": back, "lr": cfg.lr}) if g["params"]]
        self.opt_g = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                                       weight_decay=cfg.weight_decay)
        self.rates_g = [g["lr"] for g in groups]   # the config's, kept across a resume
        self.sched_g = schedule(self.opt_g, cfg)
        self.disc = self.opt_d = self.sched_d = None
        if cfg.gan:
            self.disc = CodecDiscriminator(cfg.mpd_periods, cfg.mpd_channels, cfg.msd_ffts,
                                           cfg.msd_channels).to(self.device).train()
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr,
                                           betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
            self.sched_d = schedule(self.opt_d, cfg)
        # Codes must not move under freeze_encoder (a tokenised dataset depends on them), and a
        # fine-tune keeps its pretrained codebooks: data init is for from-scratch runs only.
        self.keeper = None
        if cfg.dead_code_every and not cfg.freeze_encoder:
            self.keeper = CodebookKeeper(self.model.quantizer.quantizers, cfg.dead_code_window,
                                         cfg.dead_code_noise, cfg.seed)
        # Training centres each level's quantiser input on its batch mean (codec_vq.py); for
        # validation, checkpoints and export the mean over fixed calibration batches (set by the
        # caller, else the latest batch) is folded into in_proj, giving a plain snac model.
        self.centre = "batch" if cfg.centre_vq_input and not cfg.freeze_encoder else None
        self.calibration: list[torch.Tensor] = []
        self._last_batch: torch.Tensor | None = None
        self.wants_data_init = (cfg.codebook_init == "data" and not cfg.init
                                and not cfg.freeze_encoder)
        self.needs_data_init = self.wants_data_init and model_source is None
        # A model loaded from `init` is a plain snac model (exports, the hub, checkpoints: all
        # folded). Before batch centring trains it, its mean quantiser input is moved back out of
        # in_proj (`_unfold`), so the first centred step sees the model as it was.
        self.needs_unfold = bool(cfg.init) and self.centre is not None and model_source is None
        self.step = 0

    @torch.no_grad()
    def _unfold(self, x: torch.Tensor) -> None:
        """in_proj.bias += W m, m = each level's mean input under the plain forward on the
        calibration batches (else this batch): the inverse of `fold_input_means`."""
        rvq = self.model.quantizer
        sums = None
        for batch in self.calibration or [x]:
            with self.autocast():
                z = self.model.encoder(self.model.preprocess(batch.to(self.device))).float()
            means = quantize(rvq, z)[5]
            sums = means if sums is None else [a + b for a, b in zip(sums, means, strict=True)]
        for vq, m in zip(rvq.quantizers, sums, strict=True):
            w = vq.in_proj.weight.squeeze(-1)
            vq.in_proj.bias.add_((w.float() @ (m / len(self.calibration or [x]))).to(w))

    @torch.no_grad()
    def _init_codebooks(self, x: torch.Tensor) -> None:
        """Data init, coarse to fine: level l's inputs are the residuals after levels < l have
        been initialised (and centred), so each level is fitted to what it will really see."""
        rvq = self.model.quantizer
        keeper = self.keeper or CodebookKeeper(rvq.quantizers, seed=self.cfg.seed)
        with self.autocast():
            z = self.model.encoder(self.model.preprocess(x)).float()
        for level in range(len(rvq.quantizers)):
            latents = quantize(rvq, z, self.centre)[4]
            keeper.init_from_data(latents, self.step, levels={level})

    @torch.no_grad()
    def input_means(self) -> list[torch.Tensor] | None:
        """Per-level mean quantiser input over the calibration batches, with the current
        weights and batch centring (None: not centring). On the CPU."""
        batches = self.calibration or ([self._last_batch] if self._last_batch is not None else [])
        if self.centre is None or not batches:
            return None
        zs = []
        for x in batches:
            with self.autocast():
                zs.append(self.model.encoder(self.model.preprocess(x.to(self.device))).float())
        rvq = self.model.quantizer
        # Coarse to fine: level l's inputs depend on how levels < l quantise, which with the
        # fold means with their calibrated centres, not their batch means.
        centre = [z.new_zeros(z.shape[1]) for z in zs[:1] for _ in rvq.quantizers]
        for level in range(len(rvq.quantizers)):
            centre[level] = sum(quantize(rvq, z, centre)[5][level] for z in zs) / len(zs)
        return [c.cpu() for c in centre]

    def export_model(self):
        """A plain snac model: the calibrated centre folded into in_proj (a copy), or the
        training model itself when it does not centre."""
        means = self.input_means()
        if means is None:
            return self.model
        return fold_input_means(copy.deepcopy(self.model), means)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @contextmanager
    def _training_render(self):
        """The decoder renders training batches with `train_gl_iters` Griffin-Lim iterations
        (if set); validation, checkpoints and exports keep its own."""
        decoder = self.model.decoder
        if not self.cfg.train_gl_iters or getattr(getattr(decoder, "cfg", None), "phase",
                                                  None) != "griffin_lim":
            yield
            return
        from model.vocoder import render_options

        with render_options(decoder, gl_iters=self.cfg.train_gl_iters):
            yield

    def train_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 1, T) real audio. One generator (+ discriminator) update; advances self.step."""
        cfg, w = self.cfg, self.cfg.loss_weights
        x = x.to(self.device, non_blocking=True)
        if self.step < cfg.encoder_warmup_steps and self.spectrum_head is not None:
            return self._warmup_step(x)
        if self.needs_data_init and self.step == cfg.encoder_warmup_steps:
            self._init_codebooks(x)
        self.needs_data_init = False
        if self.needs_unfold:
            self._unfold(x)
            self.needs_unfold = False
        with self.autocast(), self._training_render():
            out = codec_forward(self.model, x, cfg.freeze_encoder, self.centre,
                                cfg.vq_gradients)
        self._last_batch = x.detach()
        y = out.audio.float()                                   # (B, 1, T)
        losses = self.recon(y, x)
        losses["commitment"], losses["codebook"] = out.commitment, out.codebook
        if self.spectral:
            losses.update(spectral_decoder_losses(
                self.model.decoder, *out.spectrum, x, self.sample_rate,
                cfg.frequency_bass_hz or BASS_TOP_HZ))
        if self.chroma_head is not None:
            losses["chroma"] = self.chroma_head.loss(out.level_z_q, x)
        if self.spectrum_head is not None:
            losses["encoder_spectrum"] = self.spectrum_head.loss(out.z, x)
        metrics: dict[str, torch.Tensor] = {}

        if self.disc is not None and self.step >= cfg.gan_start_step:
            self.disc.requires_grad_(True)
            with self.autocast():
                loss_d = discriminator_loss(self.disc(x), self.disc(y.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            metrics["grad_norm/disc"] = clip_grad_norm_(self.disc.parameters(), cfg.grad_clip)
            self.opt_d.step()
            self.sched_d.step()
            metrics["loss/disc"] = loss_d.detach()
            # Generator pass: no gradient into the discriminator's weights (saves the work).
            self.disc.requires_grad_(False)
            with self.autocast():
                with torch.no_grad():
                    real = self.disc(x)
                fake = self.disc(y)
            losses["adv"] = generator_adv_loss(fake)
            losses["feat"] = feature_matching_loss(real, fake)

        total = weighted_total(losses, w)
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        metrics["grad_norm/gen"] = clip_grad_norm_(self.trainable, cfg.grad_clip)
        self.opt_g.step()
        self.sched_g.step()
        self.step += 1
        if self.keeper is not None:
            self.keeper.observe(out.codes)
            if self.step % cfg.dead_code_every == 0:
                revived = self.keeper.revive(out.latents, self.step, self.opt_g)
                for level, n in enumerate(revived):
                    metrics[f"vq/revived_{level}"] = torch.tensor(float(n))
        for level, c in enumerate(out.codes):  # distinct codes in this batch (no host sync)
            hit = torch.zeros(self.codebook_size, device=c.device).index_fill_(0, c.reshape(-1), 1)
            metrics[f"vq/batch_unique_{level}"] = hit.sum()

        metrics.update({f"loss/{k}": v.detach() for k, v in losses.items()})
        metrics["loss/total"] = total.detach()
        return metrics

    def _warmup_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoder and its spectrum head only (cfg.encoder_warmup_steps)."""
        with self.autocast():
            z = self.model.encoder(self.model.preprocess(x))
        loss = self.spectrum_head.loss(z, x)
        total = self.cfg.loss_weights["encoder_spectrum"] * loss
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        metrics = {"grad_norm/gen": clip_grad_norm_(self.trainable, self.cfg.grad_clip)}
        self.opt_g.step()          # parameters without a gradient are left as they are
        self.sched_g.step()
        self.step += 1
        self._last_batch = x.detach()
        return {**metrics, "loss/encoder_spectrum": loss.detach(), "loss/total": total.detach()}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        sd = {
            "step": self.step, "model": self.model.state_dict(), "model_config": self.model_config,
            "opt_g": self.opt_g.state_dict(), "sched_g": self.sched_g.state_dict(),
        }
        if self.keeper is not None:
            sd["keeper"] = self.keeper.state_dict()
        if self.chroma_head is not None:
            sd["aux"] = self.chroma_head.state_dict()
        if self.spectrum_head is not None:
            sd["aux_spectrum"] = self.spectrum_head.state_dict()
        # The model is stored unfolded (resume continues from it as it is); readers of the
        # checkpoint (export, fine-tuning) fold these calibrated means in.
        sd["vq_input_means"] = self.input_means()
        if self.disc is not None:
            sd.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict(),
                      sched_d=self.sched_d.state_dict())
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        own = self.chroma_head.state_dict() if self.chroma_head is not None else {}
        if any(k in own and v.shape != own[k].shape for k, v in sd.get("aux", {}).items()):
            raise ValueError(
                f"this checkpoint's chroma head has other shapes than the recipe's "
                f"{self.chroma_head.registers}-register one (chroma_split_hz changed): a resumed "
                "run keeps its head; start a new run from the weights with --init instead")
        self.opt_g.load_state_dict(sd["opt_g"])
        load_schedule(self.sched_g, sd["sched_g"])
        if self.keeper is not None and "keeper" in sd:
            self.keeper.load_state_dict(sd["keeper"])
        if self.chroma_head is not None and "aux" in sd:
            self.chroma_head.load_state_dict(sd["aux"])
        if self.spectrum_head is not None and "aux_spectrum" in sd:
            self.spectrum_head.load_state_dict(sd["aux_spectrum"])
        # a resumed model's codebooks are already trained, unless it stopped in the warm-up
        self.needs_data_init = (self.wants_data_init
                                and int(sd["step"]) <= self.cfg.encoder_warmup_steps)
        self.needs_unfold = False     # and its weights are stored unfolded
        if self.disc is not None and "disc" in sd:
            self.disc.load_state_dict(sd["disc"])
            self.opt_d.load_state_dict(sd["opt_d"])
            load_schedule(self.sched_d, sd["sched_d"])
        elif self.disc is not None:
            print("warning: checkpoint has no discriminator; starting a fresh one", file=sys.stderr)
        self.step = int(sd["step"])
        self._apply_configured_rates()

    def _apply_configured_rates(self) -> None:
        """Loading an optimiser restores the learning rates it was saved with; a resumed run
        must use the rates its config asks for now (lr, encoder_lr_scale), decayed to its step."""
        cfg = self.cfg
        pairs = [(self.opt_g, self.sched_g, self.rates_g)]
        if self.opt_d is not None:
            pairs.append((self.opt_d, self.sched_d, [cfg.lr]))
        for opt, sched, bases in pairs:
            old = list(sched.base_lrs)
            factor = cfg.lr_factor(sched.last_epoch)
            for group, base in zip(opt.param_groups, bases, strict=True):
                group["initial_lr"] = base
                group["lr"] = base * factor
            sched.base_lrs = list(bases)
            sched._last_lr = [group["lr"] for group in opt.param_groups]
            if any(abs(a - b) > 1e-12 for a, b in zip(old, bases, strict=True)):
                print(f"note: learning rates {old} from the checkpoint replaced by the config's "
                      f"{bases}", file=sys.stderr)

