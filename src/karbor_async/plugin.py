"""The vendor-facing plugin contract (Karbor's four-hook protocol on ``async`` coroutines).

A *protection plugin* declares the resource types it handles and, per operation
(protect, restore, delete) and type, returns an operation object with up to four
optional hook coroutines::

    class VolumeProtect:
        async def on_prepare_finish(self, ctx: HookContext) -> None: ...  # the cut
        async def on_main(self, ctx: HookContext) -> None: ...            # the copy

A *protectable* finds the dependents of a resource, so a plan that names a server
also protects its volumes. Both are found through entry points
(``karbor_async.protections`` and ``karbor_async.protectables``) or passed to the
engine explicitly. See ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import attrs

from karbor_async._log import get_logger
from karbor_async._types import (
    AbortReason,
    Hook,
    OperationKind,
    Resource,
    ResourceKey,
    coerce_enum,
)

if TYPE_CHECKING:
    import structlog

__all__ = [
    "Bank",
    "BankSection",
    "CheckContext",
    "HookContext",
    "Param",
    "Protectable",
    "ProtectionPlugin",
    "ResourceType",
    "SecretResolver",
    "get_logger",
]

SecretResolver = Callable[[str], Awaitable[str]]
"""The application's way to turn a secret reference (a name) into its value."""

_PARAM_KINDS: tuple[type, ...] = (str, int, float, bool, list, dict)


def _operations(value: Iterable[OperationKind | str] | str) -> frozenset[OperationKind]:
    items = (value,) if isinstance(value, str) else value
    ops = frozenset(coerce_enum(OperationKind, v, "Param operations") for v in items)
    if not ops:
        raise ValueError("Param operations must name at least one of protect, restore, delete")
    return ops


@attrs.frozen
class Param:
    """One parameter a plugin accepts for a resource type.

    ``kind`` is one of ``str``, ``int``, ``float``, ``bool``, ``list``, ``dict``.
    A ``secret`` parameter holds a reference (a name) in the plan; the engine
    resolves it through the application's resolver just before the hook runs,
    and the value never reaches logs, events or the stored plan.

    ``required``: ``True`` or ``False``; left ``None`` it means required for a
    secret with no ``default`` and optional otherwise (after construction it is
    always a bool). ``operations`` (default: all three) says for which operations
    the parameter is validated, resolved and passed to the hooks: a password only
    protect needs is declared ``operations={"protect"}``, so restore and delete
    neither ask for it nor see it.
    """

    kind: type = attrs.field(default=str)
    default: Any = None
    required: bool | None = None
    secret: bool = False
    description: str = ""
    operations: frozenset[OperationKind] = attrs.field(
        default=frozenset(OperationKind), converter=_operations
    )

    def __attrs_post_init__(self) -> None:
        if self.required is None:
            object.__setattr__(self, "required", self.secret and self.default is None)
        elif not isinstance(self.required, bool):
            raise TypeError(f"Param required must be True, False or None, not {self.required!r}")

    @kind.validator
    def _check_kind(self, _attribute: object, value: type) -> None:
        if value not in _PARAM_KINDS:
            names = ", ".join(k.__name__ for k in _PARAM_KINDS)
            raise TypeError(f"Param kind must be one of {names}, not {value!r}")


@attrs.frozen
class ResourceType:
    """A resource type a protection plugin handles.

    ``quiesces``: its protect ``on_prepare_begin`` freezes the resource, so the
    engine commits a record before calling it (recovery then knows what to thaw)
    and measures its quiesce window. ``snapshots``: the type takes a cut; a server
    that only quiesces sets this to ``False``. ``parameters``: what the plan may
    set for this type (``None`` accepts anything, unchecked).
    ``cut_outlives_process``: the cut survives the engine's process (a snapshot on
    an array, a reflink clone). A cut held by the process itself (an open read
    transaction, an exported database snapshot) sets it to ``False``: after a
    crash before its ``on_main`` ended, recovery cannot resume that copy (it would
    copy a later state), so it fails the group and deletes what was saved. And when a
    run stops short after such a cut and before its ``on_main`` finished (its group
    aborted, the run was cancelled), its ``on_prepare_finish`` is called once more
    with ``ctx.aborting`` set, so the plugin closes what holds the cut.
    ``host_bound``: its hooks act on this host (a local file system): with workers
    on several hosts (the Temporal backend), its ``on_main`` and ``on_complete`` run
    on the worker that ran its group's prepare. A type with
    ``cut_outlives_process=False`` is kept on that worker's process anyway.
    """

    name: str
    quiesces: bool = False
    snapshots: bool = True
    parameters: Mapping[str, Param] | None = None
    cut_outlives_process: bool = True
    host_bound: bool = False


class ProtectionPlugin:
    """Base class for protection plugins. Subclass and override what you need.

    ``get_protect_operation`` (and restore, delete) return an object whose
    ``on_prepare_begin``, ``on_prepare_finish``, ``on_main`` and ``on_complete``
    coroutines the engine calls; any hook the object lacks is a no-op, and
    ``None`` means the operation does nothing for that type.
    """

    name: ClassVar[str] = ""
    """Unique plugin name (used in plans for limits and timeouts). Defaults to the class name."""
    types: ClassVar[tuple[ResourceType, ...]] = ()
    hook_timeout: ClassVar[float | None] = None
    """This plugin's default time limit per hook, in seconds; a plan may override it."""

    def get_protect_operation(self, resource_type: str) -> object | None:
        return None

    def get_restore_operation(self, resource_type: str) -> object | None:
        return None

    def get_delete_operation(self, resource_type: str) -> object | None:
        return None

    def get_operation(self, kind: OperationKind, resource_type: str) -> object | None:
        if kind is OperationKind.PROTECT:
            return self.get_protect_operation(resource_type)
        if kind is OperationKind.RESTORE:
            return self.get_restore_operation(resource_type)
        return self.get_delete_operation(resource_type)

    def plugin_name(self) -> str:
        """The plugin's name: ``name`` if set, else the class name."""
        return self.name or type(self).__name__


@runtime_checkable
class Protectable(Protocol):
    """Finds the dependents of one type under a parent (Karbor's protectable plugin).

    ``dependents(parent)`` is called for every resource whose type is in
    ``parent_types`` and returns the resources of ``resource_type`` that the
    parent depends on (the volumes attached to a server).
    """

    resource_type: str
    parent_types: tuple[str, ...]

    async def dependents(self, parent: Resource) -> Iterable[Resource]: ...


class BankSection(Protocol):
    """One resource's part of a checkpoint in the bank (an object-store API).

    Keys are relative paths (``"data/0001"``); ``..``, absolute paths and empty
    parts are refused with :class:`~karbor_async.exceptions.BankKeyError`.
    Writes are atomic. A restore gets a read-only section.
    """

    @property
    def read_only(self) -> bool: ...

    async def put(self, key: str, data: bytes) -> None: ...

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> int: ...

    async def get(self, key: str) -> bytes: ...

    def get_stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]: ...

    async def list(self, prefix: str = "") -> list[str]: ...

    async def delete(self, key: str) -> None: ...


class Bank(Protocol):
    """Where plugins keep the data they save, sectioned per checkpoint and resource.

    A bank may also offer ``async def free_bytes() -> int`` (``FsBank`` does:
    ``statvfs`` of its file system), the room left for writing, so a copy that
    cannot fit can be refused before it starts; callers look it up with
    ``getattr``, since not every bank can tell.
    """

    def section(
        self, checkpoint_id: str, resource: ResourceKey, *, read_only: bool = False
    ) -> BankSection: ...

    async def delete_checkpoint(self, checkpoint_id: str) -> None: ...


@attrs.frozen(eq=False)
class CheckContext:
    """What an operation object's optional ``async def check(self, ctx)`` gets.

    The engine calls ``check`` for every resource while it builds a run (protect,
    restore, delete; not when recovering a run a dead engine left), before
    anything is stored or frozen, with the resource's merged parameters (secrets
    resolved). Whatever it raises becomes a
    :class:`~karbor_async.exceptions.PlanError` naming the resource, and no hook
    runs. It is not a fifth hook: it runs once per resource per run, outside the
    phases, bounded by ``Timeouts.discovery``. ``bank`` is the engine's whole bank
    (``free_bytes()`` where it has one); ``saved`` is the resource's saved info in
    the checkpoint a restore or delete works on (empty for a protect).
    """

    resource: Resource
    operation: OperationKind
    parameters: Mapping[str, Any]
    bank: Bank
    run_id: str
    checkpoint_id: str
    children: tuple[Resource, ...] = ()
    parents: tuple[Resource, ...] = ()
    saved: Mapping[str, Any] = attrs.Factory(dict)


class _RunFacts(Protocol):
    @property
    def operation(self) -> OperationKind: ...
    @property
    def run_id(self) -> str: ...
    @property
    def checkpoint_id(self) -> str: ...


class _HookHandle(Protocol):
    """What the engine gives a context to act on (private; vendors use HookContext)."""

    @property
    def run(self) -> _RunFacts: ...
    @property
    def attempt(self) -> int: ...
    def bank_section(self) -> BankSection: ...

    def saved_info(self, key: ResourceKey) -> Mapping[str, Any]: ...
    def save_info(self, info: Mapping[str, Any]) -> None: ...
    def progress(
        self, fraction: float | None, done: int | None, total: int | None, message: str | None
    ) -> None: ...
    def mark(self, what: str, at: float | None, hook: Hook, aborting: bool) -> None: ...
    async def report_restored(self, new_id: str) -> None: ...
    def restored_id(self, key: ResourceKey) -> str | None: ...
    async def arm_safety_thaw(
        self,
        hook: Hook,
        aborting: bool,
        command: Sequence[str] | None,
        function: str | None,
        args: Mapping[str, Any] | None,
    ) -> None: ...
    def neighbours(self, parents: bool) -> tuple[Resource, ...]: ...
    def logger(self, hook: Hook) -> structlog.stdlib.BoundLogger: ...


@attrs.frozen(eq=False)
class HookContext:
    """Everything a hook gets, in one frozen object (new fields never break a plugin).

    ``aborting`` is set when ``on_prepare_finish`` is called to thaw without
    cutting (the run failed, was cancelled, timed out, the quiesce budget ran
    out, or a restarted engine is recovering); ``abort_error`` is the failure
    that caused it, if any. ``attempt`` starts at 1 and grows each time a
    recovered run re-runs the hook: hooks must be idempotent per attempt.
    """

    resource: Resource
    hook: Hook
    parameters: Mapping[str, Any]
    _handle: _HookHandle = attrs.field(alias="handle", repr=False)
    aborting: AbortReason | None = None
    abort_error: BaseException | None = None

    # Run-wide facts come through the handle: fewer fields make the per-hook object cheap.
    @property
    def operation(self) -> OperationKind:
        """Protect, restore or delete."""
        return self._handle.run.operation

    @property
    def run_id(self) -> str:
        return self._handle.run.run_id

    @property
    def checkpoint_id(self) -> str:
        return self._handle.run.checkpoint_id

    @property
    def attempt(self) -> int:
        """1, then one more each time a recovered run re-runs this hook."""
        return self._handle.attempt

    @property
    def bank(self) -> BankSection:
        """This resource's section of the checkpoint in the bank."""
        return self._handle.bank_section()

    @property
    def children(self) -> tuple[Resource, ...]:
        """The resources this one depends on (a server's volumes)."""
        return self._handle.neighbours(False)

    @property
    def parents(self) -> tuple[Resource, ...]:
        """The resources that depend on this one."""
        return self._handle.neighbours(True)

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        """A structlog logger bound to the run, resource (``TYPE#ID``) and hook.

        It writes to the standard ``logging`` logger ``karbor_async.plugins``, silent
        until the application configures logging; a call below that logger's level
        costs next to nothing. A plugin's own modules log through :func:`get_logger`.
        """
        return self._handle.logger(self.hook)

    @property
    def recovering(self) -> bool:
        """True when a restarted engine is finishing or thawing what a crashed one left."""
        return self.aborting is AbortReason.RECOVERY

    # -- saved info ----------------------------------------------------------------
    @property
    def saved(self) -> Mapping[str, Any]:
        """This resource's saved info (what earlier hooks or attempts stored)."""
        return self._handle.saved_info(self.resource.key)

    def saved_info(self, resource: Resource | ResourceKey) -> Mapping[str, Any]:
        """The saved info of any resource of the checkpoint (empty if none)."""
        key = resource.key if isinstance(resource, Resource) else resource
        return self._handle.saved_info(key)

    def save(self, **info: Any) -> None:
        """Merge ``info`` (JSON-serialisable values) into this resource's saved info."""
        self._handle.save_info(info)

    # -- progress and consistency marks --------------------------------------------
    def report_progress(
        self,
        fraction: float | None = None,
        *,
        done: int | None = None,
        total: int | None = None,
        message: str | None = None,
    ) -> None:
        """Report progress; cheap enough to call for every chunk copied."""
        self._handle.progress(fraction, done, total, message)

    def mark_cut(self, at: float | None = None) -> None:
        """Record the instant this resource's consistent image was taken (default: now).

        Only in protect's non-aborting ``on_prepare_finish`` of a type that
        snapshots, once, with ``at`` (engine clock) between the call's start and
        now. A refused mark raises :class:`~karbor_async.exceptions.MarkError`
        (in an aborting call it is a ``mark_refused`` warning event instead).
        """
        self._handle.mark("cut", at, self.hook, self.aborting is not None)

    def mark_quiesced(self, at: float | None = None) -> None:
        """Record the instant the resource became frozen (default: now).

        Only in protect's ``on_prepare_begin`` of a type that quiesces, once per
        call, with ``at`` between the call's start and now.
        """
        self._handle.mark("quiesced", at, self.hook, self.aborting is not None)

    def mark_thawed(self, at: float | None = None) -> None:
        """Record the instant the resource was thawed (default: now).

        Only in protect's ``on_prepare_finish`` (aborting or not) of a type that
        quiesces, once per call, with ``at`` between the later of the call's start
        and the quiesce, and now. On a resource that never quiesced it is ignored.
        """
        self._handle.mark("thawed", at, self.hook, self.aborting is not None)

    # -- the dead-man thaw --------------------------------------------------------------
    async def arm_safety_thaw(
        self,
        *,
        command: Sequence[str] | None = None,
        function: str | None = None,
        args: Mapping[str, Any] | None = None,
    ) -> None:
        """Register this resource's safety thaw with the engine's sentinel, before freezing.

        Only in protect's ``on_prepare_begin`` of a type that quiesces. Give
        either ``command`` (an argument list, run with ``/`` as its working
        directory) or ``function`` (``"package.module:function"``, imported when
        armed and called with ``**args``, JSON-able). The sentinel, a process of
        its own, runs it if this process dies while the resource may be frozen,
        or if the resource stays frozen past its quiesce budget plus the engine's
        ``safety_margin`` (with no budget: on the process's death only). The
        engine disarms it when the thaw is recorded. It must be idempotent:
        recovery still calls the aborting thaw after it. Raises
        :class:`~karbor_async.exceptions.PluginError` when refused (wrong hook or
        type) and ``RuntimeError`` when the sentinel cannot arm it: the hook
        then fails before it froze anything.
        """
        await self._handle.arm_safety_thaw(
            self.hook, self.aborting is not None, command, function, args
        )

    # -- restore ---------------------------------------------------------------------
    async def report_restored(self, new_id: str) -> None:
        """Report the id of what this restore hook created; durable when this returns."""
        await self._handle.report_restored(new_id)

    def restored_id(self, resource: Resource | ResourceKey) -> str | None:
        """The new id a restore hook of this run (or an earlier attempt of it) reported for
        ``resource``, visible as soon as its ``report_restored`` returned; else ``None``."""
        key = resource.key if isinstance(resource, Resource) else resource
        return self._handle.restored_id(key)
