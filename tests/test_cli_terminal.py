"""The CLI on a terminal, as an operator sees it: a pseudo-terminal (the ``pty`` module)
runs ``protect``, and a small screen model replays what was written to it (the cursor
moves and line erasures rich's live view uses), so a message that a redraw wipes out
does not count as shown.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from karbor_async._cli import EXIT_CANCELLED

pytest.importorskip("karbor_simcloud")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")

PLAN = """\
name = "app"
barrier = "cut"
resources = [{ type = "OS::Keystone::Project", id = "prj-0000001" }]
"""
COLUMNS = 160
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
_OTHER_ESCAPE = re.compile(r"\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>78]")


class Screen:
    """What a terminal shows after the bytes written to it (no scrolling: rows only grow)."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.rows: list[list[str]] = [[]]
        self.row = self.col = 0

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                csi = _CSI.match(text, i)
                if csi is not None:
                    self._control(csi.group(1), csi.group(2))
                    i = csi.end()
                    continue
                other = _OTHER_ESCAPE.match(text, i)
                i = other.end() if other is not None else i + 1
                continue
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self._down(1)
            elif ch == "\b":
                self.col = max(0, self.col - 1)
            elif ch >= " ":
                if self.col >= self.columns:
                    self.col = 0
                    self._down(1)
                line = self.rows[self.row]
                line.extend(" " * (self.col + 1 - len(line)))
                line[self.col] = ch
                self.col += 1
            i += 1

    def _down(self, n: int) -> None:
        self.row += n
        while len(self.rows) <= self.row:
            self.rows.append([])

    def _control(self, params: str, command: str) -> None:
        n = int(params) if params.isdigit() else 1
        if command == "A":
            self.row = max(0, self.row - n)
        elif command == "B":
            self._down(n)
        elif command == "C":
            self.col += n
        elif command == "D":
            self.col = max(0, self.col - n)
        elif command == "G":
            self.col = n - 1
        elif command == "K":
            line = self.rows[self.row]
            if params in ("", "0"):
                del line[self.col :]
            else:
                line.clear()
        elif command == "J" and params in ("", "0"):
            del self.rows[self.row][self.col :]
            del self.rows[self.row + 1 :]

    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.rows)


class Terminal:
    """A child process on a pseudo-terminal, its output replayed on a :class:`Screen`."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        import pty

        self.screen = Screen(COLUMNS)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the CLI
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, *argv], env)
        self.closed = False

    def read_until(self, pattern: str, timeout: float) -> bool:
        """Read until the screen shows ``pattern`` (a regex); False after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            if re.search(pattern, self.screen.text()):
                return True
            left = end - time.monotonic()
            if left <= 0 or self.closed:
                return False
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.02))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal (EIO)
                    chunk = b""
                if not chunk:
                    self.closed = True
                self.screen.feed(chunk.decode("utf-8", "replace"))

    def finish(self, timeout: float = 30) -> int:
        self.read_until(r"(?!x)x", timeout)  # drain until the child closes the terminal
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError("the CLI did not end:\n" + self.screen.text()[-3000:])


def _shown_and_kept(term: Terminal, message: str, sent: float) -> float:
    """``message`` is on screen within 0.5 s of ``sent`` and still there after the live
    view redrew itself (ten times a second); return how long it took to show."""
    assert term.read_until(re.escape(message), 0.5), term.screen.text()[-3000:]
    shown = time.monotonic() - sent
    term.read_until(r"(?!x)x", 0.3)
    assert message in term.screen.text(), "wiped out by a redraw:\n" + term.screen.text()[-3000:]
    return shown


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["live", "plain"])
def test_both_ctrl_c_acknowledgements_show_at_once(tmp_path: Path, mode: str) -> None:
    """On a terminal (live view, and --plain), each Ctrl-C is acknowledged on screen within
    0.5 s, and the acknowledgements stay there (the live view's redraws do not wipe them)."""
    (tmp_path / "plan.toml").write_text(PLAN)
    env = {
        **os.environ,
        "COLUMNS": str(COLUMNS),
        "LINES": "50",
        "TERM": "xterm-256color",
        "KARBOR_DB": str(tmp_path / "karbor.db"),
        "KARBOR_BANK": str(tmp_path / "bank"),
    }
    for name in ("KARBOR_SIMCLOUD", "NO_COLOR", "FORCE_COLOR"):
        env.pop(name, None)
    argv = ["-c", "from karbor_async._cli import main; main()", "protect", "plan.toml"]
    argv += ["--simcloud", "20:3:slow", *(["--plain"] if mode == "plain" else [])]
    term = Terminal(argv, tmp_path, env)
    try:
        # Servers frozen, their volumes' cuts (1.5 s each with this latency) under way.
        assert term.read_until(r"frozen [1-9]", 30), term.screen.text()[-3000:]
        os.kill(term.pid, signal.SIGINT)
        sent = time.monotonic()
        first = _shown_and_kept(term, "Ctrl-C: cancelling protect run", sent)
        os.kill(term.pid, signal.SIGINT)
        sent = time.monotonic()
        second = _shown_and_kept(term, "Ctrl-C again: abandoning", sent)
    finally:
        code = term.finish()
    screen = term.screen.text()
    assert code == EXIT_CANCELLED, screen[-3000:]
    assert "Ctrl-C: cancelling protect run" in screen and "Ctrl-C again: abandoning" in screen
    assert "protect cancelled" in screen and "Traceback" not in screen
    assert first < 0.5 and second < 0.5


@pytest.mark.slow
def test_ctrl_c_during_the_copies_says_nothing_was_frozen(tmp_path: Path) -> None:
    """Cancelled while copying (every server long thawed): the CLI says nothing was frozen
    then, not that every frozen resource was thawed; `runs show` says the same."""
    (tmp_path / "plan.toml").write_text(PLAN)
    env = {
        **os.environ,
        "COLUMNS": str(COLUMNS),
        "KARBOR_DB": str(tmp_path / "karbor.db"),
        "KARBOR_BANK": str(tmp_path / "bank"),
    }
    env.pop("KARBOR_SIMCLOUD", None)
    cli = ["-c", "from karbor_async._cli import main; main()"]
    protect = [*cli, "protect", "plan.toml", "--simcloud", "20:3:slow", "--plain"]
    term = Terminal(protect, tmp_path, env)
    try:
        assert term.read_until(r"main barrier of group default released", 30)
        os.kill(term.pid, signal.SIGINT)
        assert term.read_until(r"Ctrl-C: cancelling protect run \S+; nothing is frozen", 0.5)
    finally:
        code = term.finish()
    screen = term.screen.text()
    assert code == EXIT_CANCELLED, screen[-3000:]
    said = re.search(r"protect cancelled \(protect run (\S+)\): (.*)", screen)
    assert said is not None, screen[-3000:]
    assert said.group(2).startswith("nothing was frozen when it was cancelled (the ")
    shown = Terminal([*cli, "runs", "show", said.group(1)], tmp_path, env)
    assert shown.finish() == 0
    assert "nothing was frozen when it was cancelled" in shown.screen.text()
