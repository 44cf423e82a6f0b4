"""Catalogue-scale work on Dask: the evaluate stage's index (embeddings and colour tags) and
drift reference, mapped over shards by Prefect's Dask task runner, equal the single-process
path's: on a running two-worker cluster (`distributed.scheduler_address`) and on the local
cluster the runner starts itself (the default), through the retrain flow's own evaluate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster, get_task_stream
from prefect.testing.utilities import prefect_test_harness

from components.stages import evaluate as evaluate_stage
from tests.serving.conftest import build_champion

pytestmark = pytest.mark.scale


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist):
    """A run folder with a validated catalogue and a trained model (a tiny champion's)."""
    lean = {"registry": {"variants": []}, "text_search": {"enabled": False}}
    return build_champion(tmp_path_factory.mktemp("dask"), fmnist, n_train=300, n_test=100, **lean)


def sharded(ctx, **settings):
    """The run's context with params.distributed on and `settings` (small shards: several
    per worker)."""
    update = {"enabled": True, "shard_rows": 64, **settings}
    distributed = ctx.params.distributed.model_copy(update=update)
    params = ctx.params.model_copy(update={"distributed": distributed})
    return type(ctx)(params, ctx.paths, work=ctx.work, repo=ctx.repo)


def test_the_index_and_reference_built_on_two_dask_workers_equal_one_process(trained, prefect_api):
    from flows.retrain import catalogue_on_dask, dask_runner

    ctx = trained.ctx
    accepted = evaluate_stage.accepted_products(ctx)
    single = evaluate_stage.describe_catalogue(ctx, accepted)
    single_reference = evaluate_stage.reference_rows(ctx, evaluate_stage.test_products(accepted))

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):  # a running cluster, as a shop's would be: the runner connects to its scheduler
        on_cluster = sharded(ctx, scheduler_address=cluster.scheduler_address)
        with get_task_stream(client) as stream:
            catalogue, reference = catalogue_on_dask.with_options(
                task_runner=dask_runner(on_cluster.params.distributed)
            )(on_cluster)
        workers = {task["worker"] for task in stream.data}
    assert len(accepted) == 400
    assert len(workers) == 2, workers  # both workers took shards (7 shards of 64)
    np.testing.assert_allclose(catalogue.embeddings, single.embeddings, atol=1e-5)
    assert catalogue.colours == single.colours
    pd.testing.assert_frame_equal(
        reference.drop(columns="embedding"), single_reference.drop(columns="embedding")
    )
    np.testing.assert_allclose(
        np.stack(reference["embedding"]), np.stack(single_reference["embedding"]), atol=1e-5
    )


def test_without_a_scheduler_address_evaluate_runs_on_a_local_cluster(trained, prefect_api):
    """The retrain flow's evaluate with distributed on and no address: the runner starts a
    local cluster of distributed.local_workers processes; the registered index is the same."""
    from flows.retrain import evaluate_catalogue_scale

    ctx = trained.ctx
    single = np.load(ctx.work / "evaluate" / "index" / "embeddings.npy")  # build_champion's
    single_colours = pd.read_parquet(ctx.work / "evaluate" / "index" / "products.parquet")
    on_local = sharded(ctx, local_workers=2)
    # one shopper shift is enough here: the shopper-style set has its own tests
    evaluation = on_local.params.evaluation
    shopper = evaluation.shopper.model_copy(update={"shifts": ["jpeg"]})
    evaluation = evaluation.model_copy(update={"shopper": shopper})
    on_local.params = on_local.params.model_copy(update={"evaluation": evaluation})
    metrics = evaluate_catalogue_scale(on_local)
    assert {"accuracy", "recall_at_1", "shopper_jpeg_accuracy"} <= set(metrics)
    np.testing.assert_allclose(
        np.load(ctx.work / "evaluate" / "index" / "embeddings.npy"), single, atol=1e-5
    )
    rebuilt = pd.read_parquet(ctx.work / "evaluate" / "index" / "products.parquet")
    pd.testing.assert_frame_equal(rebuilt, single_colours)
