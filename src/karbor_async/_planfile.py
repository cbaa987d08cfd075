"""Plan files: a :class:`~karbor_async.Plan` written as TOML or YAML.

A plan file has the shape of :meth:`Plan.to_json` (see ``docs/cli.md``). Every
mistake is reported as a :class:`PlanFileError` naming the file, the line (when
it can be found), the key (``timeouts.hook``, ``resources[2].id``) and what is
expected, because a CLI user must be able to fix the file from the message alone.

Lines come from the parsers themselves where they keep them: YAML is composed
into nodes, which carry their marks; ``tomllib`` gives a line only for syntax
errors, so for TOML a small scanner maps table headers and ``key =`` lines to
key paths (best effort: a key it cannot place gets the line of its nearest
enclosing key, or none).
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from karbor_async._plan import Plan
from karbor_async.exceptions import PlanError

__all__ = ["PlanFileError", "format_key", "load_plan_file", "plan_from_data"]

KeyPath = tuple[str | int, ...]
Locate = Callable[[KeyPath], int | None]

_BARRIERS = ("none", "main", "cut")
_TOP_KEYS = (
    "name",
    "resources",
    "parameters",
    "barrier",
    "groups",
    "merge_groups",
    "timeouts",
    "limits",
    "crash_consistent_fallback",
    "delete_on_failure",
    "discovery_concurrency",
)
_RESOURCE_KEYS = ("type", "id", "name", "extra")
_GROUP_KEYS = ("name", "resources", "barrier")
_TIMEOUT_SECONDS = ("hook", "run", "quiesce_budget", "abort", "discovery")
_TIMEOUT_TABLES = ("per_plugin", "per_type", "quiesce_budget_per_type")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class PlanFileError(PlanError):
    """A plan file cannot be read or does not describe a valid plan.

    ``file``, ``line`` (1-based, ``None`` when unknown) and ``key`` (a key path)
    say where; the message says what is expected. A file with several mistakes
    raises one error whose ``problems`` lists them all, in the file's order (each
    ``file:line: key: message``; the error's text is one problem per line); its
    ``line`` and ``key`` are the first one's.
    """

    def __init__(
        self, file: Path, message: str, *, key: KeyPath = (), line: int | None = None
    ) -> None:
        where = f"{file}:{line}" if line is not None else str(file)
        label = format_key(key)
        text = f"{where}: {label}: {message}" if label else f"{where}: {message}"
        super().__init__(text)
        self.file = file
        self.line = line
        self.key = key
        self.problems: tuple[str, ...] = (text,)

    @classmethod
    def several(cls, errors: Sequence[PlanFileError]) -> PlanFileError:
        """One error for all of ``errors`` (at least one), sorted by line."""
        ordered = sorted(errors, key=lambda e: math.inf if e.line is None else e.line)
        first = ordered[0]
        if len(ordered) == 1:
            return first
        combined = cls(first.file, "", key=first.key, line=first.line)
        combined.problems = tuple(p for e in ordered for p in e.problems)
        combined.args = ("\n".join(combined.problems),)
        return combined


def format_key(path: KeyPath) -> str:
    """``("timeouts", "hook")`` -> ``timeouts.hook``; ``("resources", 2)`` -> ``resources[2]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
            out += f".{text}" if out else text
    return out


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__} ({value!s})"


# -- reading -------------------------------------------------------------------------------


def load_plan_file(path: Path) -> Plan:
    """Read, check and build the plan in ``path`` (``.toml``, ``.yaml`` or ``.yml``).

    This is synchronous on purpose: the CLI reads the file before its event loop starts.
    """
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise PlanFileError(
            path, f"unknown plan file type {suffix or '(none)'!r}; expected .toml, .yaml or .yml"
        )
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PlanFileError(path, "no such file") from None
    except IsADirectoryError:
        raise PlanFileError(path, "is a directory; expected a plan file") from None
    except OSError as exc:
        raise PlanFileError(path, f"cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PlanFileError(path, "is not UTF-8 text", line=line) from None
    if suffix == ".toml":
        data, locate = _parse_toml(path, text)
    else:
        data, locate = _parse_yaml(path, text)
    return plan_from_data(data, path, locate)


def _parse_toml(path: Path, text: str) -> tuple[Any, Locate]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line = int(found.group(1)) if found else None
        if "(at end of document)" in message:
            line = max(1, len(text.splitlines()))  # the last line: something is left open
            message = message.replace("(at end of document)", "(at the end of the file)")
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        raise PlanFileError(path, f"invalid TOML: {message}", line=line) from None
    return data, _locator(_toml_lines(text))


def _parse_yaml(path: Path, text: str) -> tuple[Any, Locate]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise PlanFileError(path, "is empty; expected a table with name and resources")
        lines: dict[KeyPath, int] = {}
        _yaml_lines(path, node, (), lines)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise PlanFileError(path, f"invalid YAML: {what}", line=line) from None
    except yaml.YAMLError as exc:
        raise PlanFileError(path, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    return data, _locator(lines)


def _yaml_lines(path: Path, node: yaml.Node, at: KeyPath, out: dict[KeyPath, int]) -> None:
    out.setdefault(at, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise PlanFileError(
                    path,
                    "appears twice in the same table",
                    key=(*at, key),
                    line=key_node.start_mark.line + 1,
                )
            seen.add(key)
            out[(*at, key)] = key_node.start_mark.line + 1
            _yaml_lines(path, value_node, (*at, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _yaml_lines(path, item, (*at, index), out)


_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(?:#.*)?$")
_TOML_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_TOML_KEY = re.compile(rf"^\s*({_TOML_KEY_PART}(?:\s*\.\s*{_TOML_KEY_PART})*)\s*=\s*(.*)$")
_TOML_PARTS = re.compile(r"""[A-Za-z0-9_-]+|"((?:[^"\\]|\\.)*)"|'([^']*)'""")


def _toml_key(text: str) -> KeyPath:
    parts: list[str | int] = []
    for m in _TOML_PARTS.finditer(text):
        if m.group(1) is not None:
            parts.append(m.group(1).replace('\\"', '"'))
        elif m.group(2) is not None:
            parts.append(m.group(2))
        else:
            parts.append(m.group(0))
    return tuple(parts)


def _toml_lines(text: str) -> dict[KeyPath, int]:
    """Map key paths to the lines that define them (headers, ``key =``, array items)."""
    out: dict[KeyPath, int] = {}
    table: KeyPath = ()
    arrays: dict[KeyPath, int] = {}
    open_array: KeyPath | None = None
    item = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if open_array is not None:
            if stripped.startswith("]"):
                open_array = None
                continue
            if stripped.startswith(("{", '"', "'")):
                out.setdefault((*open_array, item), number)
                for key in re.finditer(rf"({_TOML_KEY_PART})\s*=", stripped):
                    out.setdefault((*open_array, item, *_toml_key(key.group(1))), number)
                item += 1
            continue
        header = _TOML_HEADER.match(line)
        if header is not None and not _TOML_KEY.match(line):
            path = _toml_key(header.group(2))
            if header.group(1) == "[[":
                index = arrays.get(path, -1) + 1
                arrays[path] = index
                table = (*path, index)
            else:
                table = path
            out.setdefault(table, number)
            continue
        assignment = _TOML_KEY.match(line)
        if assignment is None:
            continue
        path = (*table, *_toml_key(assignment.group(1)))
        out.setdefault(path, number)
        value = assignment.group(2).strip()
        if value.startswith("{"):
            for inner in re.finditer(rf"({_TOML_KEY_PART})\s*=", value):
                out.setdefault((*path, *_toml_key(inner.group(1))), number)
        elif value.startswith("[") and not value.rstrip().endswith("]"):
            open_array, item = path, 0
    return out


def _locator(lines: Mapping[KeyPath, int]) -> Locate:
    def locate(path: KeyPath) -> int | None:
        for end in range(len(path), -1, -1):
            found = lines.get(path[:end])
            if found is not None:
                return found
        return None

    return locate


# -- checking ------------------------------------------------------------------------------


class _Checker:
    """Checks values key by key; a mistake inside a :meth:`section` is kept and the
    checking goes on with the next section, so one run reports every mistake."""

    def __init__(self, file: Path, locate: Locate) -> None:
        self.file = file
        self.locate = locate
        self.errors: list[PlanFileError] = []

    def fail(self, key: KeyPath, message: str) -> PlanFileError:
        return PlanFileError(self.file, message, key=key, line=self.locate(key))

    @contextmanager
    def section(self) -> Iterator[None]:
        """A mistake raised inside is recorded, not raised (what it built is left out)."""
        try:
            yield
        except PlanFileError as exc:
            self.errors.append(exc)

    def note(self, key: KeyPath, message: str) -> None:
        self.errors.append(self.fail(key, message))

    def table(self, value: Any, key: KeyPath, what: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected {what}, got {_describe(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(key, f"keys must be strings, got {_describe(k)}")
        return value

    def keys(self, value: Mapping[str, Any], key: KeyPath, allowed: Sequence[str]) -> None:
        """Record every unknown key (checking goes on)."""
        for k in value:
            if k not in allowed:
                close = difflib.get_close_matches(k, allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.note((*key, k), f"unknown key; {hint}expected one of: {', '.join(allowed)}")

    def list(self, value: Any, key: KeyPath, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list of {what}, got {_describe(value)}")
        return value

    def string(self, value: Any, key: KeyPath, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected {what} (a non-empty string), got {_describe(value)}")
        return value

    def boolean(self, value: Any, key: KeyPath) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_describe(value)}")
        return value

    def whole(self, value: Any, key: KeyPath) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise self.fail(key, f"expected a whole number >= 1, got {_describe(value)}")
        return value

    def seconds(self, value: Any, key: KeyPath, *, nullable: bool) -> float | None:
        if nullable and (value is None or value == "none"):
            return None
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        )
        if not ok:
            extra = ' (or "none" for no limit)' if nullable else ""
            raise self.fail(
                key, f"expected a positive number of seconds{extra}, got {_describe(value)}"
            )
        return float(value)

    def barrier(self, value: Any, key: KeyPath) -> str:
        if value not in _BARRIERS:
            raise self.fail(key, f"expected one of {', '.join(_BARRIERS)}, got {_describe(value)}")
        return str(value)

    def member(self, value: Any, key: KeyPath) -> str:
        if not isinstance(value, str) or value.count("#") < 1 or value.startswith("#"):
            raise self.fail(key, f"expected a resource written TYPE#ID, got {_describe(value)}")
        rtype, _, rid = value.partition("#")
        if not rtype or not rid:
            raise self.fail(key, f"expected a resource written TYPE#ID, got {_describe(value)}")
        return value

    def json_value(self, value: Any, key: KeyPath) -> Any:
        """Parameters are stored with the checkpoint as JSON: no dates, no odd types."""
        if value is None or isinstance(value, str | bool | int):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.fail(key, f"expected a finite number, got {value!r}")
            return value
        if isinstance(value, list):
            return [self.json_value(v, (*key, i)) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return {
                str(k): self.json_value(v, (*key, str(k)))
                for k, v in self.table(value, key, "a table").items()
            }
        raise self.fail(
            key,
            f"expected a string, number, boolean, list or table, got {_describe(value)}; "
            "quote dates and times",
        )


def plan_from_data(data: Any, file: Path, locate: Locate | None = None) -> Plan:
    """Check parsed plan-file data key by key, then build the plan (errors name ``file``).

    Every mistake found is reported (one :class:`PlanFileError` listing them all).
    """
    c = _Checker(file, locate or (lambda _key: None))
    top = c.table(data, (), "a table with the plan's keys (name, resources, ...)")
    c.keys(top, (), _TOP_KEYS)
    for required in ("name", "resources"):
        if required not in top:
            c.note((), f"missing the key {required!r}")
    out: dict[str, Any] = {}
    if "name" in top:
        with c.section():
            out["name"] = c.string(top["name"], ("name",), "the plan's name")
    if "resources" in top:
        with c.section():
            resources = c.list(top["resources"], ("resources",), "resources")
            if not resources:
                raise c.fail(("resources",), "expected at least one resource")
            checked_resources = []
            for i, r in enumerate(resources):
                with c.section():
                    checked_resources.append(_resource(c, r, ("resources", i)))
            out["resources"] = checked_resources
    if "parameters" in top:
        with c.section():
            out["parameters"] = _parameters(c, top["parameters"])
    if "barrier" in top:
        with c.section():
            out["barrier"] = c.barrier(top["barrier"], ("barrier",))
    if "groups" in top:
        with c.section():
            groups = c.list(top["groups"], ("groups",), "consistency groups")
            checked_groups = []
            for i, g in enumerate(groups):
                with c.section():
                    checked_groups.append(_group(c, g, ("groups", i)))
            out["groups"] = checked_groups
    for flag in ("merge_groups", "crash_consistent_fallback", "delete_on_failure"):
        if flag in top:
            with c.section():
                out[flag] = c.boolean(top[flag], (flag,))
    if "timeouts" in top:
        with c.section():
            out["timeouts"] = _timeouts(c, top["timeouts"])
    if "limits" in top:
        with c.section():
            limits = c.table(top["limits"], ("limits",), "a table of plugin or type names")
            checked_limits = {}
            for k, v in limits.items():
                with c.section():
                    checked_limits[k] = c.whole(v, ("limits", k))
            out["limits"] = checked_limits
    if "discovery_concurrency" in top:
        with c.section():
            out["discovery_concurrency"] = c.whole(
                top["discovery_concurrency"], ("discovery_concurrency",)
            )
    if c.errors:
        raise PlanFileError.several(c.errors)
    try:
        return Plan.from_json(out)
    except PlanError as exc:
        raise PlanFileError(file, str(exc)) from None


def _parameters(c: _Checker, value: Any) -> dict[str, Any]:
    params = c.table(value, ("parameters",), 'a table of "Type" or "Type#id"')
    checked: dict[str, Any] = {}
    for target, values in params.items():
        at: KeyPath = ("parameters", target)
        with c.section():
            if target.startswith("#") or target.endswith("#"):
                raise c.fail(at, "expected a resource type or TYPE#ID as the key")
            table = c.table(values, at, "a table of parameter names and values")
            entry: dict[str, Any] = {}
            for k, v in table.items():
                with c.section():
                    entry[k] = c.json_value(v, (*at, k))
            checked[target] = entry
    return checked


def _resource(c: _Checker, value: Any, at: KeyPath) -> dict[str, Any]:
    if isinstance(value, str):
        rtype, _, rid = c.member(value, at).partition("#")
        return {"type": rtype, "id": rid}
    table = c.table(value, at, "a resource: a table with type and id, or a TYPE#ID string")
    c.keys(table, at, _RESOURCE_KEYS)
    missing = [k for k in ("type", "id") if k not in table]
    if missing:
        raise c.fail(at, " and ".join(f"the resource is missing the key {k!r}" for k in missing))
    rid = table["id"]
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    out: dict[str, Any] = {
        "type": c.string(table["type"], (*at, "type"), "the resource type"),
        "id": c.string(rid, (*at, "id"), "the resource id"),
    }
    if "name" in table:
        name = table["name"]
        if not isinstance(name, str):
            raise c.fail((*at, "name"), f"expected a string, got {_describe(name)}")
        out["name"] = name
    if "extra" in table:
        extra = c.table(table["extra"], (*at, "extra"), "a table")
        out["extra"] = c.json_value(extra, (*at, "extra"))
    return out


def _group(c: _Checker, value: Any, at: KeyPath) -> dict[str, Any]:
    table = c.table(value, at, "a consistency group: a table with name and resources")
    c.keys(table, at, _GROUP_KEYS)
    if "name" not in table:
        raise c.fail(at, "the group is missing the key 'name'")
    out: dict[str, Any] = {}
    with c.section():
        out["name"] = c.string(table["name"], (*at, "name"), "the group's name")
    with c.section():
        members = c.list(table.get("resources", []), (*at, "resources"), "TYPE#ID strings")
        checked = []
        for i, m in enumerate(members):
            with c.section():
                checked.append(c.member(m, (*at, "resources", i)))
        out["resources"] = checked
    if table.get("barrier") is not None:
        with c.section():
            out["barrier"] = c.barrier(table["barrier"], (*at, "barrier"))
    return out


def _timeouts(c: _Checker, value: Any) -> dict[str, Any]:
    at: KeyPath = ("timeouts",)
    table = c.table(value, at, "a table of time limits in seconds")
    c.keys(table, at, (*_TIMEOUT_SECONDS, *_TIMEOUT_TABLES, "lease_wait"))
    out: dict[str, Any] = {}
    for key in _TIMEOUT_SECONDS:
        if key in table:
            with c.section():
                nullable = key not in ("abort", "discovery")
                out[key] = c.seconds(table[key], (*at, key), nullable=nullable)
    if "lease_wait" in table:
        value = table["lease_wait"]
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        if not ok or not math.isfinite(value):
            c.note((*at, "lease_wait"), f"expected 0 or more seconds, got {_describe(value)}")
        else:
            out["lease_wait"] = float(value)
    for key in _TIMEOUT_TABLES:
        if key in table:
            with c.section():
                sub = c.table(table[key], (*at, key), "a table of names and seconds")
                entries: dict[str, float | None] = {}
                for k, v in sub.items():
                    with c.section():
                        entries[k] = c.seconds(v, (*at, key, k), nullable=False)
                out[key] = entries
    return out
