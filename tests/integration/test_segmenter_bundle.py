"""What a model version carries besides the classifier, end to end on a small real catalogue:

- params train.segmenter on: the train stage trains the segmenter before the classifier,
  registration stores it with the version (inside the model, as the `segmenter` artifact and in
  the compressed variants' folder), and the service's loader gets it with the model, fp32 or
  compressed, once per load;
- params detect on: the detector stage trains the product detector, the evaluate stage
  measures it with the classifier on held-out scenes, registration pickles it with the
  classifier (and tags its digest), and a version whose detector is not the one registered
  with it is refused: one bundle, never mixed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bentos.loader import ModelLoader
from components.config import load_params, state_paths
from components.data import catalogue
from components.model import detector as det
from components.model import segmenter as segmenting
from components.model import shopper
from components.model.detection import detect_items
from components.model.transforms import model_input
from components.release.registry import ArtifactCorrupt, open_registry
from components.stages import detect, evaluate, labels, register, train, validate
from components.stages.context import RunContext, load_trained_model, read_json
from tests.conftest import TEST_DETECTOR, shrunk_params, write_csv_catalogue, write_params

pytestmark = pytest.mark.integration

TINY = {"enabled": True, "views": 200, "side": 32, "max_steps": 20, "budget_seconds": 60}
DETECTOR_STEPS = 10  # what this module checks is where the detector goes, not how good it is


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
    params["detect"].update(TEST_DETECTOR, max_steps=DETECTOR_STEPS)
    params["gate"]["max_compression_loss"] = 1.0  # this test is about what a variant carries
    path = write_params(root / "params.yaml", params)
    ctx = RunContext(load_params(path), state_paths(root / "state"), root / "run", root)
    catalogue.ingest_catalogue(
        str(csv),
        ctx.catalogue_dir,
        ctx.params.data.categories,
        fashion_mnist_dir=ctx.params.data.fashion_mnist_dir,
    )
    for stage in (validate, labels, train, detect, evaluate):
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


def test_the_detector_stage_trains_it_and_evaluate_measures_it_with_the_classifier(run):
    ctx, _, _ = run
    summary = read_json(ctx.work / "detect" / "detect_summary.json")
    assert summary["steps"] == DETECTOR_STEPS
    model = load_trained_model(ctx)
    assert model.detector.digest == summary["digest"]
    assert det.Detector.load(ctx.work / "detect" / det.FILE).digest == summary["digest"]
    metrics = read_json(ctx.work / "evaluate" / "metrics.json")
    for name in ("map50", "map50_95", "item_found", "item_accuracy", "item_recall_at_1"):
        assert 0 <= metrics[f"detect_{name}"] <= 1, name
    assert (ctx.work / "evaluate" / "detect_boxes.png").stat().st_size > 1000
    # a second run of the stage on the same rows and settings resumes the finished detector
    again = detect.run(ctx)
    assert again["resumed_from"].startswith("detector-") and again["digest"] == summary["digest"]


def test_the_version_carries_its_detector_and_refuses_another(run, fmnist):
    ctx, registry, version = run
    digest = load_trained_model(ctx).detector.digest
    assert registry.version_info(version)["tags"]["detector"] == digest
    loader = ModelLoader(ctx.paths, ctx.params, None, "onnx", "off")
    bundle = loader.load_bundle(registry, version)
    assert bundle.torch_model.detector.digest == digest
    photo = busy_photo(fmnist)
    items = detect_items(bundle.torch_model.detector, bundle.model, photo)
    assert all(0 <= item.category < 10 for item in items)
    # the version's tag names another detector (a model file swapped in the store, a tag
    # edited by hand): the registry refuses to load it, and the loader keeps what it serves
    registry.client.set_model_version_tag(registry.model_name, version, "detector", "0" * 16)
    try:
        with pytest.raises(ArtifactCorrupt, match="registered with detector 0000"):
            registry.load_model(version)
        with pytest.raises(ArtifactCorrupt):
            loader.load_bundle(registry, version)
    finally:
        registry.client.set_model_version_tag(registry.model_name, version, "detector", digest)
    assert registry.load_model(version).detector.digest == digest
