"""The gate stage: the challenger against the champion re-measured on the SAME frozen test split;
the pure `release.gate.decide` judges, and the verdict becomes version tags."""

from __future__ import annotations

import pandas as pd

from components.model import evaluation, training
from components.release import gate
from components.release.registry import Registry, open_registry
from components.stages import evaluate
from components.stages.context import (
    RunContext,
    load_images,
    read_json,
    write_json,
)


def measure_champion(ctx: RunContext, registry: Registry, version: str) -> gate.Candidate:
    """Re-evaluate the champion on the challenger's frozen test split (same images, same order)
    and on the same shopper-style photos."""
    model = registry.load_model(version).eval()
    accepted = pd.read_parquet(ctx.work / "validate" / "accepted.parquet")
    accepted = accepted.sort_values("product_id").reset_index(drop=True)
    in_catalogue = (accepted["split"] == "train").to_numpy()
    _, emb = training.predict_batches(model, load_images(ctx, accepted[in_catalogue], model))
    test = accepted[~in_catalogue]
    result = evaluation.evaluate_model(
        model,
        load_images(ctx, test, model),
        test["label"].to_numpy(),
        test["product_id"].tolist(),
        emb,
        accepted.loc[in_catalogue, "label"].to_numpy(),
        ctx.params.data.categories,
        ctx.params.evaluation,
        ctx.stage_dir("gate") / "champion",
    )
    shopper = evaluate.evaluate_shopper(
        ctx,
        model,
        test,
        emb,
        accepted.loc[in_catalogue, "label"].to_numpy(),
        result.metrics,
        ctx.stage_dir("gate") / "champion",
    )
    result.metrics.update(shopper.metrics)
    result.metrics.update(  # its detector on the challenger's held-out scenes (none: nothing)
        evaluate.evaluate_detection(
            ctx,
            model,
            test,
            emb,
            accepted.loc[in_catalogue, "label"].to_numpy(),
            ctx.stage_dir("gate") / "champion",
        )
    )
    return gate.Candidate(version, result.metrics, result.predictions["correct"].to_numpy())


def run(ctx: RunContext, registry: Registry | None = None) -> dict:
    """Challenger vs champion on the same frozen test split; the verdict becomes version tags."""
    registry = registry or open_registry(ctx.paths, ctx.params)
    version = read_json(ctx.work / "register" / "registered.json")["version"]
    metrics = read_json(ctx.work / "evaluate" / "metrics.json")
    predictions = pd.read_parquet(ctx.work / "evaluate" / "predictions.parquet")
    challenger = gate.Candidate(version, metrics, predictions["correct"].to_numpy(dtype=bool))
    champion_version = registry.alias_version("champion")
    champion = None
    if champion_version is not None and champion_version != version:
        champion = measure_champion(ctx, registry, champion_version)
    verdict = gate.decide(challenger, champion, ctx.params.gate)
    registry.record_verdict(version, verdict.to_dict())
    out = {
        "version": version,
        "champion": champion_version,
        "champion_metrics": champion.metrics if champion else None,
        **verdict.to_dict(),
    }
    write_json(out, ctx.stage_dir("gate") / "verdict.json")
    return out
