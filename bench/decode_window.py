"""Codec decode time against the length of the token window decoded (CPU or GPU).

    python bench/decode_window.py --codec demo --threads 2

Serving decodes each piece of audio from its own tokens plus LEFT_PADS / HOLDBACK_PADS padding
units around them (model/engine.py), instead of from the whole 12.288 s context; the output is
the same (tests/test_engine.py). This measures what that saves. `--codec demo` is the demo
codec's architecture with random weights (speed does not depend on them), `snac32k` the released
one, or a codec directory. Median of `--repeats` decodes after one warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from model.codec import SNAC_32KHZ_CONFIG, Codec  # noqa: E402
from model.engine import HOLDBACK_PADS, LEFT_PADS  # noqa: E402

CODECS = {"demo": dict(SNAC_32KHZ_CONFIG, encoder_dim=16, decoder_dim=256, codebook_size=1024),
          "snac32k": SNAC_32KHZ_CONFIG}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", default="demo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    codec = Codec.load(CODECS.get(a.codec, a.codec), device=a.device)
    F, pad = codec.frames_per_chunk, codec.pad_frames[0]
    g = torch.Generator().manual_seed(0)
    tok = [torch.randint(0, codec.codebook_size, (1, 4 * f), generator=g) for f in F]

    def seconds(frames0: int) -> float:
        window = [t[:, : frames0 * f // F[0]] for t, f in zip(tok, F, strict=True)]
        times = []
        for _ in range(a.repeats + 1):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            codec.decode(window, seed=1)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor()
    print(f"# codec {a.codec}, device {a.device} ({name or platform.machine()}), "
          f"{a.threads} threads, torch {torch.__version__}")
    rows = [
        (3 * F[0], "3 chunks: a chunk with its whole 12.288 s context (before)"),
        (4 * F[0], "4 chunks: that plus a held-back chunk"),
        (F[0] + LEFT_PADS * pad, f"1 chunk + {LEFT_PADS} pads: /continue now"),
        (F[0] + (LEFT_PADS + HOLDBACK_PADS) * pad,
         f"1 chunk + {LEFT_PADS + HOLDBACK_PADS} pads: each later /extend piece now"),
    ]
    for frames0, label in rows:
        s = frames0 * codec.strides[0] * codec.hop_length / codec.sample_rate
        print(f"{seconds(frames0):6.2f} s  window {s:6.3f} s  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
