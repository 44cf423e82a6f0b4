"""The train stage: the model on the cleaned training rows; checkpoints make a re-run resume."""

from __future__ import annotations

import pandas as pd
import torch

from components.model import training
from components.stages.context import (
    RunContext,
    load_images,
    load_views,
    write_json,
)


def run(ctx: RunContext, fresh: bool = False) -> dict:
    """Train on the cleaned training rows; checkpoints make a re-run resume after a crash
    (`fresh`: start from scratch whatever the checkpoint holds)."""
    train = pd.read_parquet(ctx.work / "labels" / "train_manifest.parquet")
    images = load_images(ctx, train)
    result = training.train_model(
        images,
        train["label"].to_numpy(),
        ctx.params.train,
        num_classes=len(ctx.params.data.categories),
        checkpoint_dir=ctx.paths.home / "checkpoints",
        views=load_views(ctx, train),  # shopper-style renderings of the same rows
        resume=not fresh,
    )
    out = ctx.stage_dir("train")
    torch.save(result.model, out / "model.pt")
    summary = {
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "class_weights": result.class_weights,
        "train_seconds": round(result.train_seconds, 1),
        "history": result.history,
        "n_train": len(train),
    }
    write_json(summary, out / "train_summary.json")
    return summary
