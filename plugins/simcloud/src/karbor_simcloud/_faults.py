"""Failure injection for the SIMULATED cloud: by operation, hook, resource and probability."""

from __future__ import annotations

import enum
import random
from collections.abc import Awaitable, Callable, Sequence

import anyio
import attrs

from karbor_simcloud._compat import Hook, OperationKind, Resource, get_logger

__all__ = [
    "FAULT_SYNTAX",
    "FaultAction",
    "FaultInjector",
    "FaultRule",
    "FaultSyntaxError",
    "FiredFault",
    "SimulatedFault",
]

_log = get_logger(__name__)
"""``karbor_async.plugins.karbor_simcloud._faults``: a fired fault is an info line."""

FAULT_SYNTAX = "OPERATION:HOOK:TYPE[#ID]:raise|hang[:PROBABILITY]"
"""The text form of a rule (``*`` for any operation, hook or type), e.g.
``protect:on_main:OS::Cinder::Volume:raise:0.5`` or ``*:on_prepare_begin:*:hang``."""


class FaultSyntaxError(ValueError):
    """A fault rule's text does not parse; the message names the part and the syntax."""


class FaultAction(enum.Enum):
    """What an injected fault does to the hook it hits."""

    RAISE = "raise"
    """The hook raises :class:`SimulatedFault`."""
    HANG = "hang"
    """The hook never returns (until the engine's timeout or cancellation)."""


class SimulatedFault(Exception):
    """An error injected by the simulated cloud's failure rules (not a real failure)."""

    def __init__(self, operation: OperationKind, hook: Hook, resource: Resource) -> None:
        super().__init__(
            f"simulated fault in {operation.value} {hook.value} of {resource} "
            "(injected by karbor_simcloud)"
        )
        self.operation = operation
        self.hook = hook
        self.resource = resource


@attrs.frozen
class FaultRule:
    """Inject a fault into the hooks that match every field given (``None`` matches all).

    ``probability`` is drawn per matching hook call from the cloud's seeded
    random generator; ``times`` bounds how often the rule fires (``None``: no
    bound), so a rule with ``times=1`` fails the first attempt and lets a
    retried one through.
    """

    operation: OperationKind | None = None
    hook: Hook | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    probability: float = attrs.field(default=1.0)
    action: FaultAction = FaultAction.RAISE
    times: int | None = None

    @probability.validator
    def _check_probability(self, _attribute: object, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"probability must be within [0, 1], not {value!r}")

    @classmethod
    def parse(cls, text: str, *, resource_type: str | None = None) -> FaultRule:
        """A rule from its text (:data:`FAULT_SYNTAX`). With ``resource_type`` (a plan's
        ``sim_faults`` under that type), the text leaves the type out:
        ``OPERATION:HOOK[#ID]:raise|hang[:PROBABILITY]``."""
        syntax = (
            FAULT_SYNTAX
            if resource_type is None
            else "OPERATION:HOOK[#ID]:raise|hang[:PROBABILITY]"
        )

        def bad(why: str) -> FaultSyntaxError:
            return FaultSyntaxError(f"fault rule {text!r}: {why}; expected {syntax}")

        parts = text.strip().split(":")
        probability = 1.0
        try:
            probability = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            pass
        else:
            if not 0.0 <= probability <= 1.0:
                raise bad(f"probability {probability!r} is not within [0, 1]")
        if len(parts) < 3:
            raise bad("too few parts")
        op_text, hook_text, action_text = parts[0], parts[1], parts[-1]
        target = ":".join(parts[2:-1]) if resource_type is None else ""
        rid: str | None = None
        if resource_type is not None:
            if len(parts) != 3:
                raise bad("too many parts (the type is the plan section's)")
            hook_text, _, rid_text = hook_text.partition("#")
            rid = rid_text or None
            rtype: str | None = resource_type
        else:
            if not target:
                raise bad("no TYPE (use * for any type)")
            target, _, rid_text = target.partition("#")
            rid = rid_text or None
            rtype = None if target == "*" else target
        try:
            operation = None if op_text == "*" else OperationKind(op_text)
        except ValueError:
            allowed = ", ".join(k.value for k in OperationKind)
            raise bad(f"unknown operation {op_text!r} (one of {allowed}, or *)") from None
        try:
            hook = None if hook_text == "*" else Hook(hook_text)
        except ValueError:
            allowed = ", ".join(h.value for h in Hook)
            raise bad(f"unknown hook {hook_text!r} (one of {allowed}, or *)") from None
        try:
            action = FaultAction(action_text)
        except ValueError:
            raise bad(f"unknown action {action_text!r} (raise or hang)") from None
        return cls(
            operation=operation,
            hook=hook,
            resource_type=rtype,
            resource_id=rid,
            probability=probability,
            action=action,
        )

    def text(self) -> str:
        """The rule in :data:`FAULT_SYNTAX` (``times`` is not part of the text)."""
        target = (self.resource_type or "*") + (f"#{self.resource_id}" if self.resource_id else "")
        out = (
            f"{self.operation.value if self.operation else '*'}:"
            f"{self.hook.value if self.hook else '*'}:{target}:{self.action.value}"
        )
        return out if self.probability == 1.0 else f"{out}:{self.probability:g}"

    def matches(self, operation: OperationKind, hook: Hook, resource: Resource) -> bool:
        return (
            (self.operation is None or self.operation is operation)
            and (self.hook is None or self.hook is hook)
            and (self.resource_type is None or self.resource_type == resource.type)
            and (self.resource_id is None or self.resource_id == resource.id)
        )


@attrs.frozen
class FiredFault:
    """A record of one injected fault (tests read these)."""

    rule: FaultRule
    operation: OperationKind
    hook: Hook
    resource: Resource
    at: float


@attrs.define
class FaultInjector:
    """Holds the rules and decides, hook call by hook call, whether to fail."""

    rules: list[FaultRule] = attrs.field(factory=list)
    seed: int = 0
    fired: list[FiredFault] = attrs.field(factory=list)
    report: Callable[[FiredFault], Awaitable[None]] | None = None
    """Told of each fault before it acts (the shared state records it for every process)."""
    _counts: dict[int, int] = attrs.field(factory=dict, init=False)
    _rng: random.Random = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def add(self, rule: FaultRule) -> FaultRule:
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()
        self._counts.clear()

    def decide(
        self,
        operation: OperationKind,
        hook: Hook,
        resource: Resource,
        extra: Sequence[FaultRule] = (),
    ) -> FaultRule | None:
        """The rule that fires for this hook call, if any (and count it as fired).

        ``extra``: rules of this call only (a plan's ``sim_faults``), after the cloud's."""
        for index, rule in enumerate([*self.rules, *extra] if extra else self.rules):
            if not rule.matches(operation, hook, resource):
                continue
            if rule.times is not None and self._counts.get(index, 0) >= rule.times:
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            self._counts[index] = self._counts.get(index, 0) + 1
            return rule
        return None

    async def check(
        self,
        operation: OperationKind,
        hook: Hook,
        resource: Resource,
        extra: Sequence[FaultRule] = (),
    ) -> None:
        """Raise or hang if a rule fires for this hook call; otherwise return at once."""
        if not self.rules and not extra:
            return
        rule = self.decide(operation, hook, resource, extra)
        if rule is None:
            return
        fired = FiredFault(rule, operation, hook, resource, anyio.current_time())
        self.fired.append(fired)
        _log.info(
            "simulated_fault_fired",
            rule=rule.text(),
            operation=operation.value,
            hook=hook.value,
            resource=f"{resource.type}#{resource.id}",
        )
        if self.report is not None:
            await self.report(fired)
        if rule.action is FaultAction.HANG:
            await anyio.sleep_forever()
        raise SimulatedFault(operation, hook, resource)
