"""Finding plugins (entry points or explicit) and checking who handles which type."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

import attrs

from karbor_async.exceptions import PluginConflictError, PluginError
from karbor_async.plugin import Protectable, ProtectionPlugin, ResourceType

__all__ = ["PROTECTABLES_GROUP", "PROTECTIONS_GROUP", "PluginRegistry"]

PROTECTIONS_GROUP = "karbor_async.protections"
PROTECTABLES_GROUP = "karbor_async.protectables"


def _load_group(group: str) -> list[Any]:
    loaded: list[Any] = []
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
            loaded.append(obj() if isinstance(obj, type) else obj)
        except Exception as exc:
            raise PluginError(
                f"entry point {ep.name!r} ({ep.value}) in group {group!r} failed to load: {exc}"
            ) from exc
    return loaded


@attrs.frozen
class TypeBinding:
    """The plugin that handles one resource type, with the type's declaration."""

    plugin: ProtectionPlugin
    spec: ResourceType


class PluginRegistry:
    """Which protection plugin handles each type, and which protectables find dependents."""

    def __init__(
        self,
        protections: Iterable[ProtectionPlugin] = (),
        protectables: Iterable[Protectable] = (),
        *,
        discover: bool = True,
        prefer: Mapping[str, str] | None = None,
    ) -> None:
        plugins = list(protections)
        finders = list(protectables)
        if discover:
            plugins += _load_group(PROTECTIONS_GROUP)
            finders += _load_group(PROTECTABLES_GROUP)
        prefer = dict(prefer or {})
        self.plugins: dict[str, ProtectionPlugin] = {}
        for plugin in plugins:
            if not isinstance(plugin, ProtectionPlugin):
                raise PluginError(
                    f"{plugin!r} is not a ProtectionPlugin; subclass "
                    "karbor_async.plugin.ProtectionPlugin"
                )
            name = plugin.plugin_name()
            if name in self.plugins and type(self.plugins[name]) is type(plugin):
                continue  # the same plugin given explicitly and found by discovery
            if name in self.plugins:
                raise PluginError(f"two plugins are named {name!r}; plugin names must be unique")
            self.plugins[name] = plugin
        self.types: dict[str, TypeBinding] = {}
        claims: dict[str, list[TypeBinding]] = {}
        for plugin in self.plugins.values():
            for spec in plugin.types:
                claims.setdefault(spec.name, []).append(TypeBinding(plugin, spec))
        for rtype, bindings in claims.items():
            if len(bindings) == 1:
                self.types[rtype] = bindings[0]
                continue
            names = [b.plugin.plugin_name() for b in bindings]
            chosen = [b for b in bindings if b.plugin.plugin_name() == prefer.get(rtype)]
            if not chosen:
                raise PluginConflictError(
                    f"plugins {' and '.join(repr(n) for n in names)} both handle {rtype!r}; "
                    f"pass prefer={{{rtype!r}: <plugin name>}} to choose one"
                )
            self.types[rtype] = chosen[0]
        for rtype, name in prefer.items():
            if name not in self.plugins:
                raise PluginError(
                    f"prefer names plugin {name!r} for {rtype!r}, but it is not loaded"
                )
        self.protectables: dict[str, list[Protectable]] = {}
        for finder in finders:
            if not isinstance(finder, Protectable):
                raise PluginError(
                    f"{finder!r} is not a protectable: it needs resource_type, parent_types "
                    "and an async dependents(parent) method"
                )
            for parent in finder.parent_types:
                self.protectables.setdefault(parent, []).append(finder)

    def binding(self, rtype: str) -> TypeBinding | None:
        return self.types.get(rtype)

    def finders_under(self, parent_type: str) -> list[Protectable]:
        return self.protectables.get(parent_type, [])
