"""The README's plugin example and docs/plugins.md's examples run as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- (?:readme|docs)-example: [\w-]+ -->\s*```python\n(.*?)```", re.DOTALL)


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


def test_plugin_guide_examples_run_in_order(tmp_path: Path) -> None:
    """docs/plugins.md's examples build on each other and run as one script."""
    code = "\n\n".join(_examples(ROOT / "docs" / "plugins.md"))
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr
