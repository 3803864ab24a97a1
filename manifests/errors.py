"""The product's own error classes: each says what is wrong and what to do about it."""

from __future__ import annotations


class FleetError(Exception):
    """Base class. ``str(err)`` is one line a user can act on; ``fix`` is the next step."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem, self.fix = problem, fix
        super().__init__(problem + (f" — {fix}" if fix else ""))


class PreflightError(FleetError):
    """Something outside the cluster (quota, zone, Hub access, model size) blocks the run; nothing was created."""


class QuotaError(PreflightError):
    pass


class StockoutError(FleetError):
    """Every allowed zone (and region) was out of the accelerator at create time."""


class DriftError(FleetError):
    """An existing resource differs from the spec in a way that cannot be updated in place."""


class DeployError(FleetError):
    """The model did not come up; carries the cause and the pod's last log lines."""

    def __init__(self, problem: str, fix: str = "", *, reason: str = "", logs: list[str] | None = None) -> None:
        super().__init__(problem, fix)
        self.reason = reason
        self.logs = logs or []


class SmokeTestError(DeployError):
    pass
