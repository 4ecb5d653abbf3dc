"""The commands pyproject installs: each is registered as declared and answers --help.

`make install` puts them in the environment's bin directory; the documented script forms
(`python training/train.py`, `python -m training.tokens`, ...) are tested with their tools.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.run.config import tomllib

ROOT = Path(__file__).resolve().parent.parent
DECLARED = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _installed() -> dict[str, str]:
    try:
        dist = md.distribution("snac-dit")
    except md.PackageNotFoundError:
        pytest.skip("snac-dit is not installed in this Python (make install does it)")
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}


def test_every_declared_command_is_installed_and_loads():
    assert _installed() == DECLARED
    for name, target in DECLARED.items():
        module, _, func = target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func)), name


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_command_answers_help(name):
    _installed()
    exe = Path(sys.executable).parent / name
    assert exe.is_file(), f"{exe} missing: reinstall (make install)"
    r = subprocess.run([str(exe), "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in (r.stdout + r.stderr).lower()


def test_the_image_copies_every_package():
    """The Dockerfile copies the source tree package by package; a new top-level package (as
    audio/ was) must be among them or the image cannot import it."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = {line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") and len(line.split()) == 3}
    assert packages <= copied, sorted(packages - copied)
    assert all((ROOT / p / "__init__.py").is_file() for p in packages)
