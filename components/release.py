"""Register, gate and promote: the stages of the loop that talk to the model registry.

The decision itself is the pure `gate.decide`; this module gathers its inputs (the
challenger's evaluation and the champion re-measured on the SAME frozen test split) and
applies the outcome through `registry.Registry` (the only module that imports mlflow).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from components import evaluation, gate, training
from components.compress import ARTIFACT_DIR
from components.config import Params
from components.pipeline import (
    RunContext,
    git_commit,
    load_images,
    load_trained_model,
    read_json,
    write_json,
)
from components.pipeline import (
    data_version as pipeline_data_version,
)
from components.registry import Registry
from components.transforms import to_tensor
from components.variants import run_compression

HEADLINE = ("accuracy", "macro_f1", "recall_at_1")


def open_registry(ctx: RunContext) -> Registry:
    return Registry(
        tracking_uri=ctx.paths.tracking_uri,
        artifact_root=ctx.paths.artifacts,
        model_name=ctx.params.registry.model_name,
        audit_log=ctx.paths.audit_log,
    )


def flatten_params(params: Params) -> dict[str, str]:
    flat = {}
    for section, values in params.model_dump(mode="json").items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = str(value)[:500]
    return flat


def _log_stage_outputs(registry: Registry, work: Path) -> None:
    """Every stage's report into the same MLflow run (validation, labels, training, evaluation)."""
    for rel, dest in [
        ("validate/validation_report.json", "validation"),
        ("validate/quarantine.parquet", "validation"),
        ("validate/docs", "validation/data_docs"),
        ("labels/label_issues.parquet", "labels"),
        ("labels/label_summary.json", "labels"),
        ("train/train_summary.json", "training"),
        ("evaluate/metrics.json", "evaluation"),
        ("evaluate/per_class.csv", "evaluation"),
        ("evaluate/predictions.parquet", "evaluation"),
        ("evaluate/confusion.png", "evaluation"),
    ]:
        if (work / rel).exists():
            registry.log_artifact(work / rel, dest)


def run_registration(ctx: RunContext, registry: Registry, cause: str = "manual") -> dict:
    """Log the run (params, metrics, every stage report) and register model + index together."""
    work = ctx.work
    metrics = read_json(work / "evaluate" / "metrics.json")
    report = read_json(work / "validate" / "validation_report.json")
    label_summary = read_json(work / "labels" / "label_summary.json")
    data_version = pipeline_data_version(ctx)
    model = load_trained_model(ctx)
    accepted_head = pd.read_parquet(work / "validate" / "accepted.parquet").head(2)
    example = to_tensor(load_images(ctx, accepted_head, model)).contiguous().numpy()
    tags = {
        "data_version": data_version,
        "git_commit": git_commit(ctx.repo),
        "backbone": model.backbone_name,
        "cause": cause,
        **{name: f"{metrics[name]:.4f}" for name in HEADLINE},
    }
    compression = run_compression(ctx, model)  # variants gated on the frozen test split
    tags.update(compression["tags"])
    run_name = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}"
    with registry.start_run(
        run_name, tags={"cause": cause, "data_version": data_version}
    ) as run_id:
        registry.log_params(flatten_params(ctx.params))
        counts = {k: float(v) for k, v in report["counts"].items()}
        counts["label_issues"] = float(label_summary["flagged"])
        registry.log_metrics(
            {**{k: float(v) for k, v in metrics.items()}, **counts, **compression["metrics"]}
        )
        _log_stage_outputs(registry, work)
        artifacts = {"index": work / "evaluate" / "index"}
        if (work / "evaluate" / "reference").is_dir():  # the drift reference (monitoring/)
            artifacts["reference"] = work / "evaluate" / "reference"
        if compression["folder"] is not None:  # accepted variants, beside model and index
            artifacts[ARTIFACT_DIR] = compression["folder"]
        version = registry.log_and_register_model(
            model, example, extra_artifacts=artifacts, tags=tags
        )
    out = {"version": version, "run_id": run_id, "data_version": data_version}
    write_json(out, ctx.stage_dir("register") / "registered.json")
    return out


def measure_champion(ctx: RunContext, registry: Registry, version: str) -> gate.Candidate:
    """Re-evaluate the champion on the challenger's frozen test split (same images, same order)."""
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
    return gate.Candidate(version, result.metrics, result.predictions["correct"].to_numpy())


def run_gate(ctx: RunContext, registry: Registry) -> dict:
    """Challenger vs champion on the same frozen test split; the verdict becomes version tags."""
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


def floors_passed(metrics: dict, params: Params) -> bool:
    return bool(
        metrics["accuracy"] >= params.gate.min_accuracy
        and metrics["recall_at_1"] >= params.gate.min_recall_at_1
    )


def run_bootstrap_promotion(ctx: RunContext, registry: Registry, verdict: dict) -> dict | None:
    """With no champion yet, a version over the floors becomes champion without approval
    (when params.promotion.bootstrap_without_approval); otherwise it waits for an owner."""
    if registry.alias_version("champion") is not None or not verdict["passed"]:
        return None
    if not ctx.params.promotion.bootstrap_without_approval:
        return None
    metrics = read_json(ctx.work / "evaluate" / "metrics.json")
    return registry.promote(
        verdict["version"],
        bootstrap_without_approval=True,
        floors_passed=floors_passed(metrics, ctx.params),
    )


def run_promotion(ctx: RunContext, registry: Registry, version: str | None = None) -> dict | None:
    """`vitrine promote` / the promote flow: approved + gate-passed → champion; with
    params.promotion.require_ab the challenger also needs a finished, healthy online A/B period."""
    check = None
    if ctx.params.promotion.require_ab:
        from components.ab import ab_verdict, read_ab_log, summarise_arms

        def check(candidate: str) -> str | None:
            summary = summarise_arms(read_ab_log(ctx.paths.home / "requests"))
            passed, reasons = ab_verdict(summary, candidate, ctx.params.serving.ab)
            return None if passed else "A/B gate: " + "; ".join(reasons)

    return registry.promote(version, extra_check=check)
