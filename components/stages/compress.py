"""The registration-time compression stage: build each compressed variant from the version's own
fp32 weights, measure it on the same frozen test split as the fp32 model, and let the gate
accept or refuse it (`gate.check_compression`, tolerance `gate.max_compression_loss`).

Kept apart from components/model/compress.py so the service can load variants without importing
the training pipeline. Only accepted variants end up in the `compressed/` folder that
registration logs with the model; every verdict (accepted or refused, with the figures)
becomes a version tag `variant_<name>`, so a refused variant is never served and the reason
is visible in the MLflow UI.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.model import compress, evaluation
from components.model.models import VitrineNet
from components.release import gate
from components.stages.context import RunContext, load_images, read_json, write_json


@dataclass
class FrozenSplit:
    """What the loop evaluates on: the test split queried against the catalogue's embeddings
    (the fp32 index registered with the version, which a served variant also searches)."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    catalogue_emb: np.ndarray
    catalogue_labels: np.ndarray
    calibration: np.ndarray = field(repr=False)


def load_frozen_split(ctx: RunContext, model: VitrineNet, n_calibration: int) -> FrozenSplit:
    """The same rows and order as pipeline.run_evaluation, plus a seeded sample of the train
    split for int8 calibration (never test images: they judge the variant)."""
    accepted = pd.read_parquet(ctx.work / "validate" / "accepted.parquet")
    accepted = accepted.sort_values("product_id").reset_index(drop=True)
    in_catalogue = (accepted["split"] == "train").to_numpy()
    emb = np.load(ctx.work / "evaluate" / "index" / "embeddings.npy")
    everything = load_images(ctx, accepted, model)  # the index build already cached these
    test = accepted[~in_catalogue]
    train_rows = np.flatnonzero(in_catalogue)
    rng = np.random.default_rng(ctx.params.train.seed)
    picked = np.sort(
        rng.choice(train_rows, size=min(n_calibration, len(train_rows)), replace=False)
    )
    return FrozenSplit(
        images=everything[~in_catalogue],
        labels=test["label"].to_numpy(),
        ids=test["product_id"].tolist(),
        catalogue_emb=emb[in_catalogue],
        catalogue_labels=accepted.loc[in_catalogue, "label"].to_numpy(),
        calibration=everything[picked],
    )


def measure_variant(
    ctx: RunContext, candidate: compress.OnnxModel, split: FrozenSplit, out_dir: Path
) -> dict[str, float]:
    """The loop's own evaluation (classification, retrieval, latency) of one variant."""
    result = evaluation.evaluate_model(
        candidate,
        split.images,
        split.labels,
        split.ids,
        split.catalogue_emb,
        split.catalogue_labels,
        ctx.params.data.categories,
        ctx.params.evaluation,
        out_dir,
    )
    return result.metrics


def wanted_variants(ctx: RunContext) -> list[str]:
    """registry.variants, plus the served one if params ask to serve another."""
    wanted = list(ctx.params.registry.variants)
    if ctx.params.serving.variant != "fp32":
        wanted.append(ctx.params.serving.variant)
    return list(dict.fromkeys(wanted))


def judge_variant(
    ctx: RunContext,
    model: VitrineNet,
    variant: str,
    split: FrozenSplit,
    folder: Path,
    fp32: dict[str, float],
) -> dict:
    """Build, measure and gate one variant; a failure to build it is a refusal, not a crash."""
    try:
        path = compress.build_variant(model, variant, folder, split.calibration)
        meta, segmenter = compress.model_meta(model), getattr(model, "segmenter", None)
        candidate = compress.OnnxModel(path, variant, meta, segmenter=segmenter)
        metrics = measure_variant(ctx, candidate, split, ctx.stage_dir("compress") / variant)
    except Exception as error:  # a broken exporter must not block registering the fp32 model
        reason = f"refused: building or measuring {variant} failed: {type(error).__name__}: {error}"
        return {"passed": False, "reason": reason[:480], "metrics": {}}
    metrics["size_bytes"] = float(path.stat().st_size)
    passed, reason = gate.check_compression(
        variant, fp32, metrics, ctx.params.gate.max_compression_loss
    )
    return {"passed": passed, "reason": reason, "metrics": metrics}


def run(ctx: RunContext, model: VitrineNet) -> dict:
    """{"folder": the accepted variants' folder or None, "verdicts", "tags", "metrics"}."""
    wanted = wanted_variants(ctx)
    out = {"folder": None, "verdicts": {}, "tags": {}, "metrics": {}}
    if not wanted:
        return out
    folder = ctx.stage_dir("compress") / compress.ARTIFACT_DIR
    shutil.rmtree(folder, ignore_errors=True)  # a re-run rebuilds from this run's weights
    fp32 = read_json(ctx.work / "evaluate" / "metrics.json")
    split = load_frozen_split(ctx, model, ctx.params.registry.calibration_images)
    verdicts = {v: judge_variant(ctx, model, v, split, folder, fp32) for v in wanted}
    for variant, verdict in verdicts.items():
        if not verdict["passed"]:
            (folder / compress.FILES[variant]).unlink(missing_ok=True)
        out["tags"][compress.variant_tag(variant)] = verdict["reason"]
        for name in ("accuracy", "recall_at_1", "latency_ms", "latency_ms_batch", "size_bytes"):
            if name in verdict["metrics"]:
                out["metrics"][f"{variant}_{name}"] = float(verdict["metrics"][name])
    onnx_accepted = verdicts.get("onnx", {}).get("passed", False)
    if not onnx_accepted:  # only int8's starting point: not a variant of its own
        (folder / compress.FILES["onnx"]).unlink(missing_ok=True)
    out["verdicts"] = {
        v: {"passed": d["passed"], "reason": d["reason"]} for v, d in verdicts.items()
    }
    if any(d["passed"] for d in verdicts.values()):
        compress.write_meta(folder, model, out["verdicts"])
        out["folder"] = folder
    write_json(
        {k: v for k, v in out.items() if k != "folder"},
        ctx.stage_dir("compress") / "compression.json",
    )
    return out
