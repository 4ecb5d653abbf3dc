"""Imports go one way (DEVELOPERS.md): audio and model are the ground floor; server and training
build on them and never on each other; clients stand alone. Checked on the source, statically."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {  # package -> first-party packages it may import
    "audio": set(),
    "model": set(),
    "server": {"audio", "model"},
    "training": {"audio", "model"},
    "clients": set(),
}


def first_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                 and node.module else [])
        found |= {n.split(".")[0] for n in names} & set(ALLOWED)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layers(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = first_party_imports(path) - ALLOWED[package] - {package}
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert wrong == {}


def test_no_module_shadows_the_standard_library():
    import sys

    names = {p.stem for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py")} | {
        p.name for pkg in ALLOWED for p in (ROOT / pkg).rglob("*") if p.is_dir()}
    # Run as scripts, training/train.py and train_codec.py put training/ first on sys.path.
    top = {p.stem for p in (ROOT / "training").iterdir()}
    assert (names | top) & sys.stdlib_module_names - {"__init__", "__main__"} == set()
