"""Build a 32 kHz mono music corpus from Debian's openly licensed game-music packages.

    sudo apt-get install wesnoth-1.16-music ufoai-music warzone2100-music \
        planetblupi-music-ogg nexuiz-music singularity-music
    python -m training.corpus.debian_music data/corpus            # installed packages, root /

    # or without installing: extract the .debs, one directory per package or all in one tree
    apt-get download ufoai-music ...; for d in *.deb; do dpkg -x "$d" src/; done
    python -m training.corpus.debian_music data/corpus --root src/

Which files belong to a package: dpkg's file list (ROOT/var/lib/dpkg/info/PKG.list) when the
package is installed; else ROOT/PKG/ if each .deb was extracted into its own directory; else
the package's known install paths (KNOWN_PACKAGES) under ROOT. Tracks inside .pk3/.zip archives
(ufoai-music, nexuiz-music) are read from the archive; their original path is `ARCHIVE!/MEMBER`.

Per track: keep it if it lasts >= --min-seconds (30), drop byte-identical and decoded-identical
duplicates (sha256 of the file bytes; sha256 of the 16-bit 32 kHz mono PCM after downmix and
soxr resampling), write OUT/audio/PKG/NAME-HASH.flac (or .opus: Ogg Opus at 48 kHz, the lowest
Opus rate libsndfile writes above 32 kHz; or .ogg Vorbis at 32 kHz), and append a line to
OUT/manifest.jsonl with package, original path, duration, licence and output path. Every
package's copyright file is copied to OUT/licences/PKG/. Re-running resumes: tracks already in
the manifest are skipped, and an output file is always complete before its manifest line.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from audio import is_audio_name
from training.corpus.licences import dep5_licence, detect_licences, parse_dep5

SAMPLE_RATE = 32000
ARCHIVE_EXTENSIONS = {".pk3", ".zip"}
LOCAL_LICENCE_RE = re.compile(r"^(licen[cs]e|copying|copyright)(\.txt|\.md)?$", re.I)
FORMATS = {  # name -> (extension, libsndfile format, subtype, file sample rate)
    "flac": (".flac", "FLAC", "PCM_16", SAMPLE_RATE),
    "opus": (".opus", "OGG", "OPUS", 48000),  # libsndfile's Opus refuses 32 kHz
    "vorbis": (".ogg", "OGG", "VORBIS", SAMPLE_RATE),
}

# Read by hand (bookworm versions). `licence` is set where the copyright file is free text;
# DEP-5 files are parsed per track instead.
KNOWN_PACKAGES = {
    "wesnoth-1.16-music": dict(paths=["usr/share/games/wesnoth/1.16/data/core/music"],
                               licence="GPL-2+"),
    "ufoai-music": dict(paths=["usr/share/games/ufoai/base/0music.pk3"]),     # DEP-5, per file
    "warzone2100-music": dict(paths=["usr/share/games/warzone2100/music"]),  # DEP-5 + album files
    "planetblupi-music-ogg": dict(paths=["usr/share/planetblupi/music"]),    # DEP-5
    "nexuiz-music": dict(paths=["usr/share/games/nexuiz/data/music.pk3"], licence="GPL-2+"),
    # Free-text CC BY-SA licence; README: "released under the same BY-SA 3.0 license".
    "singularity-music": dict(paths=["usr/share/games/singularity/music"], licence="CC-BY-SA-3.0"),
}


@dataclass(frozen=True)
class Track:
    package: str
    original_path: str      # as installed: /usr/share/..., or /usr/.../x.pk3!/music/y.ogg
    file: str               # real path under --root (the archive, for archive members)
    member: str | None = None


# ---------------------------------------------------------------- finding tracks


def package_root(root: Path, package: str) -> Path:
    """ROOT/PKG when the .deb was extracted into its own directory, else ROOT."""
    own = root / package
    return own if (own / "usr").is_dir() else root


def package_files(root: Path, package: str) -> list[Path] | None:
    """Files (real paths) belonging to `package`, or None if it is not present under root."""
    for name in (f"{package}.list", f"{package}:all.list"):
        lst = root / "var/lib/dpkg/info" / name
        if lst.is_file():
            paths = [root / line.lstrip("/") for line in lst.read_text().splitlines() if line]
            return sorted(p for p in paths if p.is_file())
    proot = package_root(root, package)
    if proot != root:
        return sorted(p for p in proot.rglob("*") if p.is_file())
    known = KNOWN_PACKAGES.get(package)
    if known is None:
        return None
    files = []
    for rel in known["paths"]:
        p = root / rel
        files += [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sorted(files) or None


def installed_path(real: Path, proot: Path) -> str:
    return "/" + real.relative_to(proot).as_posix()


def find_tracks(root: Path, package: str, files: list[Path]) -> list[Track]:
    proot = package_root(root, package)
    tracks = []
    for f in files:
        suffix = f.suffix.lower()
        if is_audio_name(f):
            tracks.append(Track(package, installed_path(f, proot), str(f)))
        elif suffix in ARCHIVE_EXTENSIONS:
            with zipfile.ZipFile(f) as z:
                for m in sorted(z.namelist()):
                    if is_audio_name(m):
                        tracks.append(Track(package, f"{installed_path(f, proot)}!/{m}", str(f), m))
    return tracks


# ---------------------------------------------------------------- licences


class PackageLicence:
    """The copyright file of one package (copied into OUT/licences/PKG/) and per-track lookup."""

    def __init__(self, root: Path, package: str, out: Path):
        self.package = package
        self.source = f"/usr/share/doc/{package}/copyright"
        src = package_root(root, package) / self.source.lstrip("/")
        self.text = src.read_text(errors="replace") if src.is_file() else ""
        self.file = None
        if self.text:
            dest = out / "licences" / package / "copyright"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(self.text)
            self.file = dest.relative_to(out).as_posix()
        self.dep5 = parse_dep5(self.text)
        self.curated = KNOWN_PACKAGES.get(package, {}).get("licence")
        self.out = out

    def for_track(self, track: Track) -> dict:
        # Archive members are mounted by the game at the archive's directory: match on that.
        path = track.original_path
        if track.member is not None:
            path = str(Path(path.split("!/")[0]).parent / track.member)
        if self.curated:
            licence, basis = self.curated, "curated"
        elif self.dep5 is not None:
            licence, basis = dep5_licence(self.dep5, path) or "unknown", "dep5"
        elif self.text:
            licence, basis = " / ".join(detect_licences(self.text)) or "unknown", "detected"
        else:
            licence, basis = "unknown (no copyright file)", "none"
        row = dict(licence=licence, licence_basis=basis, licence_file=self.file,
                   licence_source=self.source if self.text else None)
        extra = self._local_licence(track)
        if extra:
            row.update(extra)
        return row

    def _local_licence(self, track: Track) -> dict | None:
        """A licence file next to the track (warzone2100's albums ship their own)."""
        if track.member is not None:
            return None
        for f in sorted(Path(track.file).parent.iterdir()):
            if f.is_file() and LOCAL_LICENCE_RE.match(f.name):
                rel = track.original_path.rsplit("/", 1)[0].lstrip("/") + "/" + f.name
                dest = self.out / "licences" / self.package / rel.replace("/", "__")
                if not dest.exists():
                    dest.write_bytes(f.read_bytes())
                found = detect_licences(f.read_text(errors="replace"))
                return dict(track_licence=" / ".join(found) or "see file",
                            track_licence_file=dest.relative_to(self.out).as_posix())
        return None


# ---------------------------------------------------------------- decoding (worker processes)


def read_track_bytes(track: Track) -> bytes:
    if track.member is None:
        return Path(track.file).read_bytes()
    with zipfile.ZipFile(track.file) as z:
        return z.read(track.member)


def process_track(track: Track, fmt: str, min_seconds: float) -> dict:
    """Decode, downmix, resample, hash and encode one track. Runs in a worker process."""
    try:
        data = read_track_bytes(track)
        res: dict = dict(source_sha256=hashlib.sha256(data).hexdigest())
        info = sf.info(io.BytesIO(data))
        res.update(source_rate=info.samplerate, channels=info.channels)
        if info.frames / info.samplerate < min_seconds:   # cheap: no decode for short tracks
            return dict(res, status="short", duration_s=round(info.frames / info.samplerate, 3))
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (T, C)
    except (OSError, RuntimeError, ValueError, zipfile.BadZipFile, sf.LibsndfileError) as e:
        return dict(status="error", error=f"{type(e).__name__}: {e}")
    mono = audio.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    pcm = np.clip(np.round(mono * 32767), -32768, 32767).astype(np.int16)    # what we store
    res.update(duration_s=round(len(pcm) / SAMPLE_RATE, 3),
               pcm_sha256=hashlib.sha256(pcm.tobytes()).hexdigest())
    if len(pcm) < min_seconds * SAMPLE_RATE:
        return dict(res, status="short")
    if np.abs(pcm).max() < 4:   # below -78 dBFS: nothing a codec can learn from
        return dict(res, status="silent")
    _, fmt_name, subtype, file_rate = FORMATS[fmt]
    out = pcm if file_rate == SAMPLE_RATE else soxr.resample(
        pcm.astype(np.float32) / 32768, SAMPLE_RATE, file_rate, quality="HQ")
    buf = io.BytesIO()
    sf.write(buf, out, file_rate, format=fmt_name, subtype=subtype)
    return dict(res, status="kept", encoded=buf.getvalue())


def _process(args):
    return process_track(*args)


# ---------------------------------------------------------------- the build


def load_manifest(path: Path) -> list[dict]:
    """Rows of an existing manifest. A last line cut by a crash mid-write is removed from the
    file (its track is simply redone), so the next append starts on a fresh line."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def output_name(track: Track, pcm_sha256: str, ext: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(track.member or track.file).stem).strip("_")
    return f"audio/{track.package}/{stem}-{pcm_sha256[:10]}{ext}"


def build(out: Path, root: Path, packages: list[str], fmt: str = "flac",
          min_seconds: float = 30.0, jobs: int = 1, progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "corpus.json"
    meta = dict(sample_rate=SAMPLE_RATE, format=fmt, min_seconds=min_seconds)
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != meta:
            raise ValueError(f"{out} was built with {old}; this run asks for {meta}. "
                             "Use another OUT_DIR or the same options.")
    meta_path.write_text(json.dumps(meta, indent=2))

    manifest_path = out / "manifest.jsonl"
    rows = load_manifest(manifest_path)
    done = {(r["package"], r["original_path"]) for r in rows}
    seen_src = {r["source_sha256"]: r["original_path"] for r in reversed(rows) if r.get("source_sha256")}
    seen_pcm = {r["pcm_sha256"]: r["original_path"] for r in reversed(rows)
                if r.get("status") == "kept"}

    licences, tracks, missing = {}, [], []
    for pkg in packages:
        files = package_files(root, pkg)
        if files is None:
            missing.append(pkg)
            continue
        licences[pkg] = PackageLicence(root, pkg, out)
        tracks += find_tracks(root, pkg, files)
    if missing:
        print(f"warning: not found under {root}: {' '.join(missing)} (apt-get install them, or "
              f"apt-get download + dpkg -x into --root)", file=sys.stderr)
    todo = [t for t in tracks if (t.package, t.original_path) not in done]
    print(f"{len(tracks)} tracks in {len(licences)} packages; {len(tracks) - len(todo)} done "
          f"before, {len(todo)} to process", file=sys.stderr)

    ext = FORMATS[fmt][0]
    args = [(t, fmt, min_seconds) for t in todo]
    pool = ProcessPoolExecutor(jobs) if jobs > 1 and len(todo) > 1 else None
    results = pool.map(_process, args) if pool else map(_process, args)
    with open(manifest_path, "a") as mf:
        for track, res in tqdm(zip(todo, results, strict=True), total=len(todo), disable=not progress,
                               desc="tracks", unit="track"):
            row = dict(package=track.package, original_path=track.original_path)
            row.update(licences[track.package].for_track(track))
            encoded = res.pop("encoded", None)
            row.update(res)
            src = res.get("source_sha256")
            if src and src in seen_src:
                row.update(status="duplicate", duplicate_of=seen_src[src], duplicate_kind="bytes")
            elif row["status"] == "kept" and res["pcm_sha256"] in seen_pcm:
                row.update(status="duplicate", duplicate_of=seen_pcm[res["pcm_sha256"]],
                           duplicate_kind="decoded")
            elif row["status"] == "kept":
                name = output_name(track, res["pcm_sha256"], ext)
                dest = out / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.tmp")
                tmp.write_bytes(encoded)
                os.replace(tmp, dest)               # complete file before its manifest line
                row.update(output_path=name, sample_rate=FORMATS[fmt][3])
                seen_pcm[res["pcm_sha256"]] = track.original_path
            if src:
                seen_src.setdefault(src, track.original_path)
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            rows.append(row)
    if pool:
        pool.shutdown()
    summary = summarise(rows, missing)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarise(rows: list[dict], missing: list[str]) -> dict:
    per: dict = defaultdict(lambda: dict(kept=0, seconds=0.0, duplicate=0, short=0, silent=0,
                                         error=0, licences=defaultdict(int)))
    for r in rows:
        p = per[r["package"]]
        p[r["status"]] = p.get(r["status"], 0) + 1
        if r["status"] == "kept":
            p["seconds"] += r["duration_s"]
            lic = r["licence"] + (f" (track dir: {r['track_licence']})" if r.get("track_licence") else "")
            p["licences"][lic] += 1
    packages = {k: dict(v, seconds=round(v["seconds"], 3), hours=round(v["seconds"] / 3600, 3),
                        licences=dict(v["licences"])) for k, v in sorted(per.items())}
    total = sum(p["seconds"] for p in packages.values())
    return dict(total_hours=round(total / 3600, 3), total_seconds=round(total, 3),
                kept=sum(p["kept"] for p in packages.values()), packages=packages,
                missing=missing)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.corpus.debian_music",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--root", type=Path, default=Path("/"),
                   help="filesystem root: / for installed packages, or where .debs were dpkg -x'ed")
    p.add_argument("--packages", default=",".join(KNOWN_PACKAGES),
                   help="comma-separated package names (default: all known)")
    p.add_argument("--format", choices=sorted(FORMATS), default="flac",
                   help="flac (32 kHz, lossless), opus (compact; 48 kHz file), vorbis (32 kHz)")
    p.add_argument("--min-seconds", type=float, default=30.0)
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    packages = [s.strip() for s in a.packages.split(",") if s.strip()]
    try:
        summary = build(a.out_dir, a.root, packages, a.format, a.min_seconds, a.jobs,
                        not a.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in summary["packages"].items():
        lic = "; ".join(f"{k} x{v}" for k, v in s["licences"].items())
        print(f"{name:24s} {s['kept']:4d} kept {s['hours']:7.2f} h  dup {s['duplicate']:3d}  "
              f"short {s['short']:3d}  err {s['error']:2d}  licence: {lic}")
    print(f"total: {summary['kept']} tracks, {summary['total_hours']:.2f} h -> {a.out_dir}")
    return 0 if summary["kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
