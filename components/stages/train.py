"""The train stage: the model on the cleaned training rows; checkpoints make a re-run resume.

With params train.segmenter on (and canonical preprocessing) a learned busy-background mask
(components/model/segmenter.py) is trained first, on the same training rows, so that the
classifier's inputs and shopper-style views are canonicalised with it; the model carries it
(`model.segmenter`) and train/segmenter.pt keeps its weights beside model.pt."""

from __future__ import annotations

import hashlib
import logging

import pandas as pd
import torch

from components.model import segmenter as segmenting
from components.model import segmenter_training, training
from components.stages.context import (
    RunContext,
    load_images,
    load_views,
    write_json,
)
from components.threads import limited_threads

log = logging.getLogger("vitrine.train")


def run(ctx: RunContext, fresh: bool = False) -> dict:
    """Train on the cleaned training rows; checkpoints make a re-run resume after a crash
    (`fresh`: start from scratch whatever the checkpoint holds)."""
    train = pd.read_parquet(ctx.work / "labels" / "train_manifest.parquet")
    segmenter, segmenter_summary = train_segmenter(ctx, train, fresh)
    images = load_images(ctx, train, segmenter=segmenter)
    result = training.train_model(
        images,
        train["label"].to_numpy(),
        ctx.params.train,
        num_classes=len(ctx.params.data.categories),
        checkpoint_dir=ctx.paths.home / "checkpoints",
        views=load_views(ctx, train, segmenter),  # shopper-style renderings of the same rows
        resume=not fresh,
    )
    result.model.segmenter = segmenter
    out = ctx.stage_dir("train")
    (out / segmenting.FILE).unlink(missing_ok=True)
    if segmenter is not None:
        segmenter.save(out / segmenting.FILE)
    torch.save(result.model, out / "model.pt")
    summary = {
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "class_weights": result.class_weights,
        "train_seconds": round(result.train_seconds, 1),
        "history": result.history,
        "n_train": len(train),
        "segmenter": segmenter_summary,
    }
    write_json(summary, out / "train_summary.json")
    return summary


def train_segmenter(
    ctx: RunContext, train: pd.DataFrame, fresh: bool = False
) -> tuple[segmenting.Segmenter | None, dict | None]:
    """(the learned segmenter or None, what happened) for params train.segmenter: trained on the
    training rows' images only, or the one a previous attempt of the same rows and settings
    left in the checkpoint folder (a resumed classifier must see the same inputs)."""
    settings, params = ctx.params.train.segmenter, ctx.params.train
    if not settings.enabled:
        return None, None
    if params.preprocess != "canonical":
        return None, {"skipped": "train.preprocess is plain: only canonical uses a segmenter"}
    digest = hashlib.sha256("".join(train["sha256"]).encode())
    digest.update(f"{settings.model_dump_json()}-{params.seed}".encode())
    saved = ctx.paths.home / "checkpoints" / f"segmenter-{digest.hexdigest()[:16]}.pt"
    if saved.exists() and not fresh:
        segmenter = segmenting.Segmenter.load(saved)
        return segmenter, {"resumed_from": saved.name, "digest": segmenter.digest}
    log.info("training the segmenter: %d views, %.0f s", settings.views, settings.budget_seconds)
    with limited_threads(training.count_threads()):
        segmenter, summary = segmenter_training.train_from_params(
            [ctx.catalogue_dir / p for p in train["path"]], settings, params.seed, log.info
        )
    segmenter.save(saved)
    return segmenter, summary
