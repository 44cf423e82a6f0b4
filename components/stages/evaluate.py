"""The evaluate stage: the frozen test split (classification, retrieval against the catalogue
index this model built, latency), the same test products as shoppers photograph them (the
shopper-style set: components/model/shopper.py), the text projection and the drift reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from components.model import evaluation, training
from components.model.models import VitrineNet
from components.model.reference import DETECT_REFERENCE_FILE, REFERENCE_ARTIFACT
from components.retrieval.index import EXACT_MAX, CatalogueIndex
from components.stages.context import (
    RunContext,
    load_images,
    load_trained_model,
)


@dataclass
class Catalogue:
    """The catalogue as THIS model indexes it, in the row order of `products`: embeddings
    (N×D float32) and each product's colour tags ("navy,white", from its catalogue image)."""

    embeddings: np.ndarray
    colours: list[str]

    @classmethod
    def joined(cls, parts: list[Catalogue]) -> Catalogue:
        return cls(
            np.concatenate([p.embeddings for p in parts]), [c for p in parts for c in p.colours]
        )


def shards(products: pd.DataFrame, rows: int) -> list[pd.DataFrame]:
    """`products` in consecutive slices of at most `rows` (the order kept: joined, the shards'
    results line up with `products`)."""
    return [products.iloc[i : i + rows] for i in range(0, len(products), rows)]


def describe_catalogue(
    ctx: RunContext, products: pd.DataFrame, model: VitrineNet | None = None
) -> Catalogue:
    """Embed products with this run's trained model and tag their colours: one shard's work
    (on Dask, each worker loads the model from the run folder)."""
    from components.retrieval.colours import catalogue_colours

    model = model or load_trained_model(ctx)
    _, emb = training.predict_batches(model, load_images(ctx, products, model))
    paths = [ctx.catalogue_dir / p for p in products["path"]]
    colours = catalogue_colours(  # reads every photo again
        tqdm(paths, desc="colour tags", unit="img", mininterval=2, disable=len(paths) < 1000)
    )
    return Catalogue(emb.astype(np.float32), list(colours))


def reference_rows(
    ctx: RunContext, test: pd.DataFrame, model: VitrineNet | None = None
) -> pd.DataFrame:
    """The drift reference's rows for test products (components/model/reference.py): one
    shard's work."""
    from components.model import reference

    model = model or load_trained_model(ctx)
    return reference.build_reference(model, test, ctx.catalogue_dir, ctx.params.data.categories)


def build_index(ctx: RunContext, products: pd.DataFrame, catalogue: Catalogue) -> Path:
    """The search index registered beside the model: every accepted product's embedding
    and its colour tags, and above EXACT_MAX products the HNSW graph / IVF lists built on
    them (so no service worker builds them at load)."""
    out = ctx.stage_dir("evaluate") / "index"
    out.mkdir(exist_ok=True)
    np.save(out / "embeddings.npy", catalogue.embeddings.astype(np.float32))
    cols = ["product_id", "label", "category", "title", "path", "split", "sha256"]
    table = products[cols].reset_index(drop=True)
    table["colours"] = catalogue.colours
    table.to_parquet(out / "products.parquet", index=False)
    if len(table) > EXACT_MAX:  # the service loads the HNSW graph / IVF lists, never builds them
        CatalogueIndex.build(catalogue.embeddings, table).write_search_structure(out)
    return out


def accepted_products(ctx: RunContext) -> pd.DataFrame:
    """The validated catalogue in product-id order: what the index holds, row for row."""
    accepted = pd.read_parquet(ctx.work / "validate" / "accepted.parquet")
    return accepted.sort_values("product_id").reset_index(drop=True)


def test_products(accepted: pd.DataFrame) -> pd.DataFrame:
    return accepted[accepted["split"] != "train"]


def run(
    ctx: RunContext, catalogue: Catalogue | None = None, reference: pd.DataFrame | None = None
) -> dict:
    """Frozen test split: classification, retrieval against the catalogue, latency.

    `catalogue` and `reference` (the index's embeddings and colour tags, the drift
    reference's rows) come from the Dask task runner when params.distributed is on
    (flows/retrain.py); without them this process computes them."""
    accepted = accepted_products(ctx)
    model = load_trained_model(ctx)
    catalogue = catalogue or describe_catalogue(ctx, accepted, model)  # the model loaded once
    if len(catalogue.embeddings) != len(accepted):
        raise ValueError(f"{len(catalogue.embeddings)} embeddings for {len(accepted)} products")
    index_dir = build_index(ctx, accepted, catalogue)
    emb = catalogue.embeddings
    in_catalogue = (accepted["split"] == "train").to_numpy()
    test = test_products(accepted)
    result = evaluation.evaluate_model(
        model,
        load_images(ctx, test, model),
        test["label"].to_numpy(),
        test["product_id"].tolist(),
        emb[in_catalogue],
        accepted.loc[in_catalogue, "label"].to_numpy(),
        ctx.params.data.categories,
        ctx.params.evaluation,
        ctx.stage_dir("evaluate"),
    )
    shopper = evaluate_shopper(
        ctx,
        model,
        test,
        emb[in_catalogue],
        accepted.loc[in_catalogue, "label"].to_numpy(),
        result.metrics,
        ctx.stage_dir("evaluate"),
    )
    result.metrics.update(shopper.metrics)
    result.metrics.update(
        evaluate_detection(
            ctx,
            model,
            test,
            emb[in_catalogue],
            accepted.loc[in_catalogue, "label"].to_numpy(),
            ctx.stage_dir("evaluate"),
            reference_dir=ctx.stage_dir("evaluate") / REFERENCE_ARTIFACT,
        )
    )
    if ctx.params.text_search.enabled:
        result.metrics.update(build_text_projection(ctx, accepted, emb, index_dir))
    evaluation.write_evaluation_outputs(result, ctx.stage_dir("evaluate"))
    if reference is None:
        reference = reference_rows(ctx, test, model)
    write_drift_reference(ctx, reference)
    return result.metrics


def evaluate_shopper(
    ctx: RunContext,
    model: VitrineNet,
    test: pd.DataFrame,
    catalogue_embeddings: np.ndarray,
    catalogue_labels: np.ndarray,
    in_domain: dict[str, float],
    out_dir: Path,
) -> evaluation.ShopperResult:
    """The shopper-style set: a seeded, stratified sample of the frozen test split (never a
    training row), each product rendered under every shift of params.evaluation.shopper;
    writes shopper.csv and shopper_grid.png to out_dir (the register stage logs them)."""
    settings = ctx.params.evaluation.shopper
    test = test.sort_values("product_id").reset_index(drop=True)
    rows = evaluation.pick_shopper_rows(test["label"].to_numpy(), settings.images, settings.seed)
    picked = test.iloc[rows]
    sources = []
    for rel in picked["path"]:
        with Image.open(ctx.catalogue_dir / rel) as image:
            image.load()
            sources.append(image.copy())
    result = evaluation.evaluate_shopper(
        model,
        sources,
        picked["label"].to_numpy(),
        picked["product_id"].astype(str).tolist(),
        catalogue_embeddings,
        catalogue_labels,
        ctx.params.data.categories,
        list(settings.shifts),
        settings.seed,
        in_domain,
        out_dir,
        ctx.work / "evaluate" / "shopper-inputs",  # the gate's champion reuses them
        progress=True,
    )
    result.table.to_csv(Path(out_dir) / "shopper.csv", index=False)
    return result


def detection_scenes(ctx: RunContext, test: pd.DataFrame) -> list:
    """The held-out scenes: params detect.eval_scenes scenes of 2-5 products of the frozen test
    split (never a training row) at 512 x 384, seeded by detect.seed; the same for the
    challenger and the champion of a gate."""
    from components.model.detector_training import scene_products
    from components.model.scenes import compose_scenes

    test = test.sort_values("product_id").reset_index(drop=True)
    settings = ctx.params.detect
    images, labels = scene_products(
        [ctx.catalogue_dir / p for p in test["path"]], test["label"].tolist(), settings.seed
    )
    return compose_scenes(
        images, labels, settings.eval_scenes, settings.seed + 1, items=(2, 5), size=(512, 384)
    )


def evaluate_detection(
    ctx: RunContext,
    model: VitrineNet,
    test: pd.DataFrame,
    catalogue_embeddings: np.ndarray,
    catalogue_labels: np.ndarray,
    out_dir: Path,
    reference_dir: Path | None = None,
) -> dict[str, float]:
    """The model's detector with its classifier on the held-out scenes (detection.evaluate_
    detection): detect_* metrics, and detect_boxes.png of sample scenes in out_dir; with
    `reference_dir`, what it found per scene (items, item_area: the drift monitor's reference
    for /detect requests). Nothing for a model without a detector."""
    from components.model.detection import evaluate_detection as measure
    from components.model.detection import plot_detections
    from components.model.detector import detector_of

    detector = detector_of(model)
    if detector is None:
        return {}
    settings = ctx.params.detect
    scenes = detection_scenes(ctx, test)
    with torch.inference_mode():
        result = measure(
            detector,
            model,
            scenes,
            catalogue_embeddings,
            catalogue_labels,
            settings.max_items,
            settings.nms_iou,
        )
    plot_detections(scenes, result.items, ctx.params.data.categories, out_dir / "detect_boxes.png")
    if reference_dir is not None:
        from components.model.detection import item_stats

        rows = [
            item_stats(items, scene.photo.size)
            for scene, items in zip(scenes, result.items, strict=True)
        ]
        reference_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(reference_dir / DETECT_REFERENCE_FILE, index=False)
    return result.metrics


def write_drift_reference(ctx: RunContext, rows: pd.DataFrame) -> Path:
    """The test split as THIS model sees it (request-log fields): monitoring's drift reference,
    registered beside the model and its index (components/model/reference.py)."""
    from components.model import reference

    out = ctx.stage_dir("evaluate") / reference.REFERENCE_ARTIFACT
    return reference.write_reference(rows, out)


def build_text_projection(
    ctx: RunContext, products: pd.DataFrame, emb: np.ndarray, index_dir: Path
) -> dict[str, float]:
    """Fit the image → MiniLM-text projection on the catalogue's (train split) products and save
    it beside the index; precision@10 of held-out phrasings over the whole index is the metric."""
    from components.retrieval import (
        text as textsearch,  # the sentence model loads only when text search is on
    )

    settings = ctx.params.text_search
    train = (products["split"] == "train").to_numpy()
    titles = products["title"].fillna("").astype(str) if "title" in products else None
    projection = textsearch.train_text_projection(
        emb[train],
        products.loc[train, "category"].tolist(),
        None if titles is None else titles[train].tolist(),
        seed=ctx.params.train.seed,
        ridge_alpha=settings.ridge_alpha,
        max_titles=settings.max_titles,
        threads=torch.get_num_threads(),
    )
    projection.save(index_dir / textsearch.PROJECTION_FILE)
    scores = textsearch.evaluate_text_search(projection, emb, products["category"].tolist(), k=10)
    return {
        "text_precision_at_10": scores["precision_at_10"],
        "text_chance_at_10": scores["chance"],
    }
