"""The CLI on the PostgreSQL store: ``--store postgresql://...`` (or ``KARBOR_STORE``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from karbor_async._cli import EXIT_BAD_INPUT, EXIT_OK
from pgcluster import PgCluster
from test_cli import SIM, Cli, _keep_structlog  # noqa: F401  (the fixture, used by name)

pytest.importorskip("karbor_simcloud")


def test_protect_restore_delete_on_a_postgresql_store(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """The round trip of the SQLite CLI, with the store in PostgreSQL (no --db file made)."""
    cli = Cli(tmp_path)
    url = pg_cluster.dsn(pg_cluster.create_database("cli"))
    cli.env.update(KARBOR_STORE=url, PGPASSWORD=pg_cluster.password)
    cp_id = cli.protect()
    [cp] = cli.json("checkpoints", "list")["checkpoints"]
    assert cp["id"] == cp_id and cp["status"] == "available"
    doc = cli.json("restore", cp_id, "--simcloud", SIM, "--param", "*.target_project=prj-new")
    assert doc["exit_code"] == EXIT_OK
    assert [r["operation"] for r in cli.json("runs", "list")["runs"]] == ["restore", "protect"]
    assert cli.json("delete", cp_id, "--simcloud", SIM)["outcome"]["status"] == "succeeded"
    assert not (tmp_path / "karbor.db").exists()


def test_a_store_that_cannot_be_reached_is_one_line_without_the_password(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    cli = Cli(tmp_path)
    cli.env["COLUMNS"] = "1000"  # one line, not one wrapped by the terminal's width
    url = pg_cluster.dsn().replace("postgres@", "postgres:not-the-Password@")
    result = cli("checkpoints", "list", code=EXIT_BAD_INPUT, KARBOR_STORE=url)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "cannot connect to the PostgreSQL store" in lines[0]
    assert "not-the-Password" not in result.output


def test_store_takes_only_a_postgresql_url(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    result = cli("--store", "karbor.db", "checkpoints", "list", code=EXIT_BAD_INPUT)
    assert "a SQLite store is chosen with --db" in result.output
