"""The retrain flow: orchestration only; every step is a component function."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components import catalogue, pipeline, refresh, release
from components.config import load_params, state_paths
from components.pipeline import RunContext
from components.summary import summarize_run

stage = task(cache_policy=NO_CACHE)  # stages are cheap to re-run and their inputs are files


@stage
def ingest(ctx: RunContext) -> dict:
    return pipeline.run_ingest(ctx)


@stage
def refresh_catalogue(ctx: RunContext) -> dict:
    return refresh.refresh_catalogue(ctx)


@stage
def validate(ctx: RunContext) -> dict:
    return pipeline.run_validation(ctx)


@stage
def clean_labels(ctx: RunContext) -> dict:
    return pipeline.run_label_cleaning(ctx)


@stage
def train(ctx: RunContext) -> dict:
    return pipeline.run_training(ctx)


@stage
def evaluate(ctx: RunContext) -> dict:
    return pipeline.run_evaluation(ctx)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register(ctx: RunContext, cause: str) -> dict:
    return release.run_registration(ctx, release.open_registry(ctx), cause)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def gate(ctx: RunContext) -> dict:
    return release.run_gate(ctx, release.open_registry(ctx))


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def bootstrap_promotion(ctx: RunContext, verdict: dict) -> dict | None:
    return release.run_bootstrap_promotion(ctx, release.open_registry(ctx), verdict)


@flow(name="retrain")
def retrain(
    limit: int | None = None,
    epochs: int | None = None,
    cause: str = "manual",
    params_path: str | None = None,
    refresh_data: bool = False,
) -> dict:
    """ingest (when no catalogue yet; with refresh_data also when its source changed, see
    components/refresh.py: scheduled and drift-triggered runs pass it) → validate → clean
    labels → train → evaluate → register (challenger, tagged with `cause`) → gate vs
    champion → bootstrap promotion only with no champion at all (else it awaits approval)."""
    params = load_params(params_path)
    params.data.limit = limit or params.data.limit
    params.train.epochs = epochs or params.train.epochs
    paths = state_paths()
    ctx = RunContext(params, paths, work=paths.runs / time.strftime("%Y%m%d-%H%M%S"))
    if refresh_data:
        refresh_catalogue(ctx)
    elif not (ctx.catalogue_dir / catalogue.MANIFEST).exists():
        ingest(ctx)
    report = validate(ctx)
    label_summary = clean_labels(ctx)
    train_summary = train(ctx)
    metrics = evaluate(ctx)
    registered = register(ctx, cause)
    verdict = gate(ctx)
    promoted = bootstrap_promotion(ctx, verdict)
    return summarize_run(
        report,
        label_summary,
        train_summary,
        metrics,
        registered,
        verdict,
        promoted,
        work=str(Path(ctx.work)),
    )
