"""What the monitor flow asks of the Prefect server: the retrain runs in flight or cooling
down, and a new drift-triggered retrain run of the `retrain/vitrine` deployment."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from components.release.trigger import DRIFT_TAG, RunInfo
from flows.server import DEPLOYMENT

ACTIVE_STATES = ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED")


def read_retrain_runs(limit: int = 50) -> list[RunInfo]:
    """Retrain runs that may be in flight, plus the newest drift-triggered ones (cooldown)."""
    flows = FlowFilter(name=FlowFilterName(any_=["retrain"]))
    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ACTIVE_STATES)))
    drift_tagged = FlowRunFilterTags(all_=[DRIFT_TAG])
    found = {}
    with get_client(sync_client=True) as client:
        for flow_run_filter in (FlowRunFilter(state=state), FlowRunFilter(tags=drift_tagged)):
            for run in client.read_flow_runs(
                flow_filter=flows,
                flow_run_filter=flow_run_filter,
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=limit,
            ):
                found[run.id] = RunInfo(
                    name=run.name,
                    state_type=run.state_type.value if run.state_type else "",
                    state_name=run.state_name or "",
                    expected_start=run.expected_start_time,
                    created=run.created,
                    tags=tuple(run.tags),
                    started=run.start_time,
                )
    return list(found.values())


def trigger_retrain(cause: str, params_path: str | None = None) -> dict:
    """A run of the retrain deployment (returns at once; the worker executes it), tagged as
    drift-triggered; its `cause` parameter becomes the registered version's `cause` tag."""
    name = f"retrain/{DEPLOYMENT}"
    try:
        run = run_deployment(
            name,
            parameters={"cause": cause, "refresh_data": True, "params_path": params_path},
            timeout=0,
            tags=[DRIFT_TAG, "vitrine"],
            as_subflow=False,
            flow_run_name=f"drift-{datetime.now(UTC):%Y%m%d-%H%M%S}",
        )
    except ObjectNotFound as exc:
        raise RuntimeError(
            f"drift, but no deployment {name} on the Prefect server: run `vitrine deploy`"
        ) from exc
    return {"id": str(run.id), "name": run.name, "state": run.state_name}
