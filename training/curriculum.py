"""The context curriculum: which stage an optimizer step belongs to, and the stage's n_ctx mix.

A stage's n_ctx weights go to the data sampler (`training.data.WindowBatchSampler`), which draws
each row's n_ctx as a pure function of (seed, epoch, position): rows of one batch may differ, a
resumed run draws what the uninterrupted one would have, and short files still give n_ctx = 0
windows. Each stage has its own sampler seed, so a later stage does not replay the earlier
stage's order.
"""

from __future__ import annotations

from training.config import Stage
from training.data import TokenWindows, WindowBatchSampler

N_CTX_VALUES = (0, 1, 2)  # the dataset's n_ctx values; Stage.n_ctx holds one weight per value


def stage_at(stages: list[Stage], step: int) -> tuple[int, Stage]:
    """(index, stage) that optimizer step `step` (0-based) belongs to; the last stage after the end."""
    end = 0
    for i, s in enumerate(stages):
        end += s.steps
        if step < end:
            return i, s
    return len(stages) - 1, stages[-1]


def stage_sampler(dataset: TokenWindows, stages: list[Stage], index: int, batch_size: int,
                  seed: int, rank: int = 0, world_size: int = 1,
                  state: dict | None = None) -> WindowBatchSampler:
    """The batch sampler of stage `index`, at `state` (a saved batch["data_state"]) if given."""
    if dataset.n_ctx_values != N_CTX_VALUES:
        raise ValueError(f"the dataset must hold n_ctx {N_CTX_VALUES}, has {dataset.n_ctx_values}")
    stage = stages[index]
    empty = [n for n, w in zip(N_CTX_VALUES, stage.n_ctx, strict=True)
             if w > 0 and dataset.ranges[n][0] == dataset.ranges[n][1]]
    if empty:
        raise ValueError(
            f"curriculum stage {stage.name!r} trains n_ctx {empty}, but no training file is "
            f"{min(empty) + 1} chunks ({(min(empty) + 1) * 6.144:.3f} s) long; tokenise longer "
            "audio or set that stage's weight to 0"
        )
    sampler = WindowBatchSampler(dataset, batch_size, seed=seed + 7919 * index,
                                 n_ctx_weights=stage.n_ctx, rank=rank, world_size=world_size)
    if state is not None:
        sampler.load_state_dict(state)
    return sampler
