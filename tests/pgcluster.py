"""A throwaway PostgreSQL 15 cluster for tests: one per pytest session, shared.

Take the ``pg_cluster`` fixture (``tests/conftest.py``: one cluster a session); it gives a
:class:`PgCluster`. Any test that needs a real server uses it (the PostgreSQL
plugin's tests now, a PostgreSQL checkpoint store later): make your own database
with :meth:`PgCluster.create_database` (a fresh name per test) rather than sharing
one, and never stop or reconfigure the cluster from a test.

- The cluster lives in a directory made under the system's temporary root
  (``tempfile.gettempdir()``, not pytest's ``tmp_path``: pytest's root is mode
  0700, and the server runs as the ``postgres`` user, which could not enter it),
  owned by ``postgres``. ``runuser -u postgres -- initdb``, then ``pg_ctl start``
  with ``-p PORT -k SOCKDIR -c listen_addresses=127.0.0.1`` on a free port.
- TCP connections (``host``/``port``) need the superuser's password
  (``scram-sha-256``), so tests of wrong passwords mean something; the Unix socket
  in ``sockdir`` trusts local users, for the fixture's own administration
  (:meth:`PgCluster.psql`).
- It runs with ``fsync=off`` (a test cluster: a crash of the machine loses it
  anyway) and is stopped (``pg_ctl stop -D``) and removed at the session's end.
  A session that was killed leaves its directory behind; the next session stops
  that server and removes the directory, but never one whose pytest process still
  runs (two sessions may share the machine).
- Without the binaries (``/usr/lib/postgresql/15/bin``, Debian's ``postgresql-15``,
  or ``KARBOR_PG_BIN``), without root or without the ``postgres`` user, the fixture
  skips its tests with a one-line reason; under CI (``KARBOR_REQUIRE_SERVICES=1``,
  set by ``.ci/run``, which installs the package) it fails them instead.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from helpers import need_service, uses_service

__all__ = ["PG_BIN", "PgCluster", "session_cluster", "unavailable"]

PG_BIN = Path(os.environ.get("KARBOR_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"
_PREFIX = "karbor-pgcluster-"
_OWNER = "owner"  # the pytest process that made the directory: "pid start-time"


@attrs.frozen
class PgCluster:
    """A running cluster: connect over TCP to ``host:port`` as ``user``/``password``."""

    root: Path
    bindir: Path
    port: int
    password: str
    host: str = "127.0.0.1"
    user: str = SERVER_USER

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        return self.root / "sock"

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq/asyncpg URL without the password (pass it separately)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` as the superuser over the Unix socket (no password); unaligned
        tuples-only output, stripped. Raises ``CalledProcessError`` on any SQL error."""
        done = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.sockdir),
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, "psql", done.stdout, done.stderr)
        return done.stdout.strip()

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database with a fresh name (``PREFIX_<hex>``); returns its name."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def databases(self) -> set[str]:
        out = self.psql("SELECT datname FROM pg_database WHERE NOT datistemplate")
        return set(out.split())

    def terminate(self, dbname: str) -> int:
        """End every session connected to ``dbname`` (``pg_terminate_backend``), as an
        administrator or a failing network would; returns how many."""
        return int(
            self.psql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                f" WHERE datname = '{dbname}' AND pid <> pg_backend_pid()"
            )
        )

    # Only for a cluster of a test's own (``private_cluster``), never the session's.

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m MODE``): every session ends."""
        done = _as_server(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", mode)
        if done.returncode != 0:
            _fail("pg_ctl stop", done)

    def start(self) -> None:
        """Start the stopped server again on its port, with the options it had."""
        done = _as_server(
            str(self.bindir / "pg_ctl"),
            "start",
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            _options(self.port, self.root),
        )
        if done.returncode != 0:
            _fail("pg_ctl start", done, self.root / "server.log")


def unavailable() -> str | None:
    """Why no cluster can be started here (one line), or None when one can."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        return f"needs PostgreSQL 15's server binaries in {PG_BIN} (apt-get install postgresql-15)"
    if os.geteuid() != 0:
        return "needs root, to run the PostgreSQL server as the postgres user"
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        return f"needs the {SERVER_USER!r} user (Debian's postgresql-15 package makes it)"
    if shutil.which("runuser") is None:
        return "needs runuser(1) (util-linux)"
    return None


def require() -> None:
    """Skip the calling test with the reason (fail it under CI) when no cluster can run."""
    reason = unavailable()
    if reason is not None:
        need_service(f"PostgreSQL tests: {reason}")


def _as_server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", SERVER_USER, "--", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        cwd="/",
    )


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return None if not fields or fields[0] == b"Z" else fields[19].decode()


def _remove_leftovers(base: Path) -> None:
    """Stop and remove the clusters of earlier sessions whose pytest process is gone."""
    for entry in base.glob(f"{_PREFIX}*"):
        try:
            pid, start = (entry / _OWNER).read_text().split()
        except (OSError, ValueError):
            pid, start = "0", ""
        if _start_time(int(pid)) == start:
            continue  # a live session's
        data = entry / "data"
        if (data / "postmaster.pid").exists():
            done = _as_server(str(PG_BIN / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate")
            if done.returncode != 0:  # not a cluster pg_ctl can stop: end its postmaster
                with contextlib.suppress(OSError, ValueError, IndexError):
                    postmaster = int((data / "postmaster.pid").read_text().split()[0])
                    os.kill(postmaster, signal.SIGKILL)
        shutil.rmtree(entry, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _options(port: int, root: Path) -> str:
    return (
        f"-p {port} -k {root / 'sock'} -c listen_addresses=127.0.0.1 "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        "-c max_connections=100"
    )


def _fail(what: str, done: subprocess.CompletedProcess[str], log: Path | None = None) -> None:
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}{tail}")


@contextlib.contextmanager
def session_cluster() -> Iterator[PgCluster]:
    """Start a cluster (after removing dead sessions' leftovers); stop and remove it on exit.
    The test that starts it must be marked ``service`` (``helpers.uses_service``)."""
    uses_service("a PostgreSQL cluster")
    require()
    base = Path(tempfile.gettempdir())
    _remove_leftovers(base)
    root = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=base))
    (root / _OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    server = pwd.getpwnam(SERVER_USER)
    password = "pw-" + secrets.token_urlsafe(12)
    try:
        (root / "sock").mkdir()
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        for path in (root, root / "sock", pwfile):
            os.chown(path, server.pw_uid, server.pw_gid)
        os.chmod(root, 0o700)
        os.chmod(pwfile, 0o600)
        done = _as_server(
            str(PG_BIN / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            SERVER_USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
        )
        pwfile.unlink()
        if done.returncode != 0:
            _fail("initdb", done)
        log = root / "server.log"
        for attempt in range(5):
            port = _free_port()
            options = _options(port, root)
            done = _as_server(
                str(PG_BIN / "pg_ctl"),
                "start",
                "-D",
                str(root / "data"),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                options,
            )
            if done.returncode == 0:
                break
            if attempt == 4:  # (another process may have taken the port meanwhile)
                _fail("pg_ctl start", done, log)
            time.sleep(0.2)
        cluster = PgCluster(root=root, bindir=PG_BIN, port=port, password=password)
        yield cluster
    finally:
        if (root / "data" / "postmaster.pid").exists():
            _as_server(str(PG_BIN / "pg_ctl"), "stop", "-D", str(root / "data"), "-m", "fast")
        shutil.rmtree(root, ignore_errors=True)
