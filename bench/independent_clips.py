"""The independent evaluation clips: 24 pieces of music that no corpus track comes from (8 each
from the Debian packages naev-data, hedgewars-data and widelands-data), 18.432 s from the middle
of each named track, resampled to 32 kHz, written as FLAC named PACKAGE-TRACK.flac.

    apt-get download naev-data hedgewars-data widelands-data
    for d in *.deb; do dpkg -x "$d" root/; done
    python bench/independent_clips.py --root root --out /tmp/indep_eval
    python bench/eval_codec.py --codec DIR --audio /tmp/indep_eval --seconds 18.432 --segments 1

The track names are fixed (the set every independent figure in docs/ and the model cards was
measured on), so the clips are the same wherever they are rebuilt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRACKS = {
    "hedgewars": ("usr/share/games/hedgewars/Data/Music",
                  ["Art", "Castle", "Desert", "Fruit", "Nature", "Sheep", "main_theme", "pirate"]),
    "naev": ("usr/share/naev/dat/snd/music",
             ["agriculture", "ambiphonic", "combat1", "empire1", "intrigue", "machina", "peace2",
              "snow"]),
    "widelands": ("usr/share/games/widelands/data/music",
                  [f"ingame_{i:02d}" for i in (0, 3, 7, 11, 15, 19, 23, 27)]),
}
SECONDS = 18.432
SAMPLE_RATE = 32000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="where the three packages were extracted")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import librosa
    import numpy as np
    import soundfile as sf

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    missing = []
    for package, (folder, names) in TRACKS.items():
        for name in names:
            src = next((f for f in sorted((Path(a.root) / folder).glob(name + ".*"))
                        if f.suffix in (".ogg", ".flac", ".wav")), None)
            if src is None:
                missing.append(f"{package}: {folder}/{name}.*")
                continue
            x, sr = sf.read(src, dtype="float32", always_2d=True)
            x = x.mean(axis=1)
            if sr != SAMPLE_RATE:
                x = librosa.resample(x, orig_sr=sr, target_sr=SAMPLE_RATE).astype(np.float32)
            n = int(SECONDS * SAMPLE_RATE)
            if len(x) < n:
                missing.append(f"{package}: {src} is shorter than {SECONDS} s")
                continue
            start = (len(x) - n) // 2
            sf.write(out / f"{package}-{name}.flac", x[start:start + n], SAMPLE_RATE)
    if missing:
        print("not found under --root (extract naev-data, hedgewars-data and widelands-data "
              "there):\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    print(f"{sum(len(n) for _, n in TRACKS.values())} clips in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
