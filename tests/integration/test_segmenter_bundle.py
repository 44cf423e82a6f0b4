"""params train.segmenter on, end to end on a small real catalogue: the train stage trains the
segmenter before the classifier, registration stores it with the version (inside the model,
as the `segmenter` artifact and in the compressed variants' folder), and the service's loader
gets it with the model, fp32 or compressed, once per load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bentos.loader import ModelLoader
from components.config import load_params, state_paths
from components.data import catalogue
from components.model import segmenter as segmenting
from components.model import shopper
from components.model.transforms import model_input
from components.release.registry import open_registry
from components.stages import evaluate, labels, register, train, validate
from components.stages.context import RunContext, load_trained_model, read_json
from tests.conftest import shrunk_params, write_csv_catalogue, write_params

pytestmark = pytest.mark.integration

TINY = {"enabled": True, "views": 200, "side": 32, "max_steps": 20, "budget_seconds": 60}


@pytest.fixture(scope="module")
def run(tmp_path_factory, fmnist):
    root = tmp_path_factory.mktemp("segmenter-run")
    csv = write_csv_catalogue(root / "shop", fmnist, n_train=300, n_test=80)
    params = shrunk_params(
        root / "catalogue",
        data={"source": str(csv)},
        train={"epochs": 1, "max_batches_per_epoch": 5, "preprocess": "canonical"},
        labels={"folds": 2},
        text_search={"enabled": False},
        registry={"variants": ["onnx"], "calibration_images": 16},
    )
    params["train"]["segmenter"] = TINY
    params["gate"]["max_compression_loss"] = 1.0  # this test is about what a variant carries
    path = write_params(root / "params.yaml", params)
    ctx = RunContext(load_params(path), state_paths(root / "state"), root / "run", root)
    catalogue.ingest_catalogue(
        str(csv),
        ctx.catalogue_dir,
        ctx.params.data.categories,
        fashion_mnist_dir=ctx.params.data.fashion_mnist_dir,
    )
    for stage in (validate, labels, train, evaluate):
        stage.run(ctx)
    registry = open_registry(ctx.paths, ctx.params)
    version = register.run(ctx, registry, cause="test")["version"]
    return ctx, registry, version


def busy_photo(fmnist) -> Image.Image:
    rng = shopper.shift_rng(0, "busy_background", 1)
    return shopper.render(Image.fromarray(fmnist["test"][0][1]), "busy_background", rng)


def test_the_train_stage_trains_it_and_the_model_carries_it(run):
    ctx, _, _ = run
    summary = read_json(ctx.work / "train" / "train_summary.json")["segmenter"]
    assert summary["steps"] == TINY["max_steps"]
    model = load_trained_model(ctx)
    saved = segmenting.Segmenter.load(ctx.work / "train" / segmenting.FILE)
    assert model.segmenter.digest == saved.digest == summary["digest"]


def test_the_registered_version_and_the_served_bundles_keep_it(run, fmnist, tmp_path):
    ctx, registry, version = run
    digest = load_trained_model(ctx).segmenter.digest
    assert registry.version_info(version)["tags"]["segmenter"] == digest
    stored = registry.download_artifacts(version, "segmenter", tmp_path)
    assert segmenting.Segmenter.load(stored / segmenting.FILE).digest == digest
    photo = busy_photo(fmnist)
    expected = model_input(photo, load_trained_model(ctx))
    for variant in ("fp32", "onnx"):
        bundle = ModelLoader(ctx.paths, ctx.params, None, variant, "off").load_bundle(
            registry, version
        )
        assert bundle.variant == variant
        for model in (bundle.model, bundle.torch_model):
            assert model.segmenter.digest == digest
            assert np.array_equal(model_input(photo, model), expected)
    assert isinstance(bundle.model.segmenter.net, torch.nn.Module)
