"""The PostgreSQL store's password on the command line: from the secret resolver or a
PGPASSFILE, never in the arguments, the logs, the errors or the stored rows.

Each test has a role of its own, with a password of its own, owning a database of its
own in the session's cluster. The CLI runs as a real process (``karbor-async`` of this
interpreter, importing this tree through ``PYTHONPATH``), so that its arguments can be
read in the process list while it works, as any user of the machine could.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from karbor_async._cli import EXIT_BAD_INPUT, EXIT_OK
from pgcluster import PgCluster
from test_cli import SIM, Cli, _keep_structlog  # noqa: F401  (the fixture, used by name)

pytest.importorskip("karbor_simcloud")

KARBOR = str(Path(sys.executable).parent / "karbor-async")
PLAN = """\
name = "app"
barrier = "cut"
resources = [{ type = "OS::Keystone::Project", id = "prj-0000001" }]
"""


@attrs.frozen
class Role:
    dsn: str
    """The store's URL, without the password."""
    password: str
    database: str


@pytest.fixture
def role(pg_cluster: PgCluster) -> Role:
    name = pg_cluster.create_database("secret")
    user = f"karbor_{name}"
    password = "Sekr3t-" + secrets.token_hex(8)
    pg_cluster.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
    pg_cluster.psql(f'ALTER DATABASE "{name}" OWNER TO {user}')
    return Role(pg_cluster.dsn(name).replace(f"{pg_cluster.user}@", f"{user}@"), password, name)


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KARBOR_", "PG"))}
    env.update(
        KARBOR_BANK=str(root / "bank"),
        KARBOR_SIMCLOUD_STATE=str(root / "simcloud"),
        KARBOR_DB=str(root / "unused.db"),
        XDG_STATE_HOME=str(root / "state"),
        COLUMNS="200",
        **extra,
    )
    return env


def _secrets_file(root: Path, text: str) -> Path:
    path = root / "secrets.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


@attrs.define
class _ProcessList:
    """``ps -ww -eo pid,args`` taken again and again while a command runs."""

    snapshots: list[str] = attrs.Factory(list)
    stop: threading.Event = attrs.Factory(threading.Event)

    def watch(self) -> None:
        while not self.stop.is_set():
            done = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True)
            self.snapshots.append(done.stdout)
            time.sleep(0.02)


@pytest.fixture
def process_list() -> Iterator[_ProcessList]:
    seen = _ProcessList()
    thread = threading.Thread(target=seen.watch, daemon=True)
    thread.start()
    yield seen
    seen.stop.set()
    thread.join()


def _dump(cluster: PgCluster, database: str) -> str:
    """Every row of the store, as text (``pg_dump --data-only``, as the superuser)."""
    done = subprocess.run(
        [
            str(cluster.bindir / "pg_dump"),
            "-h",
            str(cluster.sockdir),
            "-p",
            str(cluster.port),
            "-U",
            cluster.user,
            "--data-only",
            database,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def test_the_password_from_a_secret_is_never_in_args_logs_errors_or_rows(
    tmp_path: Path, role: Role, pg_cluster: PgCluster, process_list: _ProcessList
) -> None:
    """protect (--secrets-file) and a read command (KARBOR_SECRETS_FILE) reach the store
    with the password of --store-password-secret; debug JSON logs, the output, every
    process's arguments meanwhile and every stored row hold no trace of it."""
    (tmp_path / "plan.toml").write_text(PLAN)
    secrets_file = _secrets_file(tmp_path, f'pg = "{role.password}"\n')
    env = _env(tmp_path)
    common = ["--log-level", "debug", "--log-json", "--store", role.dsn]
    done = subprocess.run(
        [
            *(KARBOR, *common, "--store-password-secret", "pg", "protect", "plan.toml"),
            *("--simcloud", "12:3", "--secrets-file", str(secrets_file), "--json"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    assert '"pg_store_opened"' in done.stderr  # the debug logs were written, and read here
    listed = subprocess.run(
        [KARBOR, *common, "checkpoints", "list", "--json"],
        cwd=tmp_path,
        env={**env, "KARBOR_SECRETS_FILE": str(secrets_file), "KARBOR_STORE_PASSWORD_SECRET": "pg"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == EXIT_OK, listed.stderr[-2000:]
    assert '"status": "available"' in listed.stdout
    process_list.stop.set()
    ran = [s for s in process_list.snapshots if "--store-password-secret" in s]
    assert ran, "the process list never showed the command"
    for text in [done.stdout, done.stderr, listed.stdout, listed.stderr, *process_list.snapshots]:
        assert role.password not in text
    rows = _dump(pg_cluster, role.database)
    assert "prj-0000001" in rows  # (the rows were read)
    assert role.password not in rows


def test_a_wrong_or_missing_password_secret_is_one_line_without_the_value(
    tmp_path: Path, role: Role
) -> None:
    cli = Cli(tmp_path)
    cli.env.update(COLUMNS="1000", KARBOR_STORE=role.dsn, KARBOR_STORE_PASSWORD_SECRET="pg")
    wrong = "wrong-" + role.password
    result = cli("checkpoints", "list", code=EXIT_BAD_INPUT, KARBOR_SECRET_PG=wrong)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot connect to the PostgreSQL store" in lines[0], lines
    assert "password authentication failed" in lines[0]
    assert wrong not in result.output and role.password not in result.output
    result = cli("checkpoints", "list", code=EXIT_BAD_INPUT)
    assert "--store-password-secret pg: no environment variable KARBOR_SECRET_PG" in result.output


def test_the_default_password_secret_is_store_password(
    tmp_path: Path, role: Role, pg_cluster: PgCluster
) -> None:
    """Without --store-password-secret, the secret store-password is the password; a read
    command on the empty database logs in, and leaves it untouched (nothing to read)."""
    cli = Cli(tmp_path)
    cli.env.update(KARBOR_STORE=role.dsn, KARBOR_SECRET_STORE_PASSWORD=role.password)
    result = cli("checkpoints", "list", code=EXIT_BAD_INPUT)
    assert "holds no checkpoint store yet" in result.output
    assert (
        pg_cluster.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", role.database)
        == "0"
    )
    doc = cli.json("protect", str(cli.plan), "--simcloud", SIM)
    assert doc["outcome"]["status"] == "succeeded"
    assert len(cli.json("checkpoints", "list")["checkpoints"]) == 1


def test_the_password_may_come_from_a_pgpassfile(tmp_path: Path, role: Role) -> None:
    host_port = role.dsn.split("@", 1)[1].split("/", 1)[0]
    user = role.dsn.split("//", 1)[1].split("@", 1)[0]
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"{host_port}:{role.database}:{user}:{role.password}\n")
    passfile.chmod(0o600)
    cli = Cli(tmp_path)
    cli.env.update(KARBOR_STORE=role.dsn, PGPASSFILE=str(passfile), PGPASSWORD=None)
    doc = cli.json("protect", str(cli.plan), "--simcloud", SIM)
    assert doc["outcome"]["status"] == "succeeded"


def test_a_password_written_in_the_store_url_argument_is_refused(tmp_path: Path) -> None:
    """Any user of the machine reads arguments in the process list: the URL's password is
    refused there (the same URL from KARBOR_STORE is not visible so, and is taken)."""
    cli = Cli(tmp_path)
    url = "postgresql://karbor:hunter2-Secret@db.example:5432/karbor"
    result = cli("--store", url, "checkpoints", "list", code=EXIT_BAD_INPUT)
    assert "holds a password, which every user of this machine can read" in result.output
    assert "hunter2-Secret" not in result.output
