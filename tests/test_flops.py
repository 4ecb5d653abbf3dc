"""The model-FLOP count MFU divides (model/flops.py) against what the DiT really runs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.attention_rule import dense_mask
from model.diffusion import DiffusionConfig, MaskedDiffusion
from model.dit import DiT, DiTConfig
from model.flops import forward_flops, mean_keys_per_query, train_flops
from model.layout import build_layout, collate

FPC = (4, 8, 16, 32)


@pytest.mark.parametrize("n_ctx,n_after", [(2, 0), (0, 0), (1, 1)])
def test_matmul_flops_match_the_flop_counter(n_ctx, n_after):
    cfg = DiTConfig.from_name("debug", frames_per_chunk=FPC, codebook_size=64,
                              max_after_chunks=1)
    dit = DiT(cfg)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 64, (1, (n_ctx + 1 + n_after) * f), generator=g) for f in FPC]
    loss = MaskedDiffusion(DiffusionConfig(context_dropout=0.0))
    with FlopCounterMode(display=False) as counter:
        loss.loss(dit, windows, n_ctx=[n_ctx], n_after=[n_after] if n_after else None,
                  generator=torch.Generator().manual_seed(1))
    counts = counter.get_flop_counts()["Global"]
    attention_ops = [op for op in counts if "attention" in str(op)]
    counted = sum(v for op, v in counts.items() if op not in attention_ops)
    ours = forward_flops(cfg, n_ctx, n_after)
    # Every matmul but attention's: trunk linears, per-segment conditioning, the noised heads.
    assert ours["linear"] + ours["conditioning"] + ours["heads"] == pytest.approx(counted,
                                                                                  rel=0.02)
    lay = build_layout(n_ctx, FPC, n_after=n_after)
    pairs = int(dense_mask(lay.seg_id[None], lay.seg_id[None], lay.allowed).sum())
    assert ours["attention"] == cfg.n_layers * 4 * cfg.d_model * pairs
    assert mean_keys_per_query(cfg, n_ctx, n_after) == pytest.approx(pairs / lay.n_tokens)


def test_real_geometry_counts_far_less_than_six_params():
    # base at the full-context layout: the old 6 * params + 12 L d N count overstated the work
    cfg = DiTConfig.from_name("base")
    with torch.device("meta"):
        n_params = DiT(cfg).num_params()
    n = build_layout(2).n_tokens
    old = n * (6.0 * n_params + 12 * cfg.n_layers * cfg.d_model * n)
    new = train_flops(cfg, [2])
    assert new < 0.6 * old
    assert train_flops(cfg, [2, 0], [0, 0]) == new + train_flops(cfg, [0])
    assert collate((2,)).shape[1] == n
