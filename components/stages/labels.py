"""The labels stage: the cleaning model's probabilities (components/data/labels.py), cleanlab's
issues, then the policy (drop, relabel or keep) on the training rows."""

from __future__ import annotations

import pandas as pd

from components.data import labels
from components.stages.context import (
    RunContext,
    load_images,
    write_json,
)

LABEL_MODEL_SIZE = 28  # the cheap label-cleaning model works on small grayscale thumbnails


def run(ctx: RunContext) -> dict:
    """Cleaning-model probabilities → cleanlab issues → the policy (drop / relabel / keep)."""
    accepted = pd.read_parquet(ctx.work / "validate" / "accepted.parquet")
    train = accepted[accepted["split"] == "train"].sort_values("product_id").reset_index(drop=True)
    images = load_images(ctx, train, size=LABEL_MODEL_SIZE, channels=1)
    cleaned, issues, summary = labels.clean_labels(
        train, images, ctx.params.labels, seed=ctx.params.data.seed
    )
    out = ctx.stage_dir("labels")
    issues.to_parquet(out / "label_issues.parquet", index=False)
    cleaned.to_parquet(out / "train_manifest.parquet", index=False)
    write_json(summary, out / "label_summary.json")
    return summary
