"""Training checkpoints: ``<output_dir>/checkpoints/step_N`` folders written by ``accelerator.save_state`` plus
``trainer_state.json`` (written last, so a folder without it is an interrupted save and is never resumed from).
``trainer_state.json`` records the sha256 of every other file of the folder; ``--resume`` (latest) skips a
checkpoint whose files changed since (a truncated or damaged save) and falls back to the previous one."""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from stofm.util.safe_files import DamagedFileError

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
    """``"latest"`` -> newest complete, undamaged checkpoint of ``output_dir`` (a damaged newer one is skipped with a
    warning); otherwise the given checkpoint folder, which must be undamaged."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {Path(output_dir) / 'checkpoints'}")
        problems = []
        for path in reversed(found):
            problem = check_checkpoint(path)
            if problem is None:
                if problems:
                    warnings.warn(f"--resume: {'; '.join(problems)}; resuming from the older {path}", stacklevel=2)
                return path
            problems.append(f"{path} is damaged ({problem})")
        raise DamagedFileError(f"--resume: every checkpoint under {Path(output_dir) / 'checkpoints'} is damaged: "
                               + "; ".join(problems))
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {path}: not a training checkpoint (no {STATE_FILE} in it)")
    problem = check_checkpoint(path)
    if problem is not None:
        raise DamagedFileError(f"--resume {path}: the checkpoint is damaged ({problem}); resume from an older one")
    return path


def check_checkpoint(path: str | Path) -> str | None:
    """None when the files of a checkpoint are those recorded in its state (or it records none), else what differs."""
    from stofm.util.safe_files import sha256_of

    try:
        recorded = read_state(path).get("files")
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} unreadable: {err}"
    for rel, digest in (recorded or {}).items():
        f = Path(path) / rel
        if not f.is_file():
            return f"{rel} is missing"
        if sha256_of(f) != digest:
            return f"{rel} changed since it was saved"
    return None


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def write_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``trainer_state.json`` last, with the sha256 of every other file of the checkpoint folder."""
    from stofm.util.safe_files import sha256_of

    path = Path(path)
    files = {f.relative_to(path).as_posix(): sha256_of(f) for f in sorted(path.rglob("*"))
             if f.is_file() and f.name not in (STATE_FILE, STATE_FILE + ".tmp")}
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({**state, "files": files}, indent=2))
    tmp.replace(path / STATE_FILE)


def prune_checkpoints(output_dir: str | Path, *, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (``keep=0`` keeps all); returns the deleted ones."""
    found = list_checkpoints(output_dir)
    doomed = found[:-keep] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
