"""Connection settings from a plan, the plugin's own connections, and the client programs.

The password reaches ``pg_dump``/``pg_restore`` only through ``PGPASSFILE``: on
Linux an anonymous memory file (``memfd_create``, mode 0600) inherited by the
child as ``/dev/fd/N``, so it is on no disk and vanishes with the processes even
after a ``kill -9``; elsewhere a 0600 file in a private temporary directory,
removed when the child has ended. Never on a command line, never in a child's
environment.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import attrs

from karbor_async import Resource

__all__ = [
    "PostgresError",
    "Settings",
    "app_name",
    "child_env",
    "conninfo_quote",
    "find_tool",
    "passfile",
    "quote_ident",
    "tool_major",
]

_NAMEDATALEN = 63  # longest identifier and application_name, in bytes


class PostgresError(Exception):
    """A PostgreSQL operation the plugin cannot do: the message names what and why."""


@attrs.frozen
class Settings:
    """Where a database is and how to log in (the plan's parameters, merged)."""

    host: str
    port: int
    user: str
    dbname: str
    password: str | None = attrs.field(default=None, repr=False)
    maintenance_db: str = "postgres"
    bin_dir: str = ""
    connect_timeout: float = 10.0

    @classmethod
    def from_parameters(cls, resource: Resource, parameters: Mapping[str, Any]) -> Settings:
        return cls(
            host=str(parameters.get("host") or "localhost"),
            port=int(parameters.get("port") or 5432),
            user=str(parameters.get("user") or "postgres"),
            dbname=str(parameters.get("dbname") or resource.id),
            password=parameters.get("password"),
            maintenance_db=str(parameters.get("maintenance_db") or "postgres"),
            bin_dir=str(parameters.get("bin_dir") or ""),
            connect_timeout=float(parameters.get("connect_timeout") or 10.0),
        )

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    async def connect(
        self,
        dbname: str | None = None,
        *,
        application_name: str,
        server_settings: Mapping[str, str] | None = None,
    ) -> asyncpg.Connection:
        """An asyncpg connection; failures become a :class:`PostgresError` naming the cause."""
        db = dbname or self.dbname
        settings = {"application_name": application_name, **(server_settings or {})}
        try:
            # A password of None would make asyncpg read ~/.pgpass; "" sends none.
            return await asyncpg.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                password=self.password or "",
                database=db,
                timeout=self.connect_timeout,
                server_settings=settings,
            )
        except asyncpg.InvalidCatalogNameError:
            raise PostgresError(f"database {db!r} does not exist on {self.where}") from None
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            # (the server's message names the user, never the password)
            raise PostgresError(
                f"cannot log in to {db!r} on {self.where}: {exc}; check the password secret"
            ) from None
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise PostgresError(f"cannot connect to {db!r} on {self.where}: {exc}") from None


def conninfo_quote(value: str) -> str:
    """``value`` as a single-quoted libpq conninfo value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def app_name(kind: str, run_id: str, resource: Resource) -> str:
    """``karbor-KIND RUN RESOURCE`` as the server will store it (63 bytes at most,
    printable ASCII), so the plugin can find its own sessions in ``pg_stat_activity``."""
    text = f"karbor-{kind} {run_id} {resource.id}"
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    if len(text) > _NAMEDATALEN:  # keep it unique: the tail becomes a digest of the id
        digest = hashlib.sha256(resource.id.encode()).hexdigest()[:8]
        text = text[: _NAMEDATALEN - 9] + "~" + digest
    return text


def child_env(settings: Settings, application: str, passfile_path: str | None) -> dict[str, str]:
    """The environment of ``pg_dump``/``pg_restore``: ours without any ``PG*`` variable
    (a stray ``PGPASSWORD`` or ``PGSERVICE`` must not decide), plus the connection."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST=settings.host,
        PGPORT=str(settings.port),
        PGUSER=settings.user,
        PGAPPNAME=application,
        PGCONNECT_TIMEOUT=str(max(1, round(settings.connect_timeout))),
    )
    if passfile_path is not None:
        env["PGPASSFILE"] = passfile_path
    return env


def _pgpass_line(password: str) -> bytes:
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:*:*:{escaped}\n".encode()


def _memfd(password: str) -> int:
    fd = os.memfd_create("karbor-pgpass", os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, _pgpass_line(password))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _tempfile(password: str) -> Path:
    where = Path(tempfile.mkdtemp(prefix="karbor-pgpass-"))  # mode 0700
    path = where / "pgpass"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, _pgpass_line(password))
    finally:
        os.close(fd)
    return path


@asynccontextmanager
async def passfile(password: str | None) -> AsyncIterator[tuple[str | None, tuple[int, ...]]]:
    """``(PGPASSFILE, fds to pass)`` for a child started inside the block (``(None, ())``
    without a password). Close nothing yourself; the block's exit does."""
    if password is None:
        yield None, ()
        return
    if sys.platform == "linux" and hasattr(os, "memfd_create"):
        fd = await anyio.to_thread.run_sync(_memfd, password)
        try:
            yield f"/dev/fd/{fd}", (fd,)
        finally:
            os.close(fd)
        return
    path = await anyio.to_thread.run_sync(_tempfile, password)
    try:
        yield str(path), ()
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, path.parent, True)


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return (int(path.parent.parent.name.split(".")[0]),)
    except ValueError:
        return (-1,)


@cache
def _find_tool_sync(name: str, bin_dir: str) -> str:
    if bin_dir:
        path = Path(bin_dir) / name
        if not os.access(path, os.X_OK):
            raise PostgresError(f"{name} not found in bin_dir {bin_dir}")
        return str(path)
    # Debian keeps each major version's programs apart: take the newest (pg_dump must be
    # at least as new as the server).
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=_version_key)
    if found:
        return str(found[-1])
    which = shutil.which(name)
    if which is None:
        raise PostgresError(
            f"{name} not found: install PostgreSQL's client programs (Debian: "
            "postgresql-client-15) or set the bin_dir parameter"
        )
    return which


async def find_tool(name: str, settings: Settings) -> str:
    """The path of ``pg_dump`` or ``pg_restore`` (the ``bin_dir`` parameter's, else the
    newest of ``/usr/lib/postgresql/*/bin``, else ``PATH``'s)."""
    return await anyio.to_thread.run_sync(_find_tool_sync, name, settings.bin_dir)


async def tool_major(path: str) -> int:
    """The major version of a client program (``pg_dump (PostgreSQL) 15.18`` -> 15)."""
    done = await anyio.run_process([path, "--version"], check=False)
    match = re.search(rb"(\d+)(?:\.\d+)?", done.stdout)
    if done.returncode != 0 or match is None:
        raise PostgresError(f"{path} --version failed: {done.stderr.decode(errors='replace')}")
    return int(match.group(1))
