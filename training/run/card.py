"""What both model cards (training/codec/card.py, training/dit/card.py) take from a run: the
corpus's data + licence table, and training time counted at quiet-machine speed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def quiet_hours(windows: list[tuple[float, float]]) -> float:
    """Hours that log windows of (steps, wall seconds) took. A window slower per step than
    three times the median (the run was paused with SIGSTOP while tests ran, or shared the
    cores) is counted at the median speed, so the figure is what the steps cost on a quiet
    machine, not the wall time of the sessions."""
    rates = [sec / steps for steps, sec in windows if steps > 0 and sec > 0]
    if not rates:
        return 0.0
    med = statistics.median(rates)
    return sum(steps * (sec / steps if sec / steps < 3 * med else med)
               for steps, sec in windows if steps > 0 and sec > 0) / 3600


def corpus_table(corpus: Path) -> tuple[list[str], dict[str, dict]]:
    """Markdown rows (package, tracks, hours, licences) of a corpus built by
    `training.corpus.debian_music`, and its kept tracks by file name."""
    summary = json.loads((corpus / "summary.json").read_text())
    lines = ["| package | tracks | hours | licences (tracks) |", "|---|---|---|---|"]
    for name, pkg in sorted(summary["packages"].items()):
        lic = ", ".join(f"{k} x{v}" for k, v in sorted(pkg["licences"].items()))
        lines.append(f"| {name} | {pkg['kept']} | {pkg['hours']:.2f} | {lic} |")
    lines.append(f"| **total** | **{summary['kept']}** | **{summary['total_hours']:.2f}** | |")
    by_file = {}
    for line in (corpus / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("status") == "kept":
            by_file[Path(row["output_path"]).name] = row
    return lines, by_file


LICENCE_NOTE = (
    "The audio is not distributed with the weights. These weights were trained on GPL-2+, "
    "GPL-3+, CC-BY-3.0, CC-BY-SA-3.0 and public-domain music; whether weights are a derivative "
    "work of their training data is unsettled — if you redistribute them, keep this card with "
    "them.")
