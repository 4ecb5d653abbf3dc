"""Host syncs of a training step (training/dit/step.py, the trainer's loop)."""

import torch

from model.diffusion import DiffusionConfig, MaskedDiffusion
from model.dit import DiT, DiTConfig
from tests.test_resume import debug_config, make_tokens
from training.dit.step import LossModule
from training.dit.trainer import Trainer
from training.run import distributed as D

FPC = (4, 8, 16, 32)


def test_context_dropout_drawn_on_the_host_generator():
    # With a host generator (the trainer passes one on CUDA) the dropout that shapes the
    # layouts comes from it, and the device generator draws only t and the masks: dropping every
    # row's context then gives exactly the loss of n_ctx = 0 rows without dropout.
    torch.manual_seed(0)
    dit = DiT(DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=32))
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 32, (3, 3 * f), generator=g) for f in FPC]
    dropped = LossModule(dit, MaskedDiffusion(DiffusionConfig(context_dropout=1.0)))
    plain = LossModule(dit, MaskedDiffusion(DiffusionConfig(context_dropout=0.0)))
    got = dropped(windows, [2, 1, 2], torch.Generator().manual_seed(5), None,
                  torch.Generator().manual_seed(6))
    want = plain(windows, [0, 0, 0], torch.Generator().manual_seed(5))
    assert torch.equal(got["loss"], want["loss"])


def test_a_single_process_run_never_all_reduces_the_stop_flag(tmp_path, monkeypatch):
    tokens = make_tokens(tmp_path / "tokens", n_train=2, chunks=3)
    cfg = debug_config(tokens, tmp_path, "stop", **{
        "curriculum.stages.0.steps": 4, "curriculum.stages.1.steps": 0,
        "curriculum.stages.2.steps": 0, "eval.every": 0, "log.every": 2})
    calls = []
    monkeypatch.setattr(D, "any_flag", lambda env, flag: calls.append(flag) or flag)
    assert Trainer(cfg).fit() == 0
    assert calls == []
