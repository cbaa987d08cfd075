"""The README's plugin example and docs/plugins.md's examples run as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(
    r"<!-- (?:readme|docs)-(?:example|module): [\w-]+ -->\s*```python\n(.*?)```", re.DOTALL
)
"""A runnable block: ``docs-example`` (run in order with the others) or ``docs-module``
(also run in order, and part of the guide's plugin package: see test_guide.py)."""


def _examples(path: Path) -> list[str]:
    blocks = BLOCK.findall(path.read_text())
    assert blocks, f"no marked examples in {path}"
    return blocks


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "example.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )


def test_readme_plugin_example_runs(tmp_path: Path) -> None:
    """The 20-line vendor plugin in the README protects a volume and prints the outcome."""
    (code,) = _examples(ROOT / "README.md")
    assert len(code.strip().splitlines()) <= 32
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "succeeded 0.0"


@pytest.mark.slow
def test_plugin_guide_examples_run_in_order(tmp_path: Path) -> None:
    """docs/plugins.md's examples build on each other and run as one script."""
    code = "\n\n".join(_examples(ROOT / "docs" / "plugins.md"))
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr


def test_the_design_guarantee_table_names_real_code_and_tests() -> None:
    """Every module, function and test the guarantee table in docs/design.md names exists,
    so the table cannot drift from the code."""
    import importlib

    doc = (ROOT / "docs" / "design.md").read_text()
    start = doc.index("| guarantee (DESIGN.md section 4) |")
    table = doc[start : doc.index("\n\n", start)]
    last_test = None
    checked = 0
    for cell_code, cell_tests in (row.split(" | ")[1:3] for row in table.splitlines()[2:]):
        parent: object = None
        for ref in re.findall(r"`([\w.]+)`", cell_code):
            first, _, rest = ref.partition(".")
            try:
                owner: object = importlib.import_module(f"karbor_async.{first}")
                parts = rest.split(".") if rest else []
            except ModuleNotFoundError:  # `_x.a`/`b`: b lives beside a
                assert parent is not None, ref
                owner, parts = parent, ref.split(".")
            for part in parts:
                parent = owner
                owner = getattr(owner, part)  # a function, a class, a method
            checked += 1
        for file, name, cont in re.findall(
            r"`(test_\w+\.py)(?:::(\w+))?`|`::(test_\w+)`", cell_tests
        ):
            last_test = file or last_test
            assert last_test is not None
            source = (ROOT / "tests" / last_test).read_text()
            if name or cont:
                assert re.search(rf"def {name or cont}\(", source), (
                    f"{last_test}: no {name or cont}"
                )
            checked += 1
    assert checked > 40
