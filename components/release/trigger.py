"""When a drift verdict may start a retrain: the pure rule the `monitor` flow applies.

A drift verdict does not clear itself when a retrain starts: the request log keeps showing
drift until a retrained model has been approved and promoted (and the approval waits for a
person). Without a rule every hourly monitor run would start another retrain. So a drift-
triggered retrain starts only when (1) no `retrain` run is in flight, whatever started it
(two retrains at once would also share the checkpoint folder), and (2) the last drift-triggered
retrain is older than the cooldown. The flow gathers the runs from Prefect; this module only
decides, so the rule is table-tested without a server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

DRIFT_TAG = "trigger:drift"  # Prefect tag of every retrain run a monitor run started
IN_FLIGHT = frozenset({"PENDING", "RUNNING", "CANCELLING", "PAUSED"})
DUE_SLACK = timedelta(minutes=1)  # a scheduled run due within this counts as starting now


@dataclass(frozen=True)
class RunInfo:
    """What the rule needs to know about one `retrain` flow run."""

    name: str
    state_type: str  # Prefect StateType name: SCHEDULED, PENDING, RUNNING, COMPLETED, …
    state_name: str  # e.g. Late, AwaitingConcurrencySlot
    expected_start: datetime | None
    created: datetime | None
    tags: tuple[str, ...] = ()
    started: datetime | None = None  # when it entered Running (None: not yet)

    @property
    def drift_triggered(self) -> bool:
        return DRIFT_TAG in self.tags


@dataclass(frozen=True)
class Decision:
    trigger: bool
    reason: str


def in_flight(runs: Iterable[RunInfo], now: datetime, stale_hours: float = 24.0) -> list[RunInfo]:
    """Runs executing or about to: running/pending/paused, a drift-triggered run not yet
    picked up, or a scheduled run already due (late, queued on the concurrency limit).
    Tomorrow's nightly run, scheduled in advance, is not in flight; nor is a run still
    "Running" after `stale_hours` (its worker died: nothing will ever finish it)."""
    stale = now - timedelta(hours=stale_hours)
    return [
        run
        for run in runs
        if (run.state_type in IN_FLIGHT and not _stale(run, stale)) or _due(run, now)
    ]


def _stale(run: RunInfo, cutoff: datetime) -> bool:
    since = run.started or run.created
    return since is not None and since < cutoff


def _due(run: RunInfo, now: datetime) -> bool:
    if run.state_type != "SCHEDULED":
        return False
    return (
        run.drift_triggered or run.expected_start is None or run.expected_start <= now + DUE_SLACK
    )


def last_drift_trigger(runs: Iterable[RunInfo]) -> RunInfo | None:
    triggered = [r for r in runs if r.drift_triggered and r.created is not None]
    return max(triggered, key=lambda r: r.created, default=None)


def decide_retrain(
    drifted: bool | None,
    runs: list[RunInfo],
    now: datetime,
    enabled: bool = True,
    cooldown_hours: float = 12.0,
    stale_hours: float = 24.0,
) -> Decision:
    """Whether this monitor run starts a retrain, and why (logged and returned by the flow)."""
    if drifted is None:
        return Decision(False, "no drift verdict (see the drift headline): no retrain")
    if not drifted:
        return Decision(False, "no drift: no retrain")
    if not enabled:
        return Decision(False, "drift, but schedules.monitor.retrain_on_drift is off")
    busy = in_flight(runs, now, stale_hours)
    if busy:
        names = ", ".join(f"{r.name} ({r.state_name})" for r in busy)
        return Decision(False, f"drift, but a retrain is already in flight: {names}")
    last = last_drift_trigger(runs)
    if last is not None and now - last.created < timedelta(hours=cooldown_hours):
        age = (now - last.created).total_seconds() / 3600
        return Decision(
            False,
            f"drift, but {last.name} was triggered by drift {age:.1f} h ago "
            f"(cooldown {cooldown_hours:g} h)",
        )
    return Decision(True, "drift: retrain triggered")
