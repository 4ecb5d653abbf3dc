"""Observability for training: JSONL metrics, optional TensorBoard, throughput and MFU.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s. The trainer counts each
batch's model FLOPs itself (for the DiT: `model.flops.train_flops`, the matmuls it really runs,
attention over the layout's visible pairs) and hands them to `Throughput.add`. Peak is the
dense bf16 tensor-core figure of the device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Dense (no 2:4 sparsity) bf16 peak TFLOP/s per device, by a substring of the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # unmarked names are SXM boards in practice
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "4090": 165.0,
}


def peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s per device: the configured figure, a table guess on CUDA, None on CPU."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class Throughput:
    """Tokens/s and MFU over a window of steps (reset at each log)."""

    def __init__(self, peak: float | None, world_size: int = 1):
        self.peak, self.world = peak, world_size
        self.reset()

    def reset(self) -> None:
        self.t0, self.tokens, self.flops = time.perf_counter(), 0, 0.0

    def add(self, tokens: int, flops: float) -> None:
        """A (micro-)batch of `tokens` sequence tokens costing `flops` model FLOPs."""
        self.tokens += tokens
        self.flops += flops

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt  # this rank's tokens/s
        out = {"tokens_per_s": tps * self.world, "seconds": dt}  # seconds: the window's wall time
        # MFU is per device: this rank's FLOP/s over one device's peak.
        out["mfu"] = (self.flops / dt) / self.peak if self.peak else None
        return out


METRICS_FILE = "metrics.jsonl"  # in a run directory; export also ships it with the weights


def copy_metrics(src: Path, dst: Path, up_to_step: int) -> int:
    """Copy the rows of the metrics log `src` logged at or before `up_to_step` to `dst` (export
    ships them with the weights, a warm start carries them on); returns how many."""
    rows = [line for line in src.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= up_to_step]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(line + "\n" for line in rows))
    return len(rows)


class MetricsLog:
    """Appends one JSON object per line to {run_dir}/metrics.jsonl (+ TensorBoard scalars)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        self.file = self.path.open("a", buffering=1)  # line-buffered: a crash loses no lines
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "log.tensorboard = true needs the tensorboard package: "
                    "pip install 'snac-dit[tensorboard]' (or pip install tensorboard)"
                ) from e
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, kind: str, values: dict) -> None:
        row = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
