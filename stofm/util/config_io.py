"""YAML run configs: read a file into a mapping of keys, every failure one error naming the file."""
from __future__ import annotations

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
