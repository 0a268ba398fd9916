"""Shared helpers of the benchmark scripts: arguments, machine description, timing, tables, RESULTS.md.

Every script prints a markdown table and (unless ``--no-record``) appends a section to
``benchmarks/RESULTS.md``: title, UTC time, machine, the exact command, load average, notes, table. The file
is shared with other benchmarks: sections are only ever appended.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: --device, --quick, --threads, --note, --results, --no-record."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs (seconds)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--note", default="", help="free text recorded with the figures (e.g. machine load)")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file the section is appended to")
    p.add_argument("--no-record", action="store_true", help="print only")
    return p


def setup(args: argparse.Namespace):
    """Resolve the device (``torch.device``) and apply ``--threads``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from stalign.models.perf import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is available")
    return device


def machine(device: Any) -> str:
    """CPU model, cores, RAM, OS, torch version, threads and (on CUDA) the GPU."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = (f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        text += f"; device: CUDA {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    else:
        text += "; device: CPU"
    return text


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: Any, *, warmup: int = 1, repeat: int = 3,
                   best: bool = False) -> float:
    """Median (or, with ``best``, the shortest) wall seconds of ``fn()`` after ``warmup`` calls (device
    synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


def matmul_peak(device: Any, *, n: int = 8192, dtype: Any = None, repeat: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) of ``n x n`` products in ``dtype`` (bf16 on CUDA, fp32 on CPU),
    random inputs (not zeros), best of ``repeat`` (a peak; on a shared CPU the median wanders with the load)."""
    import torch

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, device, warmup=3, repeat=repeat, best=True)
    return 2 * n**3 / seconds / 1e12


def fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Markdown table of ``rows`` (dicts) over ``columns`` (default: the first row's keys)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def record(args: argparse.Namespace, *, title: str, device: Any, body: str, load_before: str,
           notes: Sequence[str] = ()) -> None:
    """Print ``body`` and append the section to ``args.results`` (unless ``--no-record``)."""
    print(body)
    if args.no_record:
        return
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## {title} ({when})\n", f"- machine: {machine(device)}", f"- command: `{command_line()}`",
             f"- load average before/after: {load_before} / {load_average()}"]
    lines += [f"- note: {n}" for n in ([*notes, args.note] if args.note else notes)]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n\n" + body + "\n")
    print(f"appended to {args.results}")
