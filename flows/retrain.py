"""The retrain flow: orchestration only; every step is a component function."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from components.config import DistributedParams, load_params, state_paths
from components.data import catalogue
from components.stages import detect as detect_stage
from components.stages import evaluate as evaluate_stage
from components.stages import gate as gate_stage
from components.stages import ingest as ingest_stage
from components.stages import labels as labels_stage
from components.stages import promote as promote_stage
from components.stages import register as register_stage
from components.stages import train as train_stage
from components.stages import validate as validate_stage
from components.stages.context import RunContext
from components.stages.summary import summarize_run, summarize_unchanged

stage = task(cache_policy=NO_CACHE)  # stages are cheap to re-run and their inputs are files


@stage
def ingest(ctx: RunContext) -> dict:
    return ingest_stage.run(ctx)


@stage
def refresh_catalogue(ctx: RunContext) -> dict:
    return ingest_stage.refresh(ctx)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def unchanged_since(ctx: RunContext) -> dict | None:
    return register_stage.unchanged_since(ctx)


@stage
def validate(ctx: RunContext) -> dict:
    return validate_stage.run(ctx)


@stage
def clean_labels(ctx: RunContext) -> dict:
    return labels_stage.run(ctx)


@stage
def train(ctx: RunContext, fresh: bool) -> dict:
    return train_stage.run(ctx, fresh=fresh)


@stage
def detect(ctx: RunContext, fresh: bool) -> dict:
    return detect_stage.run(ctx, fresh=fresh)


@stage
def evaluate(
    ctx: RunContext,
    catalogue: evaluate_stage.Catalogue | None = None,
    reference: pd.DataFrame | None = None,
) -> dict:
    return evaluate_stage.run(ctx, catalogue, reference)


@stage
def describe_shard(ctx: RunContext, products: pd.DataFrame) -> evaluate_stage.Catalogue:
    return evaluate_stage.describe_catalogue(ctx, products)


@stage
def reference_shard(ctx: RunContext, test: pd.DataFrame) -> pd.DataFrame:
    return evaluate_stage.reference_rows(ctx, test)


@flow(name="catalogue-on-dask")
def catalogue_on_dask(ctx: RunContext) -> tuple[evaluate_stage.Catalogue, pd.DataFrame]:
    """The catalogue-scale part of evaluate, mapped over shards of params.distributed.shard_rows
    on the flow's task runner (a DaskTaskRunner: `dask_runner`): the index's embeddings and
    colour tags, and the drift reference. Each worker loads the trained model from the run
    folder, so a remote cluster's workers need that folder and the catalogue at the same
    paths (shared storage; docs/scale.md)."""
    accepted = evaluate_stage.accepted_products(ctx)
    rows = ctx.params.distributed.shard_rows
    described = describe_shard.map(unmapped(ctx), evaluate_stage.shards(accepted, rows))
    test = evaluate_stage.test_products(accepted)
    references = reference_shard.map(unmapped(ctx), evaluate_stage.shards(test, rows))
    return (
        evaluate_stage.Catalogue.joined(described.result()),
        pd.concat(references.result(), ignore_index=True),
    )


def dask_runner(settings: DistributedParams):
    """Prefect's Dask task runner: on the cluster at settings.scheduler_address, else on a
    local cluster of settings.local_workers single-threaded worker processes."""
    from prefect_dask import DaskTaskRunner

    if settings.scheduler_address:
        return DaskTaskRunner(address=settings.scheduler_address)
    cluster = {"n_workers": settings.local_workers, "threads_per_worker": 1, "processes": True}
    return DaskTaskRunner(cluster_kwargs={**cluster, "dashboard_address": None})


def evaluate_catalogue_scale(ctx: RunContext) -> dict:
    """evaluate, with its catalogue-scale part on Dask when params.distributed is on."""
    if not ctx.params.distributed.enabled:
        return evaluate(ctx)
    runner = dask_runner(ctx.params.distributed)
    catalogue_part, reference = catalogue_on_dask.with_options(task_runner=runner)(ctx)
    return evaluate(ctx, catalogue_part, reference)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register(ctx: RunContext, cause: str) -> dict:
    return register_stage.run(ctx, cause=cause)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def gate(ctx: RunContext) -> dict:
    return gate_stage.run(ctx)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def bootstrap_promotion(ctx: RunContext, verdict: dict) -> dict | None:
    return promote_stage.bootstrap(ctx, verdict)


@flow(name="retrain")
def retrain(
    limit: int | None = None,
    epochs: int | None = None,
    cause: str = "manual",
    params_path: str | None = None,
    refresh_data: bool = False,
    force: bool = False,
) -> dict:
    """ingest (when no catalogue yet; with refresh_data also when its source changed, see
    components/data/sources.py: scheduled and drift-triggered runs pass it) → validate → clean
    labels → train → detect (the product detector) → evaluate → register (challenger, tagged
    with `cause`) → gate vs champion → bootstrap promotion only with no champion at all (else it awaits approval).

    A run on the data and params of an already gated version is a no-op: it returns that
    version's summary ("unchanged since version N") and registers nothing. `force` retrains
    anyway, from scratch (no resume of a finished checkpoint)."""
    params = load_params(params_path)
    params.data.limit = limit or params.data.limit
    params.train.epochs = epochs or params.train.epochs
    paths = state_paths()
    ctx = RunContext(params, paths, work=paths.runs / time.strftime("%Y%m%d-%H%M%S"))
    if refresh_data:
        refresh_catalogue(ctx)
    elif not (ctx.catalogue_dir / catalogue.MANIFEST).exists():
        ingest(ctx)
    if not force:
        found = unchanged_since(ctx)
        if found is not None:
            return summarize_unchanged(found)
    report = validate(ctx)
    label_summary = clean_labels(ctx)
    train_summary = train(ctx, fresh=force)
    detect(ctx, fresh=force)
    metrics = evaluate_catalogue_scale(ctx)
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
