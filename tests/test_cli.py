"""The single ``stalign`` CLI: help, listing, and user errors without tracebacks."""
from __future__ import annotations

import subprocess
import sys

import pytest

from stalign.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "data" in out


def test_data_fetch_lists_known_sets(capsys):
    assert main(["data", "fetch", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("squidpy-visium-crop", "openslide-fixtures", "scanpy-10k-subset", "efficientnet-lite0"):
        assert name in out


def test_unknown_data_set_is_a_clear_error(capsys):
    assert main(["data", "fetch", "no-such-set"]) == 1
    err = capsys.readouterr().err
    assert "unknown data set 'no-such-set'" in err and "squidpy-visium-crop" in err


def test_module_entry_point_runs(subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "stalign", "--version"], capture_output=True, text=True,
                          env=subprocess_env)
    assert proc.returncode == 0 and "stalign" in proc.stdout
