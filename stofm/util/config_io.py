"""YAML run configs: read a file into a mapping of keys, every failure one error naming the file."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stofm.util.errors import InputError


class ConfigError(InputError):
    """A run config that cannot be used (unknown key, wrong type, malformed file)."""


def parse_yaml(path: str | Path, *, what: str) -> Any:
    """The parsed YAML of ``path`` (any type); a missing, malformed or binary file is one error naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{what} {path}: not valid YAML{line}: {getattr(err, 'problem', None) or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not a text file") from None


def load_yaml(path: str | Path, *, what: str = "train config") -> dict[str, Any]:
    """Read a run config file (``what`` names it in errors); a mapping of config keys."""
    raw = parse_yaml(path, what=what) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of keys, got {type(raw).__name__}")
    return raw


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, recursing into nested dicts (copies; inputs untouched)."""
    out = copy.deepcopy(dict(base))
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` (from JSON or YAML) is not of the annotated type ``hint``, or None when it is: ``bool``,
    ``int`` (no bool, no fraction), ``float`` (an int is fine), ``str``, ``dict``/``list`` (any contents), unions
    (``X | None``) and ``Any``; other hints are not checked."""
    import types
    import typing

    if hint is Any:
        return None
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        problems = [type_problem(value, h) for h in typing.get_args(hint)]
        return None if None in problems else " or ".join(p.removeprefix("not ") for p in problems).join(("not ", ""))
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,), dict: (dict,), list: (list, tuple),
                type(None): (type(None),)}.get(origin)
    if expected is None:
        return None
    ok = isinstance(value, expected) and not (origin in (int, float) and isinstance(value, bool))
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list", type(None): "null"}
    return None if ok else f"not {names[origin]}"


def check_field_types(cls: type, values: dict[str, Any], *, where: str) -> None:
    """:class:`ConfigError` naming the first key of ``values`` whose value does not match the annotation of the
    dataclass ``cls`` (``dropout: "high"`` for a float field), before anything is built from it; ``where`` names
    the config (a file, "model_overrides")."""
    import typing

    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        problem = type_problem(value, hints[key]) if key in hints else None
        if problem:
            raise ConfigError(f"{where}: {key}={value!r} is {problem}")
