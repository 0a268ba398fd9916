"""Warnings of a command print as one clean line each (no Python source line), with a summary of the run's."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings


def test_prep_warning_is_one_line_with_a_summary(tmp_path, squidpy_crop, subprocess_env):
    """A real command that warns (crops upsampled 8x), in its own process as a user runs it: the warning is
    ``stalign prep: warning: ...`` on one line and says what to do, the run ends with the count; no
    ``file.py:123: UserWarning`` and no ``warnings.warn(`` source line."""
    cmd = [sys.executable, "-m", "stalign", "prep", "--h5ad", str(squidpy_crop / "test_data.h5ad"), "--image",
           str(squidpy_crop / "test_img.jpg"), "--out", str(tmp_path / "shards"), "--spot-um", "20", "--niche-um",
           "60", "--n-top-genes", "10", "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [x for x in re.split(r"[\r\n]", run.stderr) if "warning" in x.lower()]
    shown = [x for x in lines if x.startswith("stalign prep: warning: ")]
    assert len(shown) == 1 and "upsampled 8.1x" in shown[0] and "give the full-resolution one" in shown[0]
    assert any(x.startswith("stalign prep: 1 warning: ") for x in lines)
    assert "UserWarning" not in run.stderr and "warnings.warn(" not in run.stderr and ".py:" not in run.stderr


def test_other_packages_named_repeats_counted_and_records_still_work(capsys):
    """The format names a foreign warning's category and package, prints a repeat once, counts all; code that
    records warnings (pytest.warns) still receives them."""
    from stofm.util.cli_warnings import collected_warnings

    with collected_warnings("stalign predict") as log:
        lines = [log.format("x is deprecated;\n use y", FutureWarning, "/v/site-packages/anndata/_core.py", 7)
                 for _ in range(3)]
        lines.append(log.format("from stalign", UserWarning, "/repo/stalign/tasks/predict.py", 9))
        assert warnings.formatwarning == log.format
        import pytest

        with pytest.warns(UserWarning, match="still recorded"):
            warnings.warn("still recorded", stacklevel=1)
    assert lines == ["stalign predict: warning: x is deprecated; use y (FutureWarning from anndata)\n", "", "",
                     "stalign predict: warning: from stalign\n"]
    assert capsys.readouterr().err.splitlines() == [
        "stalign predict: 4 warnings (2 distinct):",
        "  - x is deprecated; use y (FutureWarning from anndata) (x3)",
        "  - from stalign"]
    assert warnings.formatwarning is not log.format  # restored after the run
