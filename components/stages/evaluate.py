"""The evaluate stage: the frozen test split (classification, retrieval against the catalogue
index this model built, latency), the same test products as shoppers photograph them (the
shopper-style set: components/model/shopper.py), the text projection and the drift reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from components.model import evaluation, training
from components.model.models import VitrineNet
from components.stages.context import (
    RunContext,
    load_images,
    load_trained_model,
)


def build_index(ctx: RunContext, model: VitrineNet, products: pd.DataFrame) -> Path:
    """Embed every accepted product with THIS model: the search index registered beside it,
    with each product's colour tags (`colours`: "navy,white", from its catalogue image)."""
    from components.retrieval.colours import catalogue_colours

    out = ctx.stage_dir("evaluate") / "index"
    out.mkdir(exist_ok=True)
    _, emb = training.predict_batches(model, load_images(ctx, products, model))
    np.save(out / "embeddings.npy", emb.astype(np.float32))
    cols = ["product_id", "label", "category", "title", "path", "split"]
    table = products[cols].reset_index(drop=True)
    paths = [ctx.catalogue_dir / p for p in table["path"]]
    table["colours"] = catalogue_colours(
        tqdm(paths, desc="colour tags", unit="img", mininterval=2)  # reads every photo again
    )
    table.to_parquet(out / "products.parquet", index=False)
    return out


def run(ctx: RunContext) -> dict:
    """Frozen test split: classification, retrieval against the catalogue, latency."""
    accepted = pd.read_parquet(ctx.work / "validate" / "accepted.parquet")
    accepted = accepted.sort_values("product_id").reset_index(drop=True)
    model = load_trained_model(ctx)
    index_dir = build_index(ctx, model, accepted)
    emb = np.load(index_dir / "embeddings.npy")
    in_catalogue = (accepted["split"] == "train").to_numpy()
    test = accepted[~in_catalogue]
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
    if ctx.params.text_search.enabled:
        result.metrics.update(build_text_projection(ctx, accepted, emb, index_dir))
    evaluation.write_evaluation_outputs(result, ctx.stage_dir("evaluate"))
    write_drift_reference(ctx, model, test)
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


def write_drift_reference(ctx: RunContext, model: VitrineNet, test: pd.DataFrame) -> Path:
    """The test split as THIS model sees it (request-log fields): monitoring's drift reference,
    registered beside the model and its index (components/model/reference.py)."""
    from components.model import reference

    rows = reference.build_reference(model, test, ctx.catalogue_dir, ctx.params.data.categories)
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
