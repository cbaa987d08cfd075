"""The command line's secret resolver (DESIGN.md section 7a).

A plan's secret parameter holds a reference (a name such as ``db-password``).
The CLI resolves it from, in this order:

1. the environment variable ``KARBOR_SECRET_<NAME>``: the name upper-cased, with
   ``-`` and ``.`` turned into ``_`` (``db-password`` -> ``KARBOR_SECRET_DB_PASSWORD``);
2. the secrets file given by ``--secrets-file`` (or ``KARBOR_SECRETS_FILE``): a
   TOML file (``.toml``) of ``name = "value"`` strings, or ``NAME=value`` lines
   (``#`` comments and blank lines ignored). A name matches exactly or in its
   environment-variable spelling.

The file must belong to the user running the CLI and be readable by nobody else
(mode ``0600`` or ``0400``); otherwise it is refused before anything runs. It is
read once, before the event loop starts; the resolver itself never blocks and its
errors name the reference, never a value.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path

from karbor_async.exceptions import SecretError

__all__ = ["CliSecrets", "SecretsFileError", "env_name", "load_secrets_file"]

ENV_PREFIX = "KARBOR_SECRET_"


class SecretsFileError(SecretError):
    """The secrets file cannot be used (missing, unsafe permissions, or malformed)."""


def env_name(reference: str) -> str:
    """``db-password`` -> ``KARBOR_SECRET_DB_PASSWORD``."""
    return ENV_PREFIX + re.sub(r"[-.]", "_", reference.upper())


def _check_private(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SecretsFileError(f"secrets file {path}: no such file") from None
    except OSError as exc:
        raise SecretsFileError(f"secrets file {path}: cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SecretsFileError(f"secrets file {path}: not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SecretsFileError(
            f"secrets file {path} is accessible by group or others (mode {mode:04o}); "
            f"it must be readable only by its owner: run `chmod 600 {path}`"
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise SecretsFileError(
            f"secrets file {path} belongs to another user (uid {info.st_uid}); "
            "it must belong to the user running karbor-async"
        )


def load_secrets_file(path: Path) -> dict[str, str]:
    """Read a private secrets file (TOML if it ends in ``.toml``, else ``NAME=value`` lines)."""
    _check_private(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretsFileError(f"secrets file {path}: cannot be read: {exc}") from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # The parser's message quotes no value, only a position.
            raise SecretsFileError(f"secrets file {path}: invalid TOML: {exc}") from None
        values: dict[str, str] = {}
        for name, value in data.items():
            if not isinstance(value, str):
                raise SecretsFileError(
                    f"secrets file {path}: {name!r} must be a string "
                    '(write name = "value"; quote dotted names)'
                )
            values[name] = value
        return values
    values = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if name.startswith("export "):
            name = name[len("export ") :].strip()
        if not sep or not name:
            raise SecretsFileError(f"secrets file {path}:{number}: expected NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name] = value
    return values


class CliSecrets:
    """A :data:`~karbor_async.plugin.SecretResolver` over the environment and a secrets file."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        file_values: Mapping[str, str] | None = None,
        file: Path | None = None,
    ) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self._file = file
        self._values: dict[str, str] = {}
        for name, value in (file_values or {}).items():
            self._values[name] = value
            self._values.setdefault(env_name(name), value)

    @classmethod
    def from_options(
        cls, secrets_file: Path | None, environ: Mapping[str, str] | None = None
    ) -> CliSecrets:
        """Build the resolver the CLI uses (reads and checks the file now, synchronously)."""
        values = load_secrets_file(secrets_file) if secrets_file is not None else None
        return cls(environ, values, secrets_file)

    async def __call__(self, reference: str) -> str:
        variable = env_name(reference)
        value = self._environ.get(variable)
        if value is not None:
            return value
        value = self._values.get(reference)
        if value is None:
            value = self._values.get(variable)
        if value is not None:
            return value
        where = f"and no {reference!r} in {self._file}" if self._file else "and no --secrets-file"
        raise SecretError(f"no environment variable {variable} {where}")
