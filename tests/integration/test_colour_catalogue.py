"""A shop's own colour catalogue through the loop: a CSV of colour photos in four formats and
uneven sizes (tests/conftest.py write_colour_catalogue), ingested and DVC-tracked in its own
data repo, validated, label-cleaned, fine-tuned with `train.backbone: efficientnet_lite0`,
evaluated (with the shopper-style set), registered and gated, stage by stage as the retrain
flow chains them (tests/integration/test_retrain_flow.py runs the flow itself)."""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import load_params, state_paths
from components.release.registry import open_registry
from components.stages import evaluate, gate, ingest, labels, promote, register, train, validate
from components.stages.context import RunContext, read_json
from tests.conftest import COLOUR_FORMATS, shrunk_params, write_colour_catalogue, write_params

pytestmark = pytest.mark.integration

# the size of issue 15's small shop: 1,500 photos, 1,275 of them training rows
N_TRAIN, N_TEST = 1275, 225


@pytest.fixture(scope="module")
def run(tmp_path_factory, fmnist):
    root = tmp_path_factory.mktemp("colour")
    repo = root / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    csv = write_colour_catalogue(root / "shop", fmnist, N_TRAIN, N_TEST)
    params = shrunk_params(
        repo / "data" / "catalogue",
        data={"source": str(csv)},
        # the ImageNet trunk at 64 px (no progressive resizing: 20 px is too small for it),
        # 4 epochs of 24 batches, the trunk at lr x pretrained_lr_scale
        train={
            "backbone": "efficientnet_lite0",
            "image_size": 64,
            "progressive_sizes": [],
            "epochs": 4,
            "max_batches_per_epoch": 24,
            "lr": 0.003,
        },
        labels={"model": "auto"},  # the default cleaner (shrunk_params: the MLP)
        registry={"variants": []},  # compressed variants have their own tests (test_variant.py)
    )
    params_path = write_params(root / "params.yaml", params)
    ctx = RunContext(load_params(params_path), state_paths(root / "state"), root / "run", repo)
    out = {"ctx": ctx, "ingested": ingest.run(ctx), "validated": validate.run(ctx)}
    out["labels"] = labels.run(ctx)
    out["trained"] = train.run(ctx)
    out["metrics"] = evaluate.run(ctx)
    registry = open_registry(ctx.paths, ctx.params)
    out["registered"] = register.run(ctx, registry, cause="test")
    out["verdict"] = gate.run(ctx, registry)
    out["promoted"] = promote.bootstrap(ctx, out["verdict"], registry)
    out["registry"] = registry
    return out


def test_every_format_and_size_is_ingested_and_accepted(run):
    assert run["ingested"]["ingested"] == N_TRAIN + N_TEST
    assert (run["ctx"].repo / "data.dvc").exists()
    report = run["validated"]
    assert report["counts"]["accepted"] == N_TRAIN + N_TEST, report
    manifest = pd.read_parquet(run["ctx"].work / "validate" / "accepted.parquet")
    suffixes = manifest["path"].str.rsplit(".", n=1).str[-1].value_counts()
    assert set(suffixes.index) == {"jpg", "webp", "png"}
    modes = set()  # the shop's files as ingested: CMYK JPEGs and transparent PNGs kept as they are
    for rel in manifest["path"].head(4 * len(COLOUR_FORMATS)):
        with Image.open(run["ctx"].catalogue_dir / rel) as image:
            modes.add(image.mode)
    assert {"RGB", "CMYK", "RGBA"} <= modes, modes


def test_a_small_clean_catalogue_keeps_its_good_rows_and_few_are_flagged(run):
    """Every label of this catalogue is right: the early-learning CNN (40 epochs on 1,275
    rows) flags at most 5% of them (measured: 61, 4.8%; the PCA + MLP flagged 140, 11%), and
    below labels.review_below_rows the flagged rows are a review queue, not dropped."""
    summary = run["labels"]
    assert summary["model"] == "early", summary
    assert summary["flagged"] <= 0.05 * N_TRAIN, summary
    assert summary["policy"] == "review" and summary["dropped"] == 0, summary
    kept = pd.read_parquet(run["ctx"].work / "labels" / "train_manifest.parquet")
    assert len(kept) == N_TRAIN
    issues = pd.read_parquet(run["ctx"].work / "labels" / "label_issues.parquet")
    assert len(issues) == summary["flagged"] and "suggested_label" in issues


def test_the_fine_tuned_colour_model_classifies_and_searches(run):
    model = run["registry"].load_model(run["registered"]["version"])
    assert (model.backbone_name, model.in_channels, model.preprocess) == (
        "efficientnet_lite0",
        3,
        "canonical",
    )
    metrics = run["metrics"]
    # 96 steps: accuracy 0.645 and Recall@1 0.55 on the earlier 800 photos (0.56-0.72 with lr
    # 0.003-0.01, trunk scale 0.03-1.0, 4-8 epochs); far from the 60k catalogue's 0.94, far
    # above chance (0.1) and a broken input path
    assert metrics["accuracy"] >= 0.50 and metrics["recall_at_1"] >= 0.40, metrics
    run_data = run["registry"].client.get_run(run["registered"]["run_id"]).data
    assert run_data.params["train.backbone"] == "efficientnet_lite0"
    assert run_data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])


def test_the_shopper_style_set_runs_on_the_colour_catalogue(run, tmp_path):
    metrics = run["metrics"]
    shifts = run["ctx"].params.evaluation.shopper.shifts
    for shift in shifts:
        assert 0.0 <= metrics[f"shopper_{shift}_accuracy"] <= 1.0
    # the colour shop's photos on white: the shopper's white-background photo is in its domain
    assert metrics["shopper_white_background_accuracy"] >= 0.8 * metrics["accuracy"]
    table = pd.read_csv(run["ctx"].work / "evaluate" / "shopper.csv")
    assert table["shift"].tolist() == list(shifts)
    local = run["registry"].download_artifacts(
        run["registered"]["version"], "evaluation/shopper", tmp_path
    )
    assert {"shopper.csv", "shopper_grid.png"} <= {p.name for p in local.iterdir()}
    verdict = read_json(run["ctx"].work / "gate" / "verdict.json")
    assert verdict["passed"] == run["verdict"]["passed"]
    assert any("shopper" in reason for reason in verdict["reasons"])


def test_colour_tags_name_the_dyed_colour(run):
    products = pd.read_parquet(run["ctx"].work / "evaluate" / "index" / "products.parquet")
    titles = products["title"].str.split(" ").str[0]  # the colour the product was dyed
    named = [t in c.split(",") for t, c in zip(titles, products["colours"], strict=True)]
    assert np.mean(named) >= 0.8, products[["title", "colours"]].head(20)
