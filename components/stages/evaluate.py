"""The evaluate stage: the frozen test split (classification, retrieval against the catalogue
index this model built, latency), the text projection and the drift reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.model import evaluation, training
from components.model.models import VitrineNet
from components.stages.context import (
    RunContext,
    load_images,
    load_trained_model,
)


def build_index(ctx: RunContext, model: VitrineNet, products: pd.DataFrame) -> Path:
    """Embed every accepted product with THIS model: the search index registered beside it."""
    out = ctx.stage_dir("evaluate") / "index"
    out.mkdir(exist_ok=True)
    _, emb = training.predict_batches(model, load_images(ctx, products, model))
    np.save(out / "embeddings.npy", emb.astype(np.float32))
    cols = ["product_id", "label", "category", "title", "path", "split"]
    products[cols].reset_index(drop=True).to_parquet(out / "products.parquet", index=False)
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
    if ctx.params.text_search.enabled:
        result.metrics.update(build_text_projection(ctx, accepted, emb, index_dir))
    evaluation.write_evaluation_outputs(result, ctx.stage_dir("evaluate"))
    write_drift_reference(ctx, model, test)
    return result.metrics


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
