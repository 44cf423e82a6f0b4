"""The promote flow: picks up approvals made in the MLflow UI (scheduled every few minutes)."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.config import load_params, state_paths
from components.stages import promote as promote_stage
from components.stages.context import RunContext


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def promote_approved(ctx: RunContext, version: str | None) -> dict | None:
    return promote_stage.run(ctx, version)


@flow(name="promote")
def promote(version: str | None = None, params_path: str | None = None) -> dict | None:
    """approved + gate-passed challenger → champion (the old champion kept for rollback)."""
    paths = state_paths()
    ctx = RunContext(load_params(params_path), paths, work=paths.runs / "promote")
    return promote_approved(ctx, version)
