"""The register stage: log the run (params, metrics, every stage's report) and register the model
with its index, drift reference and accepted compressed variants as one MLflow version."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pandas as pd

from components.config import HEADLINE_METRICS, Params
from components.data import catalogue
from components.model.compress import ARTIFACT_DIR
from components.model.detector import FILE as DETECTOR_FILE
from components.model.segmenter import FILE as SEGMENTER_FILE
from components.model.transforms import to_tensor
from components.release.gate import read_gate_passed
from components.release.registry import Registry, open_registry
from components.stages import compress
from components.stages.context import (
    RunContext,
    git_commit,
    load_images,
    load_trained_model,
    read_json,
    write_json,
)
from components.stages.context import data_version as read_data_version

FINGERPRINT_TAG = "run_fingerprint"
UNTRACKED_SECTIONS = ("schedules", "refresh")  # when the loop runs / the index later, not the model


def run_fingerprint(ctx: RunContext) -> str:
    """What a run's outcome is made of: the data version, the catalogue's manifest (rows,
    labels, image hashes, splits) and every param the loop reads. Two runs with the same
    fingerprint train the same model (seeded), so the second one is a no-op."""
    manifest = catalogue.read_manifest(ctx.catalogue_dir)
    rows = manifest[["product_id", "label", "sha256", "split"]].astype(str)
    params = ctx.params.model_dump_json(exclude=set(UNTRACKED_SECTIONS))
    digest = hashlib.sha256()
    for part in (read_data_version(ctx), rows.to_csv(index=False), params):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def unchanged_since(ctx: RunContext, registry: Registry | None = None) -> dict | None:
    """The newest gated version registered from the same data and params (same
    run_fingerprint), or None when this run would make something new. A version whose run
    stopped before its gate verdict does not count: the rerun finishes the job."""
    registry = registry or open_registry(ctx.paths, ctx.params)
    fingerprint = run_fingerprint(ctx)
    for row in registry.list_versions():
        tags = row["tags"]
        if tags.get(FINGERPRINT_TAG) == fingerprint and read_gate_passed(tags) is not None:
            return {
                "version": row["version"],
                "tags": tags,
                "fingerprint": fingerprint,
                "champion": registry.alias_version("champion"),
            }
    return None


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
        ("evaluate/shopper.csv", "evaluation/shopper"),
        ("evaluate/shopper_grid.png", "evaluation/shopper"),
        ("evaluate/detect_boxes.png", "evaluation/detect"),
        ("detect/detect_summary.json", "detect"),
    ]:
        if (work / rel).exists():
            registry.log_artifact(work / rel, dest)


def run(ctx: RunContext, registry: Registry | None = None, cause: str = "manual") -> dict:
    """Log the run (params, metrics, every stage report) and register model + index together."""
    registry = registry or open_registry(ctx.paths, ctx.params)
    work = ctx.work
    metrics = read_json(work / "evaluate" / "metrics.json")
    report = read_json(work / "validate" / "validation_report.json")
    label_summary = read_json(work / "labels" / "label_summary.json")
    data_version = read_data_version(ctx)
    model = load_trained_model(ctx)
    accepted_head = pd.read_parquet(work / "validate" / "accepted.parquet").head(2)
    example = to_tensor(load_images(ctx, accepted_head, model)).contiguous().numpy()
    tags = {
        "data_version": data_version,
        "git_commit": git_commit(ctx.repo),
        "backbone": model.backbone_name,
        "cause": cause,
        FINGERPRINT_TAG: run_fingerprint(ctx),
        **{name: f"{metrics[name]:.4f}" for name in HEADLINE_METRICS},
    }
    if getattr(model, "segmenter", None) is not None:  # which learned mask it preprocesses with
        tags["segmenter"] = model.segmenter.digest
    if getattr(model, "detector", None) is not None:  # the detector pickled with it
        tags["detector"] = model.detector.digest
    compression = compress.run(ctx, model)  # variants gated on the frozen test split
    tags.update(compression["tags"])
    run_name = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}"
    with registry.start_run(
        run_name, tags={"cause": cause, "data_version": data_version}
    ) as run_id:
        registry.log_params(flatten_params(ctx.params))
        counts = {k: float(v) for k, v in report["counts"].items()}
        counts["label_issues"] = float(label_summary["flagged"])
        detect_summary = work / "detect" / "detect_summary.json"
        if detect_summary.exists() and "stage_seconds" in (trained := read_json(detect_summary)):
            counts["detect_train_seconds"] = float(trained["stage_seconds"])
        registry.log_metrics(
            {**{k: float(v) for k, v in metrics.items()}, **counts, **compression["metrics"]}
        )
        _log_stage_outputs(registry, work)
        artifacts = {"index": work / "evaluate" / "index"}
        if (work / "evaluate" / "reference").is_dir():  # the drift reference (monitoring/)
            artifacts["reference"] = work / "evaluate" / "reference"
        if compression["folder"] is not None:  # accepted variants, beside model and index
            artifacts[ARTIFACT_DIR] = compression["folder"]
        if (work / "train" / SEGMENTER_FILE).is_file():  # also inside the pickled model
            artifacts["segmenter"] = work / "train" / SEGMENTER_FILE
        if (work / "detect" / DETECTOR_FILE).is_file():  # also inside the pickled model
            artifacts["detector"] = work / "detect" / DETECTOR_FILE
        version = registry.log_and_register_model(
            model, example, extra_artifacts=artifacts, tags=tags
        )
    out = {"version": version, "run_id": run_id, "data_version": data_version}
    write_json(out, ctx.stage_dir("register") / "registered.json")
    return out
