"""Failure injection for the SIMULATED cloud: by operation, hook, resource and probability."""

from __future__ import annotations

import enum
import random

import anyio
import attrs

from karbor_simcloud._compat import Hook, OperationKind, Resource

__all__ = ["FaultAction", "FaultInjector", "FaultRule", "FiredFault", "SimulatedFault"]


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

    def decide(self, operation: OperationKind, hook: Hook, resource: Resource) -> FaultRule | None:
        """The rule that fires for this hook call, if any (and count it as fired)."""
        for index, rule in enumerate(self.rules):
            if not rule.matches(operation, hook, resource):
                continue
            if rule.times is not None and self._counts.get(index, 0) >= rule.times:
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            self._counts[index] = self._counts.get(index, 0) + 1
            return rule
        return None

    async def check(self, operation: OperationKind, hook: Hook, resource: Resource) -> None:
        """Raise or hang if a rule fires for this hook call; otherwise return at once."""
        if not self.rules:
            return
        rule = self.decide(operation, hook, resource)
        if rule is None:
            return
        self.fired.append(FiredFault(rule, operation, hook, resource, anyio.current_time()))
        if rule.action is FaultAction.HANG:
            await anyio.sleep_forever()
        raise SimulatedFault(operation, hook, resource)
