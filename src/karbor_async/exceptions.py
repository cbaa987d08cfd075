"""The exceptions karbor-async raises, named by what the caller does about them.

Everything derives from :class:`KarborError`. Input mistakes (:class:`PlanError`,
:class:`GraphError`, :class:`PluginConflictError`, :class:`SecretError`) are raised
before any hook runs. A run that fails or is cancelled raises :class:`RunError`, an
exception group that carries the run's outcome.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from karbor_async._outcome import RunOutcome
    from karbor_async._types import Hook, Resource

__all__ = [
    "BankKeyError",
    "CheckpointBusyError",
    "CheckpointNotFoundError",
    "CorruptStoreError",
    "CutLostError",
    "ForeignFileError",
    "GraphError",
    "HookError",
    "HookTimeoutError",
    "IllegalTransitionError",
    "KarborError",
    "LeaseHeldError",
    "LeaseLostError",
    "MarkError",
    "NewerSchemaError",
    "PlanError",
    "PluginConflictError",
    "PluginError",
    "ResourceBusyError",
    "RunCancelledError",
    "RunError",
    "ScrubbedError",
    "SecretError",
    "StoreBusyError",
    "StoreError",
    "StoreFileError",
    "StoreUnavailableError",
    "ThawFailedError",
]


class KarborError(Exception):
    """Base of every error karbor-async raises on purpose."""


class PlanError(KarborError, ValueError):
    """The plan is wrong: fix it (the message names the resource, key and what is expected)."""


class GraphError(KarborError):
    """The resource graph cannot be built: a cycle, an unknown type, or a failing protectable."""


class PluginError(KarborError):
    """A plugin is missing or misdeclared: install or fix the plugin."""


class MarkError(PluginError, ValueError):
    """A hook marked cut, quiesced or thawed where the rules refuse it (the message says
    which rule): fix the plugin's marks."""


class PluginConflictError(PluginError):
    """Two plugins claim the same resource type: pass ``prefer=`` to say which wins."""


class SecretError(KarborError):
    """A secret parameter could not be resolved: give the engine a resolver that knows it."""


class StoreError(KarborError):
    """The checkpoint store refused an operation."""


class StoreFileError(StoreError):
    """The store file cannot be used; it was left untouched."""


class ForeignFileError(StoreFileError):
    """The file is not a karbor-async store: point the engine at its own file."""


class NewerSchemaError(StoreFileError):
    """The file was written by a newer karbor-async: upgrade this one."""


class CorruptStoreError(StoreFileError):
    """The file is a karbor-async store but is damaged: restore it from a copy."""


class LeaseHeldError(StoreError):
    """Another live owner holds this run's lease: leave the run to it.

    ``run_id``, ``owner`` (host:pid:start:nonce) and ``expires`` (wall clock) say
    which run, held by whom, until when (renewed while that owner lives)."""

    def __init__(self, run_id: str, owner: str, expires: float) -> None:
        left = max(0.0, expires - time.time())
        super().__init__(
            f"run {run_id!r} is held by {owner} until "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(expires))} (another "
            f"{left:.1f} s, renewed while that engine lives); leave it to that engine, or "
            "retry after that"
        )
        self.run_id = run_id
        self.owner = owner
        self.expires = expires


class ResourceBusyError(StoreError):
    """Another live run holds a resource this run would quiesce or cut: wait for it, or
    retry after (``Timeouts.lease_wait`` waits that long first).

    ``resource`` (type, id), ``run_id``, ``owner`` and ``expires`` (wall clock; None when
    the holder lives in this process) say which resource, held by which run, whose
    engine, until when."""

    def __init__(
        self, resource: tuple[str, str], run_id: str, owner: str, expires: float | None
    ) -> None:
        until = (
            ""
            if expires is None
            else f" until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(expires))}"
            " (renewed while it lives)"
        )
        super().__init__(
            f"{resource[0]}#{resource[1]} is held by run {run_id} of {owner}{until}: two "
            "runs never freeze or cut one resource; retry after that run ends, or set "
            "timeouts.lease_wait to wait for it"
        )
        self.resource = resource
        self.run_id = run_id
        self.owner = owner
        self.expires = expires


class StoreBusyError(StoreError):
    """The store stayed locked by another process past its busy timeout: nothing was
    written by this step; retry after that process's transaction ends."""


class StoreUnavailableError(StoreError):
    """The store's server could not be reached again within its reconnect window after a
    lost connection: what was not written is kept and written once it is back (a run
    that needed it ends failed, everything thawed, and is left to recovery)."""


class CheckpointBusyError(StoreError):
    """Another run is deleting this checkpoint: nothing was started; wait for that run.

    ``checkpoint_id``, ``run_id`` (the delete under way, if found), ``owner`` and
    ``expires`` (its lease) say which."""

    def __init__(
        self,
        checkpoint_id: str,
        run_id: str | None,
        owner: str | None = None,
        expires: float | None = None,
    ) -> None:
        by = f" by run {run_id}" if run_id else ""
        of = f" of {owner}" if owner else ""
        super().__init__(
            f"checkpoint {checkpoint_id} is being deleted{by}{of}; nothing was started: wait "
            "for that run (`karbor-async delete` waits for it and reports its result)"
        )
        self.checkpoint_id = checkpoint_id
        self.run_id = run_id
        self.owner = owner
        self.expires = expires


class CheckpointNotFoundError(StoreError):
    """No checkpoint or run has that id."""


class IllegalTransitionError(StoreError):
    """A state change the lifecycle does not allow (nothing was changed)."""


class LeaseLostError(StoreError):
    """Another engine owns this run now; this engine must stop writing to it."""


class BankKeyError(KarborError, ValueError):
    """A bank key is malformed or escapes its section."""


class HookError(KarborError):
    """A plugin hook raised; ``__cause__`` is the plugin's own exception."""

    def __init__(self, resource: Resource, hook: Hook, message: str) -> None:
        super().__init__(f"{resource} {hook.value}: {message}")
        self.resource = resource
        self.hook = hook


class HookTimeoutError(HookError):
    """A plugin hook ran past its time limit and was stopped."""


class ThawFailedError(HookError):
    """Every attempt to thaw a frozen resource failed: it may still be frozen."""


class CutLostError(HookError):
    """Recovery did not resume this resource's copy: its cut lived in the killed process.

    Raised (recorded) for a resource whose type sets ``cut_outlives_process=False``
    (an open read transaction) and whose ``on_main`` had not finished when the engine
    died: resuming would copy a later state, so the run fails and its checkpoint is
    deleted.
    """


class ScrubbedError(KarborError):
    """Stands in for a plugin exception whose text held a resolved secret.

    ``original_type`` names the plugin's exception class; the message and the
    original traceback text (a note, shown with the traceback) are scrubbed.
    """

    def __init__(self, original_type: str, message: str) -> None:
        super().__init__(f"{original_type}: {message}")
        self.original_type = original_type


class RunCancelledError(KarborError):
    """The run was cancelled (by :meth:`Run.cancel` or its time limit)."""


class RunError(KarborError, ExceptionGroup[Exception]):
    """A run failed or was cancelled.

    ``outcome`` holds the run's status and every resource's outcome;
    ``checkpoint_id`` names the checkpoint (for a protect run, the run's own id).
    The grouped exceptions are the hook failures (:class:`HookError` with the
    plugin's exception as ``__cause__``) or a :class:`RunCancelledError`.
    """

    outcome: RunOutcome

    def __new__(cls, message: str, exceptions: Sequence[Exception], outcome: RunOutcome) -> Self:
        self = super().__new__(cls, message, exceptions)
        self.outcome = outcome
        return self

    def __init__(self, message: str, exceptions: Sequence[Exception], outcome: RunOutcome) -> None:
        super().__init__(message, exceptions)

    @property
    def checkpoint_id(self) -> str:
        return self.outcome.checkpoint_id
