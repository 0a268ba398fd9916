"""Reading ``ablation_rows.csv`` files back (``benchmarks/ablation.py --from-rows``: seeds run as separate processes
summarised together): every file checked, each problem one :class:`~stalign.lab.ablation.AblationError` naming it."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stalign.lab.ablation import AblationError

#: columns every row of ``run_ablation`` has (``split`` too, where the run had several splits)
KEYS = ("method", "arm", "seed")


def site_best_steps(paths: Sequence[str | Path]) -> dict[tuple[int, str], int]:
    """(seed, arm) -> best step of the site-split rows of these files (``--best-steps-from``: a block-split run
    after separate site-split runs trains each arm the steps it was best at there)."""
    import pandas as pd

    rows = [r for r in read_rows(paths) if r.get("split") == "site" and pd.notna(r.get("best_step"))]
    if not rows:
        raise AblationError(f"{', '.join(map(str, paths))}: no site-split row with a best step")
    return {(int(r["seed"]), str(r["arm"])): int(r["best_step"]) for r in rows}


def read_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The rows of ``ablation_rows.csv`` files: a missing, empty, binary or ragged file, one without the
    ``method``/``arm``/``seed`` columns or with a seed that is not a whole number, and a (method, split, seed) given
    twice are refused."""
    import pandas as pd

    frames = [_read_one(Path(path)) for path in paths]
    rows = pd.concat(frames, ignore_index=True)
    keys = [c for c in ("method", "split", "seed") if c in rows.columns]
    dup = rows.duplicated(keys)
    if dup.any():
        first = rows[dup].iloc[0]
        raise AblationError(f"{int(dup.sum())} ({', '.join(keys)}) rows appear twice in "
                            f"{', '.join(map(str, paths))}, e.g. {', '.join(f'{k} {first[k]!r}' for k in keys)}")
    return rows.to_dict("records")


def _read_one(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise AblationError(f"{path}: ablation rows file does not exist")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise AblationError(f"{path}: empty file (no ablation rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise AblationError(f"{path}: not an ablation rows CSV ({' '.join(str(err).split())[:160]})") from None
    lacking = [c for c in KEYS if c not in frame.columns]
    if lacking or frame.empty:
        raise AblationError(f"{path}: not ablation rows ({f'no column {lacking}' if lacking else 'no rows'}; "
                            f"columns: {list(frame.columns)[:8]})")
    seeds = pd.to_numeric(frame["seed"], errors="coerce")
    bad = seeds.isna() | (seeds % 1 != 0)
    if bad.any():
        row = int(bad.to_numpy().argmax())
        value = frame["seed"].iloc[row]
        shown = "(empty)" if pd.isna(value) else repr(str(value))
        raise AblationError(f"{path}: seed {shown} in line {row + 2} is not a whole number")
    return frame.assign(seed=seeds.astype(int))
