"""Catalogue-scale work on Dask: the evaluate stage's index (embeddings and colour tags) and
drift reference, mapped over shards by Prefect's Dask task runner, equal the single-process
path's: on a running two-worker cluster (`distributed.scheduler_address`) and on the local
cluster the runner starts itself (the default), through the retrain flow's own evaluate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster, get_task_stream

from components.config import load_params, state_paths
from components.stages import evaluate as evaluate_stage
from components.stages import ingest, labels, train, validate
from components.stages.context import RunContext
from tests.conftest import shrunk_params, write_csv_catalogue, write_params

pytestmark = pytest.mark.scale


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist) -> RunContext:
    """A run folder with a validated catalogue of 400 products and a trained tiny model."""
    root = tmp_path_factory.mktemp("dask")
    csv = write_csv_catalogue(root / "shop", fmnist, n_train=300, n_test=100)
    params = shrunk_params(
        root / "catalogue",
        data={"source": str(csv)},
        train={"epochs": 2, "max_batches_per_epoch": 20},
        text_search={"enabled": False},
    )
    # one shopper shift is enough here: the shopper-style set has its own tests
    params["evaluation"]["shopper"]["shifts"] = ["jpeg"]
    params_path = write_params(root / "params.yaml", params)
    ctx = RunContext(load_params(params_path), state_paths(root / "state"), root / "run", root)
    ingest.run(ctx)
    validate.run(ctx)
    labels.run(ctx)
    train.run(ctx)
    return ctx


@pytest.fixture(scope="module")
def single(trained) -> tuple[evaluate_stage.Catalogue, pd.DataFrame]:
    """The catalogue part of evaluate in this one process: what Dask must reproduce."""
    accepted = evaluate_stage.accepted_products(trained)
    test = evaluate_stage.test_products(accepted)
    return (
        evaluate_stage.describe_catalogue(trained, accepted),
        evaluate_stage.reference_rows(trained, test),
    )


def sharded(ctx: RunContext, **settings) -> RunContext:
    """The run's context with params.distributed on and `settings` (small shards: several
    per worker)."""
    update = {"enabled": True, "shard_rows": 64, **settings}
    distributed = ctx.params.distributed.model_copy(update=update)
    params = ctx.params.model_copy(update={"distributed": distributed})
    return RunContext(params, ctx.paths, work=ctx.work, repo=ctx.repo)


def test_the_index_and_reference_built_on_two_dask_workers_equal_one_process(
    trained, single, prefect_api
):
    from flows.retrain import catalogue_on_dask, dask_runner

    expected, expected_reference = single
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):  # a running cluster, as a shop's would be: the runner connects to its scheduler
        on_cluster = sharded(trained, scheduler_address=cluster.scheduler_address)
        with get_task_stream(client) as stream:
            catalogue, reference = catalogue_on_dask.with_options(
                task_runner=dask_runner(on_cluster.params.distributed)
            )(on_cluster)
        workers = {task["worker"] for task in stream.data}
    assert len(catalogue.embeddings) == 400
    assert len(workers) == 2, workers  # both workers took shards (9 shards of at most 64)
    np.testing.assert_allclose(catalogue.embeddings, expected.embeddings, atol=1e-5)
    assert catalogue.colours == expected.colours
    pd.testing.assert_frame_equal(
        reference.drop(columns="embedding"), expected_reference.drop(columns="embedding")
    )
    np.testing.assert_allclose(
        np.stack(reference["embedding"]), np.stack(expected_reference["embedding"]), atol=1e-5
    )


def test_without_a_scheduler_address_evaluate_runs_on_a_local_cluster(trained, single, prefect_api):
    """The retrain flow's evaluate with distributed on and no address: the runner starts a
    local cluster of distributed.local_workers processes; the index and reference it writes
    are the single process's."""
    from flows.retrain import evaluate_catalogue_scale

    expected, expected_reference = single
    metrics = evaluate_catalogue_scale(sharded(trained, local_workers=2))
    assert {"accuracy", "recall_at_1", "shopper_jpeg_accuracy"} <= set(metrics)
    index = trained.work / "evaluate" / "index"
    np.testing.assert_allclose(np.load(index / "embeddings.npy"), expected.embeddings, atol=1e-5)
    assert pd.read_parquet(index / "products.parquet")["colours"].tolist() == expected.colours
    written = pd.read_parquet(trained.work / "evaluate" / "reference" / "reference.parquet")
    assert written["product_id"].tolist() == expected_reference["product_id"].tolist()


def test_an_index_refresh_embeds_on_a_local_dask_cluster_as_in_one_process(trained, prefect_api):
    """`vitrine index refresh` at catalogue scale: the new and changed rows embedded and
    colour-tagged in shards on the Dask task runner equal the refresh's one-process path."""
    from components.stages import refresh
    from flows.refresh import describe_on_dask
    from flows.retrain import dask_runner

    rows = evaluate_stage.accepted_products(trained).head(200)
    model_path = trained.work / "train" / "model.pt"
    expected = refresh.describe_rows(trained, model_path, rows)
    on_dask = sharded(trained, local_workers=2)
    runner = dask_runner(on_dask.params.distributed)
    described = describe_on_dask.with_options(task_runner=runner)(on_dask, model_path, rows)
    assert len(described.embeddings) == 200
    np.testing.assert_allclose(described.embeddings, expected.embeddings, atol=1e-5)
    assert described.colours == expected.colours
