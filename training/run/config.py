"""The one config loader of both trainers: typed dataclasses, filled from TOML and `--key value`.

Precedence: dataclass defaults < `base` (a resumed run's saved config) < `--config FILE.toml` <
command-line `--section.key value`. Values are checked against the dataclass annotations, so a
typo or a wrong type is an error naming the key, never a silently different run. No exec() or
import-based configurators: a config is data.

    cfg = load(TrainConfig, *parse_overrides(argv, TrainConfig))

Command-line values are TOML literals when they parse as one (`1e-4`, `true`, `[0.8, 0.99]`),
else strings (`data/corpus`). A bare `--flag` means true for a boolean field, and `--resume`
alone means "latest". Dotted keys reach into nested tables and dict fields
(`--optim.lr 1e-4`, `--model.decoder_dim 256`); integer parts index lists
(`--curriculum.stages.0.steps 100`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (pyproject: tomli)
    import tomli as tomllib

T = typing.TypeVar("T")

# Bare flags (no value) that mean something other than true.
_BARE_VALUES = {"resume": "latest"}


class ConfigError(ValueError):
    """A config that cannot be used as written; the message names the key and the problem."""


# ----------------------------------------------------------------------------- coercion
def _coerce(value, tp, where: str):
    """Check/convert a TOML or command-line value to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if tp is typing.Any:
        return value
    if tp is list or origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        if isinstance(value, str) and item is str:
            value = [value]  # `--train data/x`: the common one-entry case of a list of paths
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, item = typing.get_args(tp) or (str, typing.Any)
        return {k: _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for t in typing.get_args(tp):
            try:
                return _coerce(value, t, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e4 on the command line means 10000
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """An instance of dataclass `cls` from a dict; unknown keys are errors, missing ones defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in [{where or 'top level'}]; known: {sorted(names)}"
        )
    base = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}".lstrip("."))
        else:
            kwargs[f.name] = getattr(base, f.name)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- overrides
def _parse_value(text: str):
    """A command-line value: a TOML literal when it parses as one (1e-4, true, [0, 1]), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _field_type(cls, key: str):
    """The annotated type at dotted `key` of dataclass `cls`, or None where it is not a field."""
    tp = cls
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _set_path(data: dict, key: str, value) -> None:
    """data[a][b][c] = value for key "a.b.c"; integer parts index lists (curriculum.stages.0.steps)."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise ConfigError(f"--{key}: index {idx} out of range (have {len(node)})")
            node = node[idx]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() else {})
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if not -len(node) <= idx < len(node):
            raise ConfigError(f"--{key}: index {idx} out of range (have {len(node)})")
        node[idx] = value
    else:
        node[last] = value


def parse_overrides(argv: list[str], cls=None) -> tuple[str | None, list[tuple[str, object]]]:
    """Split argv into (--config path, [(dotted key, value)]). With the config class `cls`, a
    bare `--key` of a boolean field means true."""
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --key value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if has_value:
                val, i = argv[i + 1], i + 1
            elif key in _BARE_VALUES:
                val = _BARE_VALUES[key]
            elif cls is not None and _field_type(cls, key) is bool:
                val = "true"  # --compile alone switches it on
            else:
                raise ConfigError(f"--{key} needs a value")
        if key == "config":
            config_path = val
        else:
            pairs.append((key, _parse_value(val)))
        i += 1
    return config_path, pairs


# ----------------------------------------------------------------------------- loading
def merge(base: dict, new: dict) -> dict:
    """In place, recursively: tables update key by key (a partial `[loss_weights]` keeps the
    other weights); lists (e.g. curriculum stages) and values are replaced. Returns `base`."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from e


def load(cls: type[T], path: str | Path | None = None, overrides=(),
         base: dict | None = None) -> T:
    """Defaults <- `base` <- TOML file <- overrides, as a `cls` instance, then `cfg.validate()`.

    overrides: [(dotted key, value)] as `parse_overrides` returns them.
    """
    data = to_dict(cls())
    if base is not None:
        merge(data, base)
    if path is not None:
        merge(data, read_toml(path))
    for key, value in overrides:
        top = key.split(".")[0]
        if top not in data:
            raise ConfigError(f"unknown option --{key}; known: {sorted(data)}")
        _set_path(data, key, value)
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg
