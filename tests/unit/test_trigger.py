"""The rule that decides whether a monitor run starts a retrain (components/release/trigger.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from components.config import SchedulesParams
from components.release.trigger import DRIFT_TAG, RunInfo, decide_retrain, in_flight

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def run(
    state: str,
    name: str = "r",
    start_in_min: float = 0,
    created_min_ago: float = 5,
    drift: bool = False,
    state_name: str | None = None,
    started_min_ago: float | None = None,
) -> RunInfo:
    return RunInfo(
        name=name,
        state_type=state,
        state_name=state_name or state.title(),
        expected_start=NOW + timedelta(minutes=start_in_min),
        created=NOW - timedelta(minutes=created_min_ago),
        tags=(DRIFT_TAG,) if drift else (),
        started=None if started_min_ago is None else NOW - timedelta(minutes=started_min_ago),
    )


@pytest.mark.parametrize(
    ("drifted", "runs", "enabled", "cooldown", "trigger", "reason"),
    [
        (True, [], True, 12, True, "retrain triggered"),
        (False, [], True, 12, False, "no drift"),
        (None, [], True, 12, False, "no drift verdict"),
        (True, [], False, 12, False, "retrain_on_drift is off"),
        (True, [run("RUNNING", "nightly")], True, 12, False, "in flight: nightly (Running)"),
        (True, [run("PENDING")], True, 12, False, "in flight"),
        (True, [run("PAUSED")], True, 12, False, "in flight"),
        (True, [run("CANCELLING")], True, 12, False, "in flight"),
        # due now (late, or queued on the deployment's concurrency limit): in flight
        (
            True,
            [run("SCHEDULED", "late", start_in_min=-30, state_name="Late")],
            True,
            0,
            False,
            "in flight: late (Late)",
        ),
        (
            True,
            [run("SCHEDULED", "q", state_name="AwaitingConcurrencySlot")],
            True,
            0,
            False,
            "in flight",
        ),
        # tomorrow's nightly run, scheduled in advance, does not block
        (True, [run("SCHEDULED", "tomorrow", start_in_min=14 * 60)], True, 12, True, "triggered"),
        # a drift-triggered run not yet picked up blocks even if scheduled later
        (True, [run("SCHEDULED", start_in_min=30, drift=True)], True, 0, False, "in flight"),
        # finished runs do not block; a recent drift-triggered one does, within the cooldown
        (True, [run("COMPLETED"), run("FAILED")], True, 12, True, "triggered"),
        (
            True,
            [run("COMPLETED", "d1", created_min_ago=60, drift=True)],
            True,
            12,
            False,
            "d1 was triggered by drift 1.0 h ago (cooldown 12 h)",
        ),
        (
            True,
            [run("COMPLETED", "d1", created_min_ago=13 * 60, drift=True)],
            True,
            12,
            True,
            "triggered",
        ),
        (True, [run("FAILED", "d1", created_min_ago=60, drift=True)], True, 0, True, "triggered"),
    ],
)
def test_decide_retrain(drifted, runs, enabled, cooldown, trigger, reason):
    decision = decide_retrain(drifted, runs, NOW, enabled=enabled, cooldown_hours=cooldown)
    assert decision.trigger is trigger
    assert reason in decision.reason


def test_cooldown_counts_from_the_newest_drift_trigger():
    runs = [
        run("COMPLETED", "old", created_min_ago=20 * 60, drift=True),
        run("COMPLETED", "new", created_min_ago=2 * 60, drift=True),
        run("COMPLETED", "manual", created_min_ago=1),
    ]
    decision = decide_retrain(True, runs, NOW, cooldown_hours=12)
    assert not decision.trigger and "new was triggered" in decision.reason


def test_in_flight_lists_only_active_or_due_runs():
    runs = [
        run("RUNNING", "a"),
        run("SCHEDULED", "b", start_in_min=600),
        run("COMPLETED", "c"),
        run("SCHEDULED", "d", start_in_min=0.5),
    ]
    assert [r.name for r in in_flight(runs, NOW)] == ["a", "d"]


def test_schedules_section_is_validated():
    assert SchedulesParams().monitor.retrain_on_drift
    with pytest.raises(ValueError, match="5 fields"):
        SchedulesParams.model_validate({"retrain": {"cron": "0 2 * *"}})
    with pytest.raises(ValueError, match="timezone"):
        SchedulesParams(timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="extra"):
        SchedulesParams.model_validate({"monitor": {"cron": "0 * * * *", "retrain": True}})


def test_runs_beat_three_times_per_dead_host_window_never_under_prefects_floor():
    assert SchedulesParams().dead_host_seconds == 120
    assert SchedulesParams().heartbeat_seconds == 40
    assert SchedulesParams(dead_host_seconds=600).heartbeat_seconds == 200
    assert SchedulesParams(dead_host_seconds=60).heartbeat_seconds == 30  # Prefect's least
    with pytest.raises(ValueError, match="greater than or equal to 60"):
        SchedulesParams(dead_host_seconds=45)  # not even one missed beat at 30 s


def test_a_run_running_past_the_stale_limit_no_longer_blocks():
    """A worker killed mid-run leaves its retrain "Running" forever on the server."""
    zombie = run("RUNNING", "zombie", created_min_ago=30 * 60, started_min_ago=30 * 60)
    assert decide_retrain(True, [zombie], NOW, cooldown_hours=0, stale_hours=24).trigger
    long_one = run("RUNNING", "long", created_min_ago=5 * 60, started_min_ago=5 * 60)
    decision = decide_retrain(True, [long_one], NOW, cooldown_hours=0, stale_hours=24)
    assert not decision.trigger and "long (Running)" in decision.reason
