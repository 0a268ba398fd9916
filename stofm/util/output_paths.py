"""Where results go: names that become files, outputs that must not be inputs, results written under a temporary
name and renamed, and locks on an output that one process at a time may write.

- :func:`safe_name`: an identifier (slide id, hub revision part) that becomes a file name is refused unless it is
  one plain name (no separator, no ``..``, no NUL or control character, bounded length);
  :func:`file_stems` turns free text (gene names) into distinct file-name stems.
- :func:`refuse_overwriting_inputs` / :func:`check_command_outputs`: an output that is the same file as an input
  is refused before anything is read (every ``stalign``/``stofm`` command, through ``run_parsed``).
- :func:`atomic_write_path`: a result appears under its final name complete or not at all (``kill -9``, a full
  disk or an error leave at most a hidden ``.NAME.PID.*.tmp`` that the next writer removes).
- :func:`take_lock` / :func:`output_lock`: a second writer of the same output is refused in one line (``filelock``,
  as ``stalign prep`` uses; released by the OS when the holder dies).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stofm.util.errors import InputError, SetupError

PathLike = str | os.PathLike
#: Longest identifier (UTF-8 bytes) that may name a file: 255 is the usual file-system limit, and suffixes
#: (``_dropped.csv``, a temporary's ``.PID.XXXXXXXX.tmp.h5ad``) are added to it.
MAX_NAME_BYTES = 180
#: argparse destinations that name outputs (never compared as inputs).
OUTPUT_DESTS = frozenset({"out", "heatmaps", "output_dir", "dest"})


def safe_name(value: Any, what: str, *, source: PathLike | None = None) -> str:
    """``value`` as a string, when it can name one file inside a folder; else an :class:`InputError` naming the
    value, ``what`` it is and the ``source`` file it came from."""
    text = str(value)
    reason = None
    if not text.strip():
        reason = "it is empty"
    elif "/" in text or "\\" in text:
        reason = "it holds a path separator"
    elif ".." in text:
        reason = "it holds '..'"
    elif text.startswith("."):
        reason = "it starts with '.' (hidden and temporary files do)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        reason = "it holds a NUL or control character"
    elif len(text.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        reason = f"it is longer than {MAX_NAME_BYTES} bytes"
    if reason is None:
        return text
    shown = text if len(text) <= 80 else text[:77] + "..."
    where = f"{source}: " if source is not None else ""
    raise InputError(f"{where}{what} {shown!r} cannot name a file ({reason}); use letters, digits, '-', '_' and '.'")


def file_stems(names: Iterable[Any], what: str) -> list[str]:
    """Distinct file-name stems for free-text ``names`` (e.g. genes): a name that is already safe is kept, any other
    gets its unsafe characters replaced by ``_`` and a short hash of the original appended (``CD8/A`` ->
    ``CD8_A-1a2b3c``, apart from a gene really called ``CD8_A``). A name given twice is refused."""
    names = [str(n) for n in names]
    seen: set[str] = set()
    stems = []
    for name in names:
        if name in seen:
            raise InputError(f"{what} {name!r} is given twice")
        seen.add(name)
        clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")[:MAX_NAME_BYTES - 8] or "unnamed"
        if clean != name:
            clean += "-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:6]
        stems.append(clean)
    return stems


def same_path(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` are the same file (links and relative paths resolved; either may not exist yet)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False


def refuse_overwriting_inputs(outputs: Mapping[str, PathLike], inputs: Mapping[str, PathLike]) -> None:
    """:class:`InputError` when an output (label -> path) is the same file as an input: nothing a command reads is
    ever replaced by what it writes."""
    for out_label, out in outputs.items():
        for in_label, src in inputs.items():
            if same_path(out, src):
                raise InputError(f"{out_label} {out} is the same file as the input {in_label} {src}; it would be "
                                 f"overwritten: choose another {out_label.split()[0]}")


def _paths(value: Any) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [os.fspath(v) for v in values if isinstance(v, (str, os.PathLike)) and os.fspath(v)]


def check_command_outputs(args: Any) -> None:
    """For a parsed command line: ``--out`` (and the files the command writes beside it, the suffixes in
    ``args.out_suffixes``) must not be any path another argument names (``--coords``, ``--h5ad``, a positional
    input, ...)."""
    out = getattr(args, "out", None)
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        return
    outputs = {"--out": out}
    for suffix in getattr(args, "out_suffixes", None) or ():
        outputs[f"--out (its {suffix} beside it)"] = Path(out).with_suffix(suffix)
    inputs = {}
    for dest, value in vars(args).items():
        if dest in OUTPUT_DESTS or dest == "out_suffixes" or callable(value):
            continue
        for path in _paths(value):
            if os.path.exists(path):
                inputs[f"--{dest.replace('_', '-')}"] = path
    refuse_overwriting_inputs(outputs, inputs)


def current_umask() -> int:
    """The process umask (read by setting it and putting it back: the only way os offers)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: PathLike, final: PathLike) -> None:
    """Give a finished temporary the usual file mode (mkstemp makes it owner-only) and rename it into place."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, final)


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Delete the temporaries of ``path`` (``.NAME.PID.*.tmp*``) left by killed writers (those whose process is
    gone); returns them."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp*") if path.parent.is_dir() else ():
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_write_path(final: PathLike) -> Iterator[Path]:
    """``with atomic_write_path(out) as tmp: write(tmp)``: ``tmp`` is a new file in ``out``'s folder (same suffix,
    so writers that choose the format by it still do); renamed to ``out`` when the block ends without an error,
    removed otherwise. The folder is created when missing."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=f".tmp{final.suffix}",
                                dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with write_errors(final.parent, final.name):
            yield tmp
            publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


#: what torch.save (and accelerate's save_state through it) raises when a write fails: a full disk, a quota
TORCH_WRITE_FAILURE = ("PytorchStreamWriter failed", "enforce fail at inline_container")


@contextmanager
def write_errors(folder: PathLike, what: str, *, then: str = "") -> Iterator[None]:
    """A write that fails for want of space (``ENOSPC``/``EDQUOT``, or torch's raw ``[enforce fail at
    inline_container.cc] PytorchStreamWriter failed writing file``) becomes one :class:`SetupError` naming
    ``folder`` and ``what`` was written, plus ``then`` (what is left, what to do); other errors pass unchanged."""
    import errno

    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise SetupError(f"cannot write {what} in {folder}: the disk is full ({err.strerror}){then}") from None
    except RuntimeError as err:
        if not any(text in str(err) for text in TORCH_WRITE_FAILURE):
            raise
        raise SetupError(f"cannot write {what} in {folder}: the disk is full or the folder is not writable (torch: "
                         f"{str(err).split(':', 2)[-1].strip()[:80]}){then}") from None


def take_lock(lock_file: PathLike, *, holder: str, wait: float | None = 0, on_wait: Any = None,
              error: type[Exception] = SetupError) -> Any:
    """An acquired ``filelock.FileLock`` on ``lock_file`` (call ``.release()``). When another process holds it:
    ``wait`` 0 raises ``error`` right away, else ``on_wait()`` is called and the lock awaited for ``wait`` seconds
    (None: as long as it takes) before ``error``; ``holder`` says what is writing ("another stalign train is
    writing into X")."""
    from filelock import FileLock, Timeout

    lock_file = Path(lock_file)
    try:  # an output folder that cannot be written is said now, not as "another process holds the lock"
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_file, "a"):
            pass
    except OSError as err:
        why = "not a folder" if lock_file.parent.exists() and not lock_file.parent.is_dir() else err.strerror or err
        raise SetupError(f"cannot write into {lock_file.parent} ({why}); choose an output in a writable folder"
                         ) from None
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
        return lock
    except Timeout:
        if wait == 0:
            raise error(f"{holder} (lock {lock_file}); wait for it to finish or choose another output") from None
    if on_wait is not None:
        on_wait()
    try:
        lock.acquire(timeout=-1 if wait is None else wait)
    except Timeout:
        raise error(f"{holder} after {wait:g} s (lock {lock_file}); wait for it to finish or choose another "
                    "output") from None
    return lock


@contextmanager
def output_lock(path: PathLike, *, command: str) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside the output file ``path`` while the block runs: a second ``command`` writing the
    same file is refused in one line instead of both finishing with one result lost."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; the output is a file: give its name")
    lock = take_lock(path.with_name(f".{path.name}.lock"), holder=f"another {command} is writing {path}")
    try:
        yield
    finally:
        lock.release()
