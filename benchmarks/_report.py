"""Markdown tables, the environment header and PNG plots of a benchmark run."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "cpu_model",
    "environment",
    "fmt_ms",
    "fmt_range_ms",
    "git_commit",
    "plot_lines",
    "plot_panels",
    "table",
]

_PACKAGES = (
    "karbor-async",
    "karbor-async-simcloud",
    "karbor-async-sqlite",
    "anyio",
    "attrs",
    "structlog",
    "taskflow",
    "futurist",
    "eventlet",
    "matplotlib",
)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GB"
    except OSError:
        pass
    return "unknown"


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "plugins", "benchmarks"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    suffix = " (with uncommitted changes to src/, plugins/ or benchmarks/)" if dirty.stdout else ""
    return out.stdout.strip() + suffix


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def environment(command: str, root: Path) -> list[str]:
    """The header: date, machine, versions, the exact command (called before the event loop)."""
    versions = []
    for name in _PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: CPU {cpu_model()}, {os.cpu_count()} CPUs, {_memory_gb()} RAM, "
        f"{platform.system()} {platform.release()}",
        f"- python: {platform.python_implementation()} {platform.python_version()}; "
        f"anyio {_version('anyio')}; event loop: asyncio (anyio backend)",
        f"- versions: {', '.join(versions)}",
        f"- commit: {git_commit(root)}",
        f"- command: `{command}`",
    ]


def fmt_ms(seconds: float | None, digits: int = 2) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "n/a"
    return f"{seconds * 1e3:.{digits}f}"


def fmt_range_ms(values: tuple[float, float, float], digits: int = 2) -> str:
    """``median [min-max]`` in milliseconds."""
    med, lo, hi = values
    if math.isnan(med):
        return "n/a"
    return f"{fmt_ms(med, digits)} [{fmt_ms(lo, digits)}-{fmt_ms(hi, digits)}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def plot_lines(
    path: Path,
    title: str,
    ylabel: str,
    series: dict[str, list[tuple[int, float]]],
    *,
    note: str = "",
) -> bool:
    """A log-log line plot of y against N per series; ``False`` if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    palette = plt.get_cmap("tab20")  # 20 colours: the even ones, then the odd (lighter) ones
    colors: dict[str, Any] = {}
    for label, points in series.items():
        pts = sorted((n, y) for n, y in points if y is not None and y > 0 and not math.isnan(y))
        if pts:
            # "X (collector off)" is drawn dashed in the colour of "X".
            base, off = label.removesuffix(" (collector off)"), label.endswith("(collector off)")
            k = len(colors) if base not in colors else 0
            color = colors.setdefault(base, palette((2 * k) % 20 + (2 * k) // 20 % 2))
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=label,
                color=color,
                linestyle="--" if off else "-",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("resources in the application graph (N)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_panels(
    path: Path,
    title: str,
    panels: Sequence[tuple[str, str, dict[str, list[tuple[int, float]]]]],
    *,
    note: str = "",
) -> bool:
    """Side-by-side line plots against N (log x, linear y from 0), one per (title, ylabel,
    series); ``False`` if matplotlib is missing. Linear y shows whether a cost is flat."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), dpi=110)
    for ax, (sub, ylabel, series) in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
        for label, points in series.items():
            pts = sorted((n, y) for n, y in points if y is not None and not math.isnan(y))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("resources in the application graph (N)")
        ax.set_ylabel(ylabel)
        ax.set_title(sub)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
