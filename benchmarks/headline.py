"""The README's headline benchmark table, regenerated from ``benchmarks/RESULTS.md``.

``RESULTS.md`` carries the block (ratios only) between ``<!-- bench:headline -->``
and ``<!-- /bench:headline -->``; this copies it over the same markers in
``README.md``. A full ``make bench`` (default sizes and output) does it itself;
``python -m benchmarks.headline [--results PATH] [--readme PATH] [--print]`` does
it from a report already written (``--print`` shows the block instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks._issue19 import HEADLINE_BEGIN, HEADLINE_END

__all__ = ["extract", "main", "replace", "write"]

HERE = Path(__file__).resolve().parent


def _span(text: str, where: str) -> tuple[int, int]:
    begin, end = text.find(HEADLINE_BEGIN), text.find(HEADLINE_END)
    if begin < 0 or end < begin or text.find(HEADLINE_BEGIN, begin + 1) >= 0:
        raise ValueError(f"{where} needs exactly one {HEADLINE_BEGIN} ... {HEADLINE_END} block")
    return begin, end + len(HEADLINE_END)


def extract(report: str) -> str:
    """The headline block of a report, markers included."""
    begin, end = _span(report, "the report")
    return report[begin:end]


def replace(readme: str, block: str) -> str:
    """``readme`` with its headline block replaced by ``block`` (markers included)."""
    begin, end = _span(readme, "README.md")
    return readme[:begin] + block + readme[end:]


def write(readme: Path, block: str) -> None:
    readme.write_text(replace(readme.read_text(), block))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.headline", description=__doc__)
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--readme", type=Path, default=HERE.parent / "README.md")
    ap.add_argument("--print", action="store_true", help="print the block, write nothing")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        block = extract(args.results.read_text())
        if args.print:
            print(block)
        else:
            write(args.readme, block)
            print(f"wrote the headline block of {args.readme}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"headline: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
