"""The per-task cost section: ``benchmarks/task_cost.py`` on the installed anyio and on 4.13.

The script runs in a subprocess (``python -I``: no PYTHONPATH, nothing of this
tree, only the standard library and that interpreter's anyio), once with this
interpreter and once with a throwaway virtualenv holding anyio 4.13 (made on
first use under the cache directory, ``$KARBOR_BENCH_CACHE`` or
``~/.cache/karbor-bench``: ``python -m venv`` and ``pip install 'anyio==4.13.*'``).
A row that cannot be had says why. The quick run does not build the virtualenv
(it uses one a full run left, if any).

``python -m benchmarks._taskcost [--quick]`` runs this section alone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio

from benchmarks._report import table

__all__ = ["COMPARE_ANYIO", "cache_dir", "task_cost_section"]

COMPARE_ANYIO = "4.13"
"""The anyio release the issue compares with: before its task handles grew."""

_SCRIPT = Path(__file__).resolve().parent / "task_cost.py"


def cache_dir() -> Path:
    env = os.environ.get("KARBOR_BENCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "karbor-bench"


def _tail(raw: bytes) -> str:
    lines = raw.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


async def _run(python: str, n: int, reps: int) -> dict[str, object] | str:
    """The script's JSON, or why it could not run."""
    cmd = [python, "-I", str(_SCRIPT), "--n", str(n), "--reps", str(reps)]
    try:
        with anyio.fail_after(600):
            proc = await anyio.run_process(cmd, check=False)
    except TimeoutError:
        return "did not finish in 600 s"
    except OSError as exc:
        return f"could not start {python}: {exc}"
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {_tail(proc.stderr)}"
    data: dict[str, object] = json.loads(proc.stdout)
    return data


async def _compare_python(build: bool) -> tuple[str | None, str]:
    """(the virtualenv's interpreter with anyio 4.13, made if ``build``; or None, and why)."""
    venv = cache_dir() / f"anyio-{COMPARE_ANYIO}"
    python = venv / "bin" / "python"
    if python.exists():
        probe = await anyio.run_process([str(python), "-I", "-c", "import anyio"], check=False)
        if probe.returncode == 0:
            return str(python), ""
    if not build:
        return None, (
            f"quick run: no virtualenv at {venv} (a full run makes it, or "
            "`python -m benchmarks._taskcost`)"
        )
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", f"anyio=={COMPARE_ANYIO}.*"],
    ]
    for cmd in steps:
        try:
            with anyio.fail_after(600):
                proc = await anyio.run_process(cmd, check=False)
        except (TimeoutError, OSError) as exc:
            return None, f"could not install anyio {COMPARE_ANYIO}: {type(exc).__name__}: {exc}"
        if proc.returncode != 0:
            step = " ".join(cmd[1:4])
            return None, f"could not install anyio {COMPARE_ANYIO} ({step}): {_tail(proc.stderr)}"
    return str(python), ""


def _row(label: str, got: dict[str, object] | str) -> list[str]:
    if isinstance(got, str):
        return [label, "-", f"skipped: {got}", "-", "-", "-", "-"]
    a_us, n_us = float(str(got["asyncio_us"])), float(str(got["anyio_us"]))
    a_b, n_b = float(str(got["asyncio_bytes"])), float(str(got["anyio_bytes"]))
    return [
        label,
        str(got["anyio"]),
        f"{n_us:.2f}",
        f"{a_us:.2f}",
        f"{n_us / a_us:.2f}x" if a_us else "-",
        f"{n_b:,.0f}",
        f"{a_b:,.0f}",
    ]


async def task_cost_section(quick: bool) -> tuple[list[str], dict[str, dict[str, object]]]:
    """The section's lines, and the measurements by row (``installed``, ``4.13``)."""
    n, reps = (5_000, 3) if quick else (50_000, 5)
    rows: list[list[str]] = []
    found: dict[str, dict[str, object]] = {}
    installed = await _run(sys.executable, n, reps)
    rows.append(_row("installed", installed))
    if isinstance(installed, dict):
        found["installed"] = installed
    python, why = await _compare_python(build=not quick)
    compare = why if python is None else await _run(python, n, reps)
    rows.append(_row(f"anyio {COMPARE_ANYIO} (comparison virtualenv)", compare))
    if isinstance(compare, dict):
        found[COMPARE_ANYIO] = compare
    return [
        "## Per-task cost of a task group: the installed anyio, and anyio 4.13",
        "",
        f"`benchmarks/task_cost.py` in a subprocess per interpreter (`python -I`: only the "
        f"standard library and that interpreter's anyio), asyncio backend, {n:,} tasks. "
        "**us/task**: no-op tasks started in one task group (`start_soon` / raw asyncio's "
        "`TaskGroup.create_task`) and run to their end, per task, median of "
        f"{reps} repetitions from a frozen heap with the collector disabled. **bytes/task**: "
        "tracemalloc's growth with every task started and parked on one event, per task. "
        f"The anyio {COMPARE_ANYIO} row runs in a virtualenv under `{cache_dir()}` "
        "(made on first use; the engine itself is not run there).",
        "",
        *table(
            [
                "interpreter",
                "anyio",
                "anyio us/task",
                "asyncio us/task",
                "anyio / asyncio",
                "anyio bytes/task",
                "asyncio bytes/task",
            ],
            rows,
        ),
        "",
    ], found


def main(argv: list[str] | None = None) -> int:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    lines, _found = anyio.run(task_cost_section, quick, backend="asyncio")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
