"""Which licence covers a track, from its Debian package's copyright file.

Machine-readable (DEP-5) copyright files are parsed: the last `Files:` paragraph whose pattern
matches the track wins, as the format specifies. Patterns name paths in the *source* tree
(`base/music/x.ogg`) while we see installed paths (`/usr/share/games/ufoai/base/music/x.ogg`),
so a pattern is tried against every path suffix of the installed path.

Free-text copyright files get a regex guess, marked as such (`basis: "detected"`); packages we
have read by hand carry a curated answer in debian_music.KNOWN_PACKAGES instead. The copyright
file itself is always copied next to the corpus and referenced per track: the short name is a
convenience, the file is the reference.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass
class Dep5Paragraph:
    patterns: list[str]
    licence: str


def parse_dep5(text: str) -> list[Dep5Paragraph] | None:
    """Files paragraphs of a DEP-5 copyright file, in order; None if the file is not DEP-5."""
    if not text.lstrip().startswith("Format:"):
        return None
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:        # continuation line
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "files" in fields and "license" in fields:
            licence = fields["license"].split("\n", 1)[0].strip()
            paragraphs.append(Dep5Paragraph(fields["files"].split(), licence))
    return paragraphs


def dep5_licence(paragraphs: list[Dep5Paragraph], installed_path: str) -> str | None:
    """Licence of the last paragraph matching any suffix of `installed_path` (debian/* skipped)."""
    parts = PurePosixPath(installed_path).parts
    suffixes = ["/".join(parts[i:]) for i in range(len(parts)) if parts[i] != "/"]
    found = None
    for para in paragraphs:
        for pattern in para.patterns:
            if pattern.startswith("debian/"):
                continue
            if pattern == "*" or any(fnmatch.fnmatchcase(s, pattern) for s in suffixes):
                found = para.licence
                break
    return found


# Order matters only for the output string; each licence is reported once.
_PATTERNS = [
    (re.compile(r"(?:Attribution-ShareAlike|CC[- ]BY[- ]SA)[ -]?(\d\.\d)", re.I), "CC-BY-SA-{}"),
    (re.compile(r"(?:Attribution|CC[- ]BY)[ -](\d\.\d)(?![ -]?Share)", re.I), "CC-BY-{}"),
    (re.compile(r"CC0|Public Domain Dedication", re.I), "CC0-1.0"),
    (re.compile(r"GNU (?:Lesser|Library) General Public License[^.]{0,120}?version (\d(?:\.\d)?)"
                r"([^.]{0,80}?(?:any later|or later))?", re.I), "LGPL-{}{}"),
    (re.compile(r"GNU General Public License[^.]{0,120}?version (\d)"
                r"([^.]{0,80}?(?:any later|or later))?", re.I), "GPL-{}{}"),
    (re.compile(r"\bGPLv?(\d)(\+| or later)?", re.I), "GPL-{}{}"),
]


def detect_licences(text: str) -> list[str]:
    """Short names found in free text, e.g. ['CC-BY-SA-3.0', 'GPL-2+']. A guess, not a ruling."""
    flat = " ".join(text.split())
    found: list[str] = []
    for regex, template in _PATTERNS:
        for m in regex.finditer(flat):
            groups = list(m.groups())
            if len(groups) == 2:
                groups[1] = "+" if groups[1] else ""
            name = template.format(*groups)
            if name not in found:
                found.append(name)
    # "GPL-2" next to "GPL-2+" is the licence text's own title ("Version 2, June 1991") next
    # to the actual grant ("version 2 or later"): keep the grant.
    return [n for n in found if n + "+" not in found]
