"""The loop's schedules as Prefect deployments on the local Prefect server (what `vitrine deploy`
registers and `vitrine schedules` lists).

How runs execute: `vitrine deploy` registers four deployments, each named `vitrine`, in the
`process` work pool `schedules.work_pool`: `retrain` (nightly cron), `monitor` (hourly),
`promote` (every 10 minutes), `refresh` (hourly: the champion's index follows the catalogue). The server's scheduler turns their crons into scheduled flow runs;
`vitrine worker` (a `prefect worker` on that pool) picks each due run up and executes it as a
subprocess of the project's virtualenv (the entrypoints are importable modules, e.g.
`flows.retrain.retrain`, so no code is copied), with the worker's environment (VITRINE_HOME,
VITRINE_PARAMS, PREFECT_API_URL). Without a worker, runs wait in the Prefect UI as Late.
`vitrine deploy` also keeps the dead-host automation (flows/dead_hosts.py): the deployments'
runs send heartbeats, and a run whose host goes silent is marked Crashed.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.runner.storage import LocalStorage
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from components.config import PROJECT_ROOT, Params
from flows.dead_hosts import HEARTBEAT_SETTING, apply_automation
from flows.monitor import monitor
from flows.promote import promote
from flows.refresh import refresh
from flows.retrain import retrain
from flows.server import DEPLOYMENT

FLOWS = ("retrain", "monitor", "promote", "refresh")


def ensure_work_pool(name: str) -> None:
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template)
            )


def _specs(params: Params) -> list[tuple[Any, Any, dict, dict, str]]:
    """(flow, schedule settings, deployment parameters, schedule parameters, description)."""

    sched = params.schedules
    nightly = {"cause": f"schedule: retrain/{DEPLOYMENT} ({sched.retrain.cron})"}
    return [
        (
            retrain,
            sched.retrain,
            {"refresh_data": True},
            nightly,
            "retrain on the current catalogue (re-ingested if its source changed); gated, "
            "registered as challenger; waits for approval once a champion exists",
        ),
        (
            monitor,
            sched.monitor,
            {},
            {},
            "drift of the request log vs the champion's reference; drift starts a retrain run",
        ),
        (
            promote,
            sched.promote,
            {},
            {},
            "champion <- an approved, gate-passed challenger (approvals made in the MLflow UI)",
        ),
        (
            refresh,
            sched.refresh,
            {},
            {},
            "the champion's index <- new, changed and delisted products of the catalogue "
            "source, as a new index revision of the same model version (no retraining)",
        ),
    ]


def build_deployments(params: Params) -> list:
    """The four RunnerDeployments, all built (crons validated by Prefect) before any is sent."""
    sched = params.schedules
    built = []
    for flow, setting, parameters, schedule_parameters, description in _specs(params):
        # one run at a time: retrains share the checkpoint folder, so a second one queues;
        # a monitor or promote run still busy when the next is due makes that one cancelled
        strategy = (
            ConcurrencyLimitStrategy.ENQUEUE
            if flow.name == "retrain"
            else ConcurrencyLimitStrategy.CANCEL_NEW
        )
        deployment = flow.to_deployment(
            name=DEPLOYMENT,
            schedules=[
                Cron(
                    setting.cron,
                    timezone=sched.timezone,
                    active=setting.active,
                    parameters=schedule_parameters,
                )
            ],
            parameters=parameters,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
            tags=["vitrine"],
            description=description,
            work_pool_name=sched.work_pool,
            # every worker of the pool runs them with the heartbeat the automation expects
            job_variables={
                "working_dir": str(PROJECT_ROOT),
                "env": {HEARTBEAT_SETTING: str(sched.heartbeat_seconds)},
            },
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        # pull step `set_working_directory` to the project: without one, Prefect copies the
        # worker's cwd (the whole project, .venv included) into a temporary folder per run
        deployment.storage = LocalStorage(str(PROJECT_ROOT))
        built.append(deployment)
    return built


def apply_deployments(params: Params) -> list[str]:
    """Create or update the four deployments and the dead-host automation over their runs
    (idempotent); returns the deployments' full names."""
    deployments = build_deployments(params)
    ensure_work_pool(params.schedules.work_pool)
    ids = [d.apply(work_pool_name=params.schedules.work_pool) for d in deployments]
    apply_automation(params.schedules, ids)
    return [f"{d.flow_name}/{d.name}" for d in deployments]


def _next_runs(client, deployment_id, schedule, n: int = 3) -> tuple[list[datetime], str]:
    """The server's scheduled runs; when it has made none yet, the cron's next dates."""
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"])),
            expected_start_time=FlowRunFilterExpectedStartTime(after_=datetime.now(UTC)),
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=n,
    )
    zone = ZoneInfo(schedule.timezone or "UTC")  # shown in the schedule's own time zone
    if runs:
        return [r.expected_start_time.astimezone(zone) for r in runs], "scheduled"
    from prefect.server.schemas.schedules import CronSchedule

    cron = CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    return [t.astimezone(zone) for t in asyncio.run(cron.get_dates(n=n))], "from cron"


def list_deployments() -> list[dict]:
    """Each of the four deployments: schedule, state, work pool, next run times."""
    rows = []
    with get_client(sync_client=True) as client:
        for name in FLOWS:
            try:
                dep = client.read_deployment_by_name(f"{name}/{DEPLOYMENT}")
            except ObjectNotFound:
                rows.append({"name": f"{name}/{DEPLOYMENT}", "exists": False})
                continue
            row = {
                "name": f"{name}/{DEPLOYMENT}",
                "exists": True,
                "paused": dep.paused,
                "work_pool": dep.work_pool_name,
                "schedules": [],
                "next_runs": [],
                "concurrency_limit": dep.global_concurrency_limit.limit
                if dep.global_concurrency_limit
                else None,
            }
            for item in dep.schedules:
                sched = item.schedule
                row["schedules"].append(
                    {
                        "cron": getattr(sched, "cron", None),
                        "timezone": getattr(sched, "timezone", None),
                        "active": item.active,
                    }
                )
                if item.active and not dep.paused and getattr(sched, "cron", None):
                    times, origin = _next_runs(client, dep.id, sched)
                    row["next_runs"] += [t.isoformat() for t in times]
                    row["next_runs_origin"] = origin
            rows.append(row)
    return rows
