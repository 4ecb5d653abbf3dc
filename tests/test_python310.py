"""Python 3.10, the oldest version pyproject allows, without a 3.10 interpreter at hand.

No 3.10 can be installed here (Debian bookworm ships 3.11, and interpreters do not come from
the package registries), so these are the checks of what would break there: syntax newer than
3.10, standard-library names added later, used outside a fallback, and every module imported
with the one fallback the code has (tomllib -> tomli) taking effect.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("audio", "model", "server", "training", "clients")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")) + sorted(
    (ROOT / "bench").glob("*.py"))

# Standard-library modules and names that appeared after 3.10, as far as this code could use them.
NEWER_MODULES = {"tomllib", "wsgiref.types"}
NEWER_NAMES = {
    "typing": {"Self", "Unpack", "LiteralString", "Never", "assert_never", "assert_type",
               "reveal_type", "TypeVarTuple", "Required", "NotRequired", "dataclass_transform",
               "override", "TypeIs", "ReadOnly", "get_overloads", "clear_overloads"},
    "datetime": {"UTC"},
    "enum": {"StrEnum", "ReprEnum", "verify", "member", "nonmember", "global_enum"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner", "Barrier"},
    "contextlib": {"chdir"},
    "hashlib": {"file_digest"},
    "itertools": {"batched"},
    "operator": {"call"},
}
NEWER_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _guarded(node: ast.AST, parents: dict) -> bool:
    """Inside `try: ... except ImportError/ModuleNotFoundError` or `if TYPE_CHECKING:`."""
    child, node = node, parents.get(node)
    while node is not None:
        if isinstance(node, ast.Try) and child in node.body:
            names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if names & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)"}:
                return True
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return child in node.body
        child, node = node, parents.get(node)
    return False


def _newer_uses(tree: ast.AST) -> list[str]:
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name in NEWER_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            bad = [node.module] if node.module in NEWER_MODULES else [
                f"{node.module}.{a.name}" for a in node.names
                if a.name in NEWER_NAMES.get(node.module, ())]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            bad = [f"{node.value.id}.{node.attr}"] if node.attr in NEWER_NAMES.get(
                node.value.id, ()) else []
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            bad = [node.id] if node.id in NEWER_BUILTINS else []
        else:
            continue
        if bad and not _guarded(node, parents):
            found += [f"line {node.lineno}: {b}" for b in bad]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_parses_as_python_310_and_uses_only_its_standard_library(path):
    source = path.read_text()
    tree = ast.parse(source, str(path), feature_version=(3, 10))  # SyntaxError: 3.11+ syntax
    assert _newer_uses(tree) == [], f"{path.relative_to(ROOT)} uses names newer than 3.10"


def test_the_check_catches_what_it_is_for():
    newer = ast.parse("import tomllib\nfrom typing import Self\nx = datetime.UTC\n")
    assert len(_newer_uses(newer)) == 3
    fallback = ast.parse("try:\n    import tomllib\nexcept ModuleNotFoundError:\n"
                         "    import tomli as tomllib\n")
    assert _newer_uses(fallback) == []
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))


def test_every_module_imports_with_the_310_fallbacks():
    """tomllib hidden (as on 3.10), tomli provided by the same parser: every module imports and
    both trainers' configs load."""
    modules = sorted({".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                      for p in SOURCES if p.parts[-2] != "bench" and p.name != "__main__.py"})
    code = ("import importlib, sys, tomllib; sys.modules['tomli'] = tomllib; "
            "sys.modules['tomllib'] = None\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "import training.dit.config as c, training.codec.config as cc\n"
            "c.load_config('training/configs/debug.toml', [])\n"
            "cc.load_config('training/configs/codec_demo.toml', [])\n"
            "print('imported', len(sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("imported")
