"""One codec training step (generator + optional discriminator) and its resumable state.

Step order follows DAC: the discriminator updates on (real, generated.detach()), then the
generator updates on reconstruction + VQ + adversarial + feature-matching terms, with the
discriminator's real-audio features recomputed after its update. Returns a flat dict of
detached scalars; the caller decides when to sync them to floats (logging), so a GPU step has
no host sync.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch
from torch.nn.utils import clip_grad_norm_

from training.codec_config import CodecTrainConfig
from training.codec_losses import (
    ReconstructionLosses,
    discriminator_loss,
    feature_matching_loss,
    generator_adv_loss,
    weighted_total,
)
from training.codec_model import codec_forward, freeze_encoder_and_quantizer, load_snac
from training.discriminators import CodecDiscriminator


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CodecTrainer:
    def __init__(self, cfg: CodecTrainConfig, model_source: str | dict | None = None):
        """model_source: a config dict / path / hub id; default: cfg.init, else cfg's preset.
        A resumed run passes the checkpoint's model config and then loads its weights."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_bf16 else None

        torch.manual_seed(cfg.seed)  # weight init of model and discriminator
        source = model_source if model_source is not None else (cfg.init or cfg.model_config())
        self.model, self.model_config = load_snac(source)
        if cfg.init and cfg.model and model_source is None:
            print("warning: `model` overrides are ignored when fine-tuning from `init`",
                  file=sys.stderr)
        self.model.to(self.device).train()
        if cfg.freeze_encoder:
            freeze_encoder_and_quantizer(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.sample_rate = int(self.model_config["sampling_rate"])
        self.codebook_size = int(self.model_config["codebook_size"])

        self.recon = ReconstructionLosses(self.sample_rate, cfg.mel_windows, cfg.mel_bins,
                                          cfg.stft_ffts).to(self.device)
        self.opt_g = torch.optim.AdamW(self.trainable, lr=cfg.lr, betas=tuple(cfg.betas),
                                       weight_decay=cfg.weight_decay)
        self.sched_g = torch.optim.lr_scheduler.ExponentialLR(self.opt_g, cfg.lr_decay)
        self.disc = self.opt_d = self.sched_d = None
        if cfg.gan:
            self.disc = CodecDiscriminator(cfg.mpd_periods, cfg.mpd_channels, cfg.msd_ffts,
                                           cfg.msd_channels).to(self.device).train()
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr,
                                           betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
            self.sched_d = torch.optim.lr_scheduler.ExponentialLR(self.opt_d, cfg.lr_decay)
        self.step = 0

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 1, T) real audio. One generator (+ discriminator) update; advances self.step."""
        cfg, w = self.cfg, self.cfg.loss_weights
        x = x.to(self.device, non_blocking=True)
        with self.autocast():
            out = codec_forward(self.model, x, cfg.freeze_encoder)
        y = out.audio.float()                                   # (B, 1, T)
        losses = self.recon(y, x)
        losses["commitment"], losses["codebook"] = out.commitment, out.codebook
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

        metrics.update({f"loss/{k}": v.detach() for k, v in losses.items()})
        metrics["loss/total"] = total.detach()
        return metrics

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        sd = {
            "model": self.model.state_dict(), "model_config": self.model_config,
            "opt_g": self.opt_g.state_dict(), "sched_g": self.sched_g.state_dict(),
        }
        if self.disc is not None:
            sd.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict(),
                      sched_d=self.sched_d.state_dict())
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.opt_g.load_state_dict(sd["opt_g"])
        self.sched_g.load_state_dict(sd["sched_g"])
        if self.disc is not None and "disc" in sd:
            self.disc.load_state_dict(sd["disc"])
            self.opt_d.load_state_dict(sd["opt_d"])
            self.sched_d.load_state_dict(sd["sched_d"])
        elif self.disc is not None:
            print("warning: checkpoint has no discriminator; starting a fresh one", file=sys.stderr)
        self.step = int(sd["step"])
