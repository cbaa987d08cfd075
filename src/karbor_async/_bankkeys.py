"""Bank key validation shared by every bank implementation."""

from __future__ import annotations

from karbor_async.exceptions import BankKeyError

__all__ = ["validate_key"]


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise :class:`BankKeyError`."""
    if not isinstance(key, str) or not key:
        raise BankKeyError("a bank key must be a non-empty string such as 'data/0001'")
    if key.startswith(("/", "\\")) or (len(key) > 1 and key[1] == ":"):
        raise BankKeyError(f"bank key {key!r} is absolute; use a relative key such as 'data/0001'")
    parts = key.replace("\\", "/").split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise BankKeyError(
                f"bank key {key!r} has an empty, '.' or '..' part; keys cannot leave their section"
            )
    if "\x00" in key:
        raise BankKeyError(f"bank key {key!r} contains a NUL character")
    return "/".join(parts)
