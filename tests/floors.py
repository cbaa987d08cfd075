"""Print the runtime dependencies' declared lower bounds beside the installed versions.

Run by ``make test-lowest`` in the lowest-versions virtualenv (``uv pip install
--resolution lowest-direct``), before its tests, so the log shows which floor was
tested. It reads the project's ``pyproject.toml`` (its dependencies and the extras
named on the command line) and every ``plugins/*/pyproject.toml``, and exits 1 when an
installed version is not the declared floor (a resolver that could not install the
floor went higher, or the virtualenv is not a lowest-versions one)::

    python tests/floors.py postgres testing
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def declared(extras: list[str]) -> dict[str, tuple[Version, str]]:
    """Each runtime requirement with a ``>=`` floor: name -> (floor, where it is declared)."""
    found: dict[str, tuple[Version, str]] = {}
    sources = [(ROOT / "pyproject.toml", extras)]
    sources += [(p, []) for p in sorted(ROOT.glob("plugins/*/pyproject.toml"))]
    for path, wanted in sources:
        project = tomllib.loads(path.read_text())["project"]
        lines = list(project.get("dependencies", []))
        for extra in wanted:
            lines += project["optional-dependencies"][extra]
        where = str(path.relative_to(ROOT).parent) if path.parent != ROOT else "karbor-async"
        for line in lines:
            req = Requirement(line)
            floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
            if req.marker is not None and not req.marker.evaluate():
                continue
            if floors:
                name = canonicalize_name(req.name)
                floor = max(floors)
                if name not in found or floor > found[name][0]:
                    found[name] = (floor, where)
    return found


def main(extras: list[str]) -> int:
    wrong = []
    print(f"{'dependency':<14}{'installed':<12}{'declared':<12}declared by")
    for name, (floor, where) in sorted(declared(extras).items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        ok = installed != "missing" and Version(installed) == floor
        mark = "" if ok else "   <- not the floor"
        print(f"{name:<14}{installed:<12}{'>=' + str(floor):<12}{where}{mark}")
        if not ok:
            wrong.append(name)
    if wrong:
        print(f"not at their declared floor: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
