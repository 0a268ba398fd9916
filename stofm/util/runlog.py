"""Run logs: one CSV per split (``train_log.csv``, ``val_log.csv``) and TensorBoard scalars under ``tensorboard/``."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any


class RunLogger:
    """Append metrics rows keyed by optimizer step. Only the main process should log (``enabled=False`` elsewhere).

    On resume (``resume_step``) rows logged after that step by the interrupted run are dropped from the CSVs and
    TensorBoard is told to purge them, so the logs read as one uninterrupted run.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for path in self.out_dir.glob("*_log.csv"):
                header, rows = self._read(path)
                self._write(path, header, [r for r in rows if int(float(r.get("step") or 0)) <= resume_step])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                warnings.warn("tensorboard is not installed; logging to CSV only", stacklevel=2)
            else:
                purge = resume_step + 1 if resume_step is not None else None
                self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)

    @staticmethod
    def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or []), list(reader)

    @staticmethod
    def _write(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def csv_path(self, split: str) -> Path:
        return self.out_dir / f"{split}_log.csv"

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        """Write one row ``{"step": step, **metrics}`` to ``<split>_log.csv`` and ``<split>/<key>`` scalars."""
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        path = self.csv_path(split)
        if path.exists():
            header, rows = self._read(path)
            if set(row) - set(header):  # a new column: rewrite with the wider header
                self._write(path, header + [k for k in row if k not in header], rows + [row])
            else:
                with path.open("a", newline="") as fh:
                    csv.DictWriter(fh, fieldnames=header, restval="").writerow(row)
        else:
            self._write(path, list(row), [row])
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(f"{split}/{key}", float(value), global_step=step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
