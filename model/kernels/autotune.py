"""Launch configurations of the block-attention kernel and the hook that tunes them per shape.

What is tuned: the query tile BLOCK_M in {64, 128} (the key tile stays 64: the tile plan's
FULL/EMPTY classes rely on 64-token segments), num_warps and num_stages. A 128-query tile halves
the programs and the K/V reloads of the long training layouts; 64 keeps more programs for the
sampler's short query sets. Which wins depends on the GPU, the dtype and the shape, so it is
measured, not guessed: with `set_autotune(True)` the first call of each shape key (batch x heads,
query and key lengths rounded up to 64, head dim, dtype, with or without backward) times every
candidate and keeps the fastest for the rest of the process. Off by default: tuning costs a few
seconds per shape key the first time (serving warms up through `ContinuationEngine.warmup`,
training pays it on step 1). Without tuning the launch is `default_config(head_dim)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int = 64  # query tile
    num_warps: int = 4
    num_stages: int = 2


def default_config(head_dim: int) -> LaunchConfig:
    """Untuned: spill-free on sm_90 for 16-bit dtypes at D <= 128
    (`python bench/attention.py --compile-report`)."""
    return LaunchConfig(64, 8 if head_dim >= 128 else 4, 2)


def candidates(head_dim: int) -> list[LaunchConfig]:
    """What the tuner tries: both query tiles, 4/8 warps, 2/3 stages (plus the default)."""
    out = [default_config(head_dim)]
    out += [LaunchConfig(bm, w, s) for bm in (64, 128) for w in (4, 8) for s in (2, 3)]
    return list(dict.fromkeys(out))


def shape_key(q, k, backward: bool) -> tuple:
    B, H, Nq, D = q.shape
    return (B * H, -(-Nq // 64), -(-k.shape[2] // 64), D, str(q.dtype), backward)


class Autotuner:
    """Per shape key, the fastest candidate by `timer(fn) -> seconds` (a candidate that fails to
    compile or launch, e.g. out of shared memory, is skipped)."""

    def __init__(self, timer: Callable[[Callable[[], object]], float]):
        self.timer = timer
        self.best: dict[tuple, LaunchConfig] = {}
        self.timings: dict[tuple, dict[LaunchConfig, float]] = {}

    def choose(self, key: tuple, options: list[LaunchConfig],
               run: Callable[[LaunchConfig], object]) -> LaunchConfig:
        if key not in self.best:
            times = {}
            for c in options:
                try:
                    times[c] = self.timer(lambda c=c: run(c))
                except Exception:  # noqa: BLE001 - a config this GPU cannot run is not a choice
                    continue
            if not times:
                raise RuntimeError(f"no launch configuration ran for shape {key}")
            self.timings[key] = times
            self.best[key] = min(times, key=times.get)
        return self.best[key]


def _cuda_timer(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20) / 1e3


_tuner: Autotuner | None = None


def set_autotune(on: bool, timer=None) -> None:
    """Turn per-shape tuning on (a fresh tuner; `timer` for tests) or off."""
    global _tuner
    _tuner = Autotuner(timer or _cuda_timer) if on else None


def tuner() -> Autotuner | None:
    return _tuner
