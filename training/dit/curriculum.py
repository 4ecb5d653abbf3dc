"""The context curriculum: which stage an optimizer step belongs to, and the stage's n_ctx mix.

A stage's n_ctx weights go to the data sampler (`training.tokens.sampling.WindowBatchSampler`), which draws
each row's n_ctx as a pure function of (seed, epoch, position): rows of one batch may differ, a
resumed run draws what the uninterrupted one would have, and short files still give n_ctx = 0
windows. Each stage has its own sampler seed, so a later stage does not replay the earlier
stage's order.
"""

from __future__ import annotations

import sys

from training.dit.config import Stage
from training.tokens.sampling import WindowBatchSampler
from training.tokens.windows import TokenWindows

N_CTX_VALUES = (0, 1, 2)  # the dataset's n_ctx values; Stage.n_ctx holds one weight per value
# With editing layouts in the curriculum the dataset also holds windows with an after chunk.
EDIT_VALUES = N_CTX_VALUES + tuple((n, 1) for n in N_CTX_VALUES)


def trains_after_context(stages: list[Stage]) -> bool:
    return any(s.n_after > 0 for s in stages)


def dataset_values(stages: list[Stage]) -> tuple:
    """The n_ctx values (and (n_ctx, n_after) pairs) the training dataset must hold."""
    return EDIT_VALUES if trains_after_context(stages) else N_CTX_VALUES


def layout_weights(stage: Stage, values: tuple) -> list[float]:
    """The stage's weight of each dataset value: n_ctx weights, split by its n_after share."""
    if values == N_CTX_VALUES:
        return list(stage.n_ctx)
    return [w * (1 - stage.n_after) for w in stage.n_ctx] + [w * stage.n_after for w in stage.n_ctx]


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
                  state: dict | None = None, uniform_layout: bool = False) -> WindowBatchSampler:
    """The batch sampler of stage `index`, at `state` (a saved batch["data_state"]) if given;
    `uniform_layout`: every row of a batch has the same layout (WindowBatchSampler)."""
    values = dataset_values(stages)
    if dataset.n_ctx_values != values:
        raise ValueError(f"the dataset must hold n_ctx {values}, has {dataset.n_ctx_values}")
    stage = stages[index]
    weights = layout_weights(stage, values)
    # Files too short for an after chunk with n context chunks: those rows train without one
    # (n_after is a share; the n_ctx mix, which the curriculum is about, stays as asked).
    for i, v in enumerate(values):
        if isinstance(v, tuple) and weights[i] > 0 and dataset.ranges[v][0] == dataset.ranges[v][1]:
            print(f"note: stage {stage.name!r}: no file is {sum(v) + 1} chunks long, so rows "
                  f"with {v[0]} context chunks train without an after chunk", file=sys.stderr)
            weights[values.index(v[0])] += weights[i]
            weights[i] = 0.0
    chunks = {v: (v if isinstance(v, int) else sum(v)) + 1 for v in values}
    empty = [v for v, w in zip(values, weights, strict=True)
             if w > 0 and dataset.ranges[v][0] == dataset.ranges[v][1]]
    if empty:
        need = min(chunks[v] for v in empty)
        raise ValueError(
            f"curriculum stage {stage.name!r} trains layouts {empty}, but no training file is "
            f"{need} chunks ({need * 6.144:.3f} s) long; tokenise longer audio or set that "
            "stage's weight (or n_after) to 0"
        )
    sampler = WindowBatchSampler(dataset, batch_size, seed=seed + 7919 * index,
                                 n_ctx_weights=weights, rank=rank, world_size=world_size,
                                 uniform_layout=uniform_layout)
    if state is not None:
        sampler.load_state_dict(state)
    return sampler
