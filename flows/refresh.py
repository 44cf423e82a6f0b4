"""The index refresh flow: orchestration only (components/stages/refresh.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from components.config import load_params, state_paths
from components.release.registry import open_registry
from components.stages import refresh as refresh_stage
from components.stages.context import RunContext
from components.stages.evaluate import Catalogue, shards
from flows.retrain import dask_runner

stage = task(cache_policy=NO_CACHE)


@stage
def plan(ctx: RunContext, source: str | None) -> refresh_stage.Staged:
    return refresh_stage.plan(ctx, open_registry(ctx.paths, ctx.params), source)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def save_champion_model(ctx: RunContext, version: str) -> Path:
    return refresh_stage.load_champion_model(ctx, open_registry(ctx.paths, ctx.params), version)


@stage
def describe_shard(ctx: RunContext, model_path: Path, rows: pd.DataFrame) -> Catalogue:
    return refresh_stage.describe_rows(ctx, model_path, rows)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def publish(
    ctx: RunContext, staged: refresh_stage.Staged, described: Catalogue, source: str
) -> dict:
    registry = open_registry(ctx.paths, ctx.params)
    return refresh_stage.publish(ctx, registry, staged, described, source)


@flow(name="refresh-on-dask")
def describe_on_dask(ctx: RunContext, model_path: Path, rows: pd.DataFrame) -> Catalogue:
    """The new and changed products embedded and colour-tagged in shards of
    params.distributed.shard_rows on the Dask task runner (each worker loads the model saved
    in the refresh folder: a remote cluster needs that folder, as in flows/retrain.py)."""
    parts = shards(rows, ctx.params.distributed.shard_rows)
    described = describe_shard.map(unmapped(ctx), unmapped(model_path), parts)
    return Catalogue.joined(described.result())


@flow(name="refresh")
def refresh(source: str | None = None, params_path: str | None = None) -> dict:
    """plan (the catalogue source against the champion's served index: added, changed and
    delisted products; the new and changed rows validated, bad ones quarantined) → embed with
    the champion's own model (on Dask when params.distributed is on) → publish the next index
    revision of the champion's version, which the service swaps to. No champion, or nothing
    changed: nothing is published."""
    params = load_params(params_path)
    paths = state_paths()
    ctx = RunContext(params, paths, work=paths.runs / time.strftime("refresh-%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    try:
        staged = plan(ctx, source)
    except refresh_stage.NoChampion as exc:  # a scheduled run before the first champion
        return {"published": False, "reason": str(exc)}
    result = refresh_stage.outcome(staged)
    if staged.empty:
        return result | {"seconds": round(time.perf_counter() - start, 1)}
    model_path = save_champion_model(ctx, staged.version)
    if params.distributed.enabled:
        runner = dask_runner(params.distributed)
        described = describe_on_dask.with_options(task_runner=runner)(
            ctx, model_path, staged.accepted
        )
    else:
        described = describe_shard(ctx, model_path, staged.accepted)
    record = publish(ctx, staged, described, source or params.data.source)
    return refresh_stage.finish(result, record, start)
