"""The one error base (``stofm.util.errors``) and what the commands print (``stofm.util.cli_errors``): a user's
mistake is one line, a bug keeps its traceback and asks to be reported, ``--debug`` raises."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import stalign
import stofm
from stofm.util import errors

REPO = Path(__file__).resolve().parents[1]


def _project_modules():
    for package in (stalign, stofm):
        yield package.__name__
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            if not info.name.endswith("__main__"):
                yield info.name


def test_every_exception_class_derives_from_the_base():
    """A new exception class without ``StalignError`` (stofm's: ``StofmError``) fails here. Warnings are not
    errors, and ``BaseException``-only signals (``prep_signals.Terminated``, a ``SystemExit``) are not caught as
    errors: both keep their own bases."""
    missing, checked, skipped = [], [], []
    for name in _project_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a module of an optional dependency that is not installed here
            if (err.name or "").split(".")[0] in ("stalign", "stofm"):
                raise
            skipped.append(f"{name}: {err}")
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, Exception) or issubclass(cls, Warning):
                continue
            checked.append(f"{name}.{cls.__qualname__}")
            in_stofm = name.startswith("stofm.") and not name.startswith("stofm.util.")
            base = errors.StofmError if in_stofm else errors.StalignError
            if not issubclass(cls, base):
                missing.append(f"{name}.{cls.__qualname__} does not derive from {base.__name__}")
    assert not missing, "\n".join(missing)
    assert len(checked) >= 20, checked  # the walk found the project's classes
    assert "stalign.data.errors.DataPrepError" in checked


def test_the_classes_keep_their_builtin_parents():
    from stalign.data.errors import CoordinateError, DataPrepError, PixelSizeError
    from stalign.training import NonFiniteLossError
    from stofm.subslice import CoordinateError as StofmCoordinateError
    from stofm.util.config_io import ConfigError

    assert stalign.StalignError is stofm.StalignError is errors.StalignError
    assert issubclass(stofm.StofmError, stalign.StalignError)
    assert CoordinateError is StofmCoordinateError is errors.CoordinateError  # one class, shared
    assert NonFiniteLossError is errors.NonFiniteLossError
    assert issubclass(NonFiniteLossError, RuntimeError)
    for cls in (CoordinateError, DataPrepError, PixelSizeError, ConfigError, errors.InputError):
        assert issubclass(cls, ValueError) and issubclass(cls, errors.StalignError), cls
    assert issubclass(errors.MissingDependencyError, ImportError)
    assert issubclass(errors.SetupError, RuntimeError)


def test_a_user_error_is_one_line(tmp_path, capsys):
    from stalign.cli import main

    (tmp_path / "bad.yaml").write_text("bogus_key: 1\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("stalign train: error: unknown train config key 'bogus_key'"), err


def test_a_missing_file_is_one_line(tmp_path, capsys):
    from stofm.cli import main

    assert main(["embed", str(tmp_path / "none.h5ad"), "--model", "stofm-tiny", "--out", str(tmp_path / "o.h5ad")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.h5ad" in err and "Traceback" not in err, err


def _broken(exc: BaseException):
    def func(args):
        raise exc
    return func


def _stalign_args(exc: BaseException, *extra: str):
    from stalign.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--config", "x.yaml", *extra])
    args.func = _broken(exc)
    return parser, args


@pytest.mark.parametrize("exc", [ValueError("bad shape (3, 4)"), KeyError("spot_image"), RuntimeError("boom")])
def test_a_bug_keeps_its_traceback_and_asks_for_a_report(exc, capsys):
    from stofm.util.cli_errors import run_parsed

    parser, args = _stalign_args(exc)
    assert run_parsed(parser, args, prog="stalign") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(exc).__name__ in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stalign train: error: this is a bug in stalign {stalign.__version__} "
                           f"({type(exc).__name__}); please report it"), last


@pytest.mark.parametrize("exc", [errors.InputError("--batch-size must be positive, got 0"),
                                 FileNotFoundError(2, "No such file or directory", "slide.svs"),
                                 MemoryError("out of memory")])
def test_user_and_machine_errors_stay_one_line(exc, capsys):
    from stofm.util.cli_errors import run_parsed

    parser, args = _stalign_args(exc)
    assert run_parsed(parser, args, prog="stalign") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stalign train: error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("exc", [ValueError("a bug"), errors.InputError("a user error")])
def test_debug_raises_everything(exc):
    from stofm.util.cli_errors import run_parsed

    parser, args = _stalign_args(exc, "--debug")
    with pytest.raises(type(exc)):
        run_parsed(parser, args, prog="stalign")


def test_the_stofm_command_reports_a_bug(monkeypatch, tmp_path, capsys):
    import stofm.cli

    def broken(args):
        raise KeyError("obsm")

    monkeypatch.setattr(stofm.cli, "_models", broken)
    assert stofm.cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "stofm models: error: this is a bug in stalign" in err, err
