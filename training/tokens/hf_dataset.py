"""Songs from a Hugging Face `datasets` dataset, as a folder of audio files the tokeniser reads.

    source: a `save_to_disk` directory (Dataset or DatasetDict), or a hub id (streamed, so a
            large dataset never has to fit on disk twice: each row is written as it arrives)

Rows are written as their original encoded bytes (`Audio(decode=False)`: no decoding library
beyond libsndfile is needed, and nothing is re-encoded), named `{row:06d}-{name}{ext}` so a
re-run skips what is there. A local `audiofolder` dataset is a folder of audio already: pass
the folder itself. Needs the optional `datasets` package (`pip install snac-dit[hf]`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from audio import is_audio_name

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DatasetSourceError(RuntimeError):
    """The dataset cannot be read as asked (missing package, unknown id, no audio column)."""


def is_saved_dataset(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / m).is_file() for m in SAVED_MARKERS)


def looks_like_hub_id(source: str) -> bool:
    return not Path(source).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


@dataclass
class Materialised:
    written: int = 0
    kept: int = 0            # already there from an earlier run
    failed: list[str] = field(default_factory=list)


def _open(source: str, split: str):
    try:
        import datasets
    except ImportError as e:
        raise DatasetSourceError(
            "reading a Hugging Face dataset needs the `datasets` package: "
            "pip install 'snac-dit[hf]' (or pip install datasets)") from e
    try:
        if is_saved_dataset(source):
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetSourceError(f"{source} has splits {sorted(ds)}, not {split!r}; "
                                             "pick one with --split")
                ds = ds[split]
            return ds, len(ds)
        ds = datasets.load_dataset(source, split=split, streaming=True)
        return ds, None
    except DatasetSourceError:
        raise
    except Exception as e:  # offline, unknown id, private repo, corrupt files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DatasetSourceError(
            f"could not open the dataset {source!r} (split {split!r}): {type(e).__name__}: "
            f"{reason}. A hub id needs the network (HF_HUB_OFFLINE=1 uses the cache); a local "
            "dataset is a save_to_disk directory or a folder of audio files") from e


def _audio_column(ds, wanted: str | None) -> str:
    import datasets

    features = getattr(ds, "features", None) or {}
    audio = [name for name, f in features.items() if isinstance(f, datasets.Audio)]
    if wanted is not None:
        if features and wanted not in features:
            raise DatasetSourceError(f"no column {wanted!r}; the dataset has {sorted(features)}")
        return wanted
    if audio:
        return audio[0]
    if "audio" in features or not features:
        return "audio"
    raise DatasetSourceError(f"no audio column among {sorted(features)}; name it with "
                             "--audio-column")


def _file_name(row: int, path: str | None) -> str:
    stem, ext = os.path.splitext(os.path.basename(path or ""))
    stem = re.sub(r"[^\w.-]+", "_", stem)[:60] or "song"
    return f"{row:06d}-{stem}{ext.lower() if is_audio_name('x' + ext) else '.wav'}"


def materialise(source: str, out_dir: str | Path, split: str = "train",
                column: str | None = None, progress: bool = True) -> Materialised:
    """Write every row's audio under `out_dir`; returns what was written, kept and failed."""
    import datasets
    from tqdm import tqdm

    ds, total = _open(source, split)
    col = _audio_column(ds, column)
    ds = ds.cast_column(col, datasets.Audio(decode=False))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {p.name.split("-", 1)[0] for p in out.iterdir() if not p.name.startswith(".")}  # row ids
    result = Materialised()
    rows = ds.select_columns([col]) if hasattr(ds, "select_columns") else ds
    for i, row in enumerate(tqdm(rows, total=total, desc="dataset", unit="song",
                                 disable=not progress, file=sys.stderr)):
        if f"{i:06d}" in done:
            result.kept += 1
            continue
        value = row[col] or {}
        data, path = value.get("bytes"), value.get("path")
        target = out / _file_name(i, path)
        tmp = target.with_name(f".{target.name}.tmp")
        if data:
            tmp.write_bytes(data)
        elif path and os.path.isfile(path):
            shutil.copyfile(path, tmp)
        else:
            result.failed.append(f"row {i}: no audio bytes and no readable file ({path!r})")
            continue
        os.replace(tmp, target)
        result.written += 1
    return result
