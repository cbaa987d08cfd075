"""The public face: every public module declares __all__ and leaks nothing private."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest

import karbor_async

PUBLIC = [
    "karbor_async",
    "karbor_async.plugin",
    "karbor_async.exceptions",
    "karbor_async.testing",
    "karbor_async.events",
    "karbor_async.store",
    "karbor_async.temporal",  # (the Temporal backend: needs the temporal extra)
]


def _public_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(karbor_async.__path__, "karbor_async.")]
    return ["karbor_async"] + [n for n in names if not n.rsplit(".", 1)[1].startswith("_")]


def test_the_public_modules_are_the_intended_ones() -> None:
    assert sorted(_public_modules()) == sorted(PUBLIC + _extra_public())


def _extra_public() -> list[str]:
    return [m for m in _public_modules() if m not in PUBLIC and m.endswith(".cli")]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_module_declares_all_and_exports_no_private_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for item in exported:
        assert not item.startswith("_"), f"{name} exports private {item}"
        obj = getattr(module, item)
        assert not isinstance(obj, types.ModuleType), f"{name}.{item} is a module"


@pytest.mark.parametrize("name", PUBLIC)
def test_every_exported_class_lives_under_its_public_name(name: str) -> None:
    """Objects exported publicly are importable from the module that exports them."""
    module = importlib.import_module(name)
    for item in module.__all__:
        assert hasattr(module, item)
