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
    try:
        encoded = [part.encode("utf-8") for part in parts]
    except UnicodeEncodeError:
        raise BankKeyError(
            f"bank key {key!r} is not valid Unicode text (a lone surrogate); use UTF-8 names"
        ) from None
    for part, raw in zip(parts, encoded, strict=True):
        if len(raw) > _MAX_PART:
            raise BankKeyError(
                f"bank key {key!r} has a part of {len(raw)} bytes ({part[:20]!r}...); each "
                f"part of a key may have at most {_MAX_PART} bytes (split it with '/')"
            )
    if sum(len(raw) + 1 for raw in encoded) > _MAX_KEY:
        raise BankKeyError(f"bank key {key!r} is longer than {_MAX_KEY} bytes; use a shorter key")
    return "/".join(parts)


_MAX_PART = 200
"""Bytes per part: file systems take 255 per name; the bank adds a temp-file prefix."""
_MAX_KEY = 3000
"""Bytes per key: paths are at most 4096 bytes with the bank's root and section."""
