"""Spectrogram sheets of audio for people to look at (the benchmarks' samples). Needs
matplotlib (`pip install 'snac-dit[bench]'`); nothing else in the project imports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def spectrogram_sheet(path: str | Path, rows: list[tuple[str, dict[str, np.ndarray]]],
                      sample_rate: int, mark_s: float | None = None,
                      fmax: float | None = None, nfft: int = 1024) -> bool:
    """A PNG with one row per (name, {column title: mono audio}) and one colour scale per row,
    so a row's panels compare; a dashed line at `mark_s` seconds (e.g. a join) if given.
    `fmax` zooms into 0..fmax Hz (with a longer `nfft`, partials show as lines).
    False, and nothing written, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = max(len(cols) for _, cols in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(4.3 * n_cols, 2.6 * len(rows)),
                             squeeze=False)
    for ax_row, (name, cols) in zip(axes, rows, strict=True):
        images, top = [], -np.inf
        for ax, (title, signal) in zip(ax_row, cols.items(), strict=False):
            pxx, *_, image = ax.specgram(signal, NFFT=nfft, Fs=sample_rate,
                                         noverlap=nfft * 3 // 4, cmap="magma")
            images.append(image)
            shown = pxx if fmax is None else pxx[: int(fmax / sample_rate * nfft) + 1]
            top = max(top, 10 * np.log10(shown.max() + 1e-30))
            if mark_s is not None:
                ax.axvline(mark_s, color="white", lw=0.8, ls="--")
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_ylim(0, fmax or sample_rate / 2)
            ax.set_xlabel("s" if mark_s is None else "s (dashed: the join)", fontsize=8)
            ax.set_ylabel("Hz", fontsize=8)
            ax.tick_params(labelsize=7)
        for image in images:
            image.set_clim(top - 100, top)
        for ax in ax_row[len(cols):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
