"""How plugins created by entry-point discovery (with no arguments) find their simulated cloud.

Resolution order, at every hook call (not at construction, so a plugin made
before the cloud still finds it):

1. the cloud given to the plugin's constructor (``VolumeProtection(cloud=c)``);
2. the cloud bound in the current context by ``with use_cloud(c):`` (a
   context variable, so it reaches the tasks the engine starts inside the
   block, and two runs in one process can use two clouds);
3. the process-wide default set by :func:`set_cloud`.

With none of these, a hook raises :class:`NoCloudError` naming the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from karbor_simcloud._cloud import SimCloud

__all__ = ["NoCloudError", "current_cloud", "set_cloud", "use_cloud"]


class NoCloudError(RuntimeError):
    """No simulated cloud is configured for the plugins to act on."""


_default: SimCloud | None = None
_current: ContextVar[SimCloud | None] = ContextVar("karbor_simcloud_cloud", default=None)


def set_cloud(cloud: SimCloud | None) -> SimCloud | None:
    """Make ``cloud`` the process-wide default (``None`` clears it); returns the previous one."""
    global _default
    previous, _default = _default, cloud
    return previous


@contextlib.contextmanager
def use_cloud(cloud: SimCloud) -> Iterator[SimCloud]:
    """Bind ``cloud`` for code (and tasks started) inside the ``with`` block."""
    token = _current.set(cloud)
    try:
        yield cloud
    finally:
        _current.reset(token)


def current_cloud() -> SimCloud:
    """The cloud that plugins without an explicit one act on (see the module docstring)."""
    cloud = _current.get()
    if cloud is not None:
        return cloud
    if _default is not None:
        return _default
    raise NoCloudError(
        "no simulated cloud is configured: call karbor_simcloud.set_cloud(SimCloud.generate(...)) "
        "or wrap the run in `with karbor_simcloud.use_cloud(cloud):`"
    )
