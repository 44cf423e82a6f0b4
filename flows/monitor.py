"""The monitor flow (hourly): drift check, and the online update it may trigger.

The online update: on drift, this flow starts a run of the `retrain` deployment with
`refresh_data=True`, tagged `trigger:drift` and with `cause` naming the drift headline and the
report. "Recent data" is the catalogue as its source is now (components/data/sources.py): the
request log keeps no images or labels, so the retrain re-ingests the shop's catalogue when it
changed (new products, relabels, removals; a new DVC data version) and otherwise retrains on the
current DVC-tracked one. That retrain is an ordinary retrain: validated, gated against the
champion, registered as challenger with `approval=pending`; it is promoted only by the loop's
rules (an owner's approval then `promote`; its bootstrap promotion applies only when there is
no champion at all, and a drift verdict needs a champion). No retrain starts while another is in
flight or within the cooldown of the last drift-triggered one (components/release/trigger.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.config import Params, StatePaths, load_params, state_paths
from components.release.trigger import RunInfo, decide_retrain
from flows import runs


@task(cache_policy=NO_CACHE)
def check_drift(paths: StatePaths, params: Params, since: datetime | None) -> dict:
    from monitoring.drift import run_drift  # Evidently loads only in this task

    result = run_drift(paths, params, since=since)
    report = result.report_html or result.report_json
    return {
        "drifted": result.drifted,
        "exit_code": result.exit_code,
        "headline": result.headline,
        "report": str(report) if report else None,
    }


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def read_retrain_runs() -> list[RunInfo]:
    return runs.read_retrain_runs()


@task(cache_policy=NO_CACHE)
def trigger_retrain(cause: str, params_path: str | None) -> dict:
    return runs.trigger_retrain(cause, params_path)


@flow(name="monitor")
def monitor(since_hours: float | None = None, params_path: str | None = None) -> dict:
    """drift (request-log window vs the champion's reference; report under reports/) →
    on drift, unless a retrain is in flight or cooled down → a `retrain` deployment run."""
    params, paths = load_params(params_path), state_paths()
    since = datetime.now(UTC) - timedelta(hours=since_hours) if since_hours else None
    drift = check_drift(paths, params, since)
    logger = get_run_logger()
    logger.info("drift: %s (report %s)", drift["headline"], drift["report"])
    settings = params.schedules.monitor
    runs = read_retrain_runs() if drift["drifted"] else []
    decision = decide_retrain(
        drift["drifted"],
        runs,
        datetime.now(UTC),
        settings.retrain_on_drift,
        settings.retrain_cooldown_hours,
        settings.retrain_stale_hours,
    )
    logger.info(decision.reason)
    retrain_run = None
    if decision.trigger:
        cause = f"drift: {drift['headline']} (report {drift['report']})"
        retrain_run = trigger_retrain(cause, params_path)
        logger.info("retrain run %s scheduled: %s", retrain_run["name"], cause)
    return {"drift": drift, "decision": decision.reason, "retrain_run": retrain_run}
