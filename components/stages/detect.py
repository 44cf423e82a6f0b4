"""The detector stage (issue 18, docs/detection.md): after the classifier, a product detector is
trained on scenes composed from the TRAINING rows (components/model/scenes.py) within
params detect.budget_seconds, and saved as detect/detector.pt. `load_trained_model` attaches it
to the classifier (`model.detector`), so the evaluate stage measures the pair and the register
stage pickles them together: one model version, one bundle, never mixed.

Like the segmenter, a finished detector is kept in the checkpoint folder under a digest of the
training rows and the settings: a resumed run does not train it again."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pandas as pd

from components.model import detector as det
from components.model import training
from components.model.detector_training import DetectorSettings, scene_products, train_detector
from components.stages.context import RunContext, write_json
from components.threads import limited_threads

log = logging.getLogger("vitrine.detect")


def detector_file(ctx: RunContext) -> Path:
    return ctx.work / "detect" / det.FILE


def run(ctx: RunContext, fresh: bool = False) -> dict:
    """Train (or resume) the detector of this run; detect/detector.pt and detect_summary.json.
    With detect.enabled false, the run's model carries no detector."""
    out = ctx.stage_dir("detect")
    (out / det.FILE).unlink(missing_ok=True)
    settings = ctx.params.detect
    if not settings.enabled:
        summary = {"skipped": "detect.enabled is false: this version will not detect"}
        write_json(summary, out / "detect_summary.json")
        return summary
    start = time.perf_counter()
    train = pd.read_parquet(ctx.work / "labels" / "train_manifest.parquet")
    digest = hashlib.sha256("".join(train["sha256"]).encode())
    digest.update(settings.model_dump_json().encode())
    saved = ctx.paths.home / "checkpoints" / f"detector-{digest.hexdigest()[:16]}.pt"
    if saved.exists() and not fresh:
        detector = det.Detector.load(saved)
        summary = {"resumed_from": saved.name, "digest": detector.digest}
    else:
        images, labels = scene_products(
            [ctx.catalogue_dir / p for p in train["path"]], train["label"].tolist(), settings.seed
        )
        log.info(
            "training the detector: %d scenes of %d training products, %.0f s",
            settings.scenes,
            len(images),
            settings.budget_seconds,
        )
        with limited_threads(training.count_threads()):
            detector, summary = train_detector(
                images, labels, DetectorSettings.of(settings), settings.seed, log.info
            )
        detector.save(saved)
        summary["digest"] = detector.digest
    detector.save(out / det.FILE)
    summary["stage_seconds"] = round(time.perf_counter() - start, 1)  # what it adds to a run
    write_json(summary, out / "detect_summary.json")
    return summary


def attach(ctx: RunContext, model):
    """`model` with this run's detector (model.detector; None when the run trained none)."""
    path = detector_file(ctx)
    model.detector = det.Detector.load(path) if path.is_file() else None
    return model
