"""The engine names this package uses, imported in one place.

Everything here comes from karbor-async's public API (the package root and
``karbor_async.plugin``).
"""

from __future__ import annotations

from karbor_async import AbortReason, Hook, OperationKind, Resource, ResourceKey
from karbor_async.plugin import (
    Bank,
    BankSection,
    HookContext,
    Param,
    Protectable,
    ProtectionPlugin,
    ResourceType,
    get_logger,
)
from karbor_async.store import owner_gone, this_process

__all__ = [
    "AbortReason",
    "Bank",
    "BankSection",
    "Hook",
    "HookContext",
    "OperationKind",
    "Param",
    "Protectable",
    "ProtectionPlugin",
    "Resource",
    "ResourceKey",
    "ResourceType",
    "get_logger",
    "owner_gone",
    "this_process",
]
