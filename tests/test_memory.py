"""Activation memory: per-segment modulation, per-block checkpointing, the start-up check."""

import pytest
import torch

from model.diffusion import DiffusionConfig, MaskedDiffusion
from model.dit import DiT, DiTConfig, modulate, segment_gated_add, segment_modulate
from training.dit.config import Stage, TrainConfig, validate
from training.dit.memory import estimate, plan_memory, worst_layout
from training.run.config import ConfigError

FPC = (4, 8, 16, 32)


def test_segment_functions_equal_gather_then_modulate_with_their_gradients():
    g = torch.Generator().manual_seed(0)
    B, N, S, d = 2, 11, 4, 6
    idx = torch.randint(0, S, (B, N), generator=g)
    x, y = (torch.randn(B, N, d, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    shift, scale, gate = (torch.randn(B, S, d, generator=g, dtype=torch.float64,
                                      requires_grad=True) for _ in range(3))

    def rows(t):
        return t.gather(1, idx[:, :, None].expand(-1, -1, d))

    assert torch.equal(segment_modulate(x, shift, scale, idx),
                       modulate(x, rows(shift), rows(scale)))
    assert torch.equal(segment_gated_add(x, y, gate, idx), x + rows(gate) * y)
    assert torch.autograd.gradcheck(lambda *a: segment_modulate(*a, idx), (x, shift, scale))
    assert torch.autograd.gradcheck(lambda *a: segment_gated_add(*a, idx), (x, y, gate))


def test_a_block_saves_no_per_token_modulation():
    # Counted on the meta device: gathering the (B, N, 6d) modulation first saved ~33 d-sized
    # fp32 tensors per token per block (the issue's ~90 KB per token per layer at base); per
    # segment it is ~25.
    cfg = DiTConfig.from_name("debug", max_after_chunks=1)
    est = estimate(cfg, 0, 2, 1)
    per_token = est.per_block / est.n_tokens / (4 * cfg.d_model)
    assert 20 < per_token < 27, per_token


def test_checkpointed_blocks_give_the_same_loss_and_gradients():
    cfg = DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=32)
    torch.manual_seed(0)
    net = DiT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 32, (2, 3 * f), generator=g) for f in FPC]
    loss_fn = MaskedDiffusion(DiffusionConfig(context_dropout=0.0))

    def step(checkpoint):
        net.zero_grad()
        net.checkpoint_blocks = checkpoint
        loss = loss_fn.loss(net, windows, n_ctx=[2, 1],
                            generator=torch.Generator().manual_seed(1))["loss"]
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in net.parameters()]

    from model.dit import Block

    calls = []
    real = Block.forward
    mp = pytest.MonkeyPatch()
    mp.setattr(Block, "forward", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    try:
        plain = step(False)
        n_plain = len(calls)
        ckpt = step(True)
    finally:
        mp.undo()
    assert n_plain == cfg.n_layers and len(calls) == 3 * cfg.n_layers  # + run and recomputed
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def base_estimate():
    cfg = DiTConfig.from_name("base", max_after_chunks=1)
    with torch.device("meta"):
        n_params = DiT(cfg).num_params()
    return estimate(cfg, n_params, *worst_layout(TrainConfig().curriculum.stages, 1))


def test_default_run_fits_80_gb_by_checkpointing_and_says_what_fits_otherwise():
    est = base_estimate()
    assert est.n_tokens == 4288  # two context chunks + the after chunk: the "full" stage
    H100 = 80e9
    batch = TrainConfig().data.batch_size
    assert est.total(batch, checkpoint=False) > 100e9  # the default batch never fit unaided
    assert plan_memory(est, batch, H100, "auto", "on H100") is True
    assert plan_memory(est, 4, H100, "auto", "on H100") is False
    fits = est.max_batch(H100, checkpoint=False)
    assert 8 <= fits < batch
    with pytest.raises(ConfigError, match=rf"data.batch_size 32 does not fit on H100.*Batch {fits} "
                                          r"fits.*\"on\" batch \d+ does"):
        plan_memory(est, batch, H100, "off", "on H100")
    with pytest.raises(ConfigError, match=r"Batch \d+ fits"):
        plan_memory(est, 4096, H100, "auto", "on H100")


def test_worst_layout_and_config_switch():
    stages = [Stage("a", 1, [1, 0, 0]), Stage("b", 1, [0.5, 0.5, 0], n_after=0.2)]
    assert worst_layout(stages, 1) == (1, 1) and worst_layout(stages, 0) == (1, 0)
    cfg = TrainConfig()
    cfg.activation_checkpointing = "sometimes"
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        validate(cfg)


def test_start_up_check_decides_and_refuses_before_step_one(monkeypatch):
    from types import SimpleNamespace

    from training.dit.memory import checkpoint_blocks

    cfg = TrainConfig()
    model_cfg = DiTConfig.from_name("base", max_after_chunks=1)
    with torch.device("meta"):
        n_params = DiT(model_cfg).num_params()
    cpu = torch.device("cpu")
    assert checkpoint_blocks(cfg, model_cfg, n_params, cpu) is False  # auto: off on CPU
    cfg.activation_checkpointing = "on"
    assert checkpoint_blocks(cfg, model_cfg, n_params, cpu) is True
    # On an (imitated) 80 GB GPU the default batch runs checkpointed; a huge one stops here.
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(total_memory=80 * 10**9, name="H100"))
    said = []
    cfg.activation_checkpointing = "auto"
    assert checkpoint_blocks(cfg, model_cfg, n_params, torch.device("cuda"), said.append)
    assert "activation checkpointing on" in said[0] and "4288 tokens" in said[0]
    cfg.data.batch_size = 4096
    with pytest.raises(ConfigError, match="data.batch_size 4096 does not fit on H100"):
        checkpoint_blocks(cfg, model_cfg, n_params, torch.device("cuda"), said.append)
