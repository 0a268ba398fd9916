"""Training checkpoints: ``<output_dir>/checkpoints/step_N`` folders written by ``accelerator.save_state`` plus
``trainer_state.json`` (written last, so a folder without it is an interrupted save and is never resumed from)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str) -> Path:
    """``"latest"`` -> newest complete checkpoint of ``output_dir``; otherwise the given checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {Path(output_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {path}: not a training checkpoint (no {STATE_FILE} in it)")
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def write_state(path: str | Path, state: dict[str, Any]) -> None:
    tmp = Path(path) / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(Path(path) / STATE_FILE)


def prune_checkpoints(output_dir: str | Path, *, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (``keep=0`` keeps all); returns the deleted ones."""
    found = list_checkpoints(output_dir)
    doomed = found[:-keep] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
