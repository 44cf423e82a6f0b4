"""The retrain loop's stages as plain functions over one run folder.

Each `run_*` function reads what the previous stage wrote into `ctx.work` and writes its
own outputs there, so the Prefect flow (flows/retrain.py) and `dvc repro` (dvc.yaml, via
`vitrine stage …`) execute exactly the same code. Nothing here imports prefect or mlflow.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from components import catalogue, evaluation, labels, training, validation, versioning
from components.config import PROJECT_ROOT, Params, StatePaths
from components.models import VitrineNet
from components.transforms import load_uint8

LABEL_MODEL_SIZE = 28  # the cheap label-cleaning model works on small grayscale thumbnails


@dataclass
class RunContext:
    params: Params
    paths: StatePaths
    work: Path  # this run's folder: one sub-folder per stage
    repo: Path = PROJECT_ROOT

    @property
    def catalogue_dir(self) -> Path:
        path = Path(self.params.data.catalogue_dir)
        return path if path.is_absolute() else self.repo / path

    def stage_dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def channels(self) -> int:
        return 1 if self.params.train.backbone == "cnn" else 3


def write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_images(
    ctx: RunContext,
    manifest: pd.DataFrame,
    model: VitrineNet | None = None,
    size: int | None = None,
    channels: int | None = None,
) -> np.ndarray:
    """Decode manifest rows through the shared preprocessing at the model's input size (or the
    given / configured one); cached on disk by content and size."""
    size = size or (model.image_size if model is not None else ctx.params.train.image_size)
    channels = channels or (model.in_channels if model is not None else ctx.channels)
    key = hashlib.sha256("".join(manifest["sha256"]).encode()).hexdigest()[:16]
    cache = ctx.paths.home / "cache" / f"images-{key}-{size}-{channels}.npy"
    if cache.exists():
        return np.load(cache)
    paths = [ctx.catalogue_dir / p for p in manifest["path"]]
    arrays = [
        load_uint8(p, size, channels) for p in tqdm(paths, desc="decode", unit="img", mininterval=2)
    ]
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, channels), np.uint8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, images)
    return images


def run_ingest(ctx: RunContext, source: str | None = None) -> dict:
    """Ingest the catalogue source into data/catalogue and version it with DVC."""
    data = ctx.params.data
    fmnist = Path(data.fashion_mnist_dir)
    unpacked = (
        ctx.paths.home / "debian" / fmnist.relative_to(fmnist.anchor)
    )  # `make dataset` w/o root
    if not fmnist.exists() and unpacked.exists():
        fmnist = unpacked
    manifest = catalogue.ingest_catalogue(
        source or data.source,
        ctx.catalogue_dir,
        data.categories,
        fashion_mnist_dir=fmnist,
        test_fraction=data.test_fraction,
    )
    version = versioning.track_data(ctx.repo, ctx.paths.dvc_remote)
    from components import refresh  # which source, in which state: scheduled retrains re-check it

    source = source or data.source
    source = source if source == "fashion-mnist" else str(Path(source).resolve())
    refresh.record_source(
        ctx.paths, ctx.catalogue_dir, source, refresh.source_fingerprint(source, fmnist)
    )
    return {"ingested": len(manifest), "data_version": version}


def run_validation(ctx: RunContext) -> dict:
    """Validate the (sliced) catalogue; quarantine failing rows; stop if too many fail."""
    params = ctx.params
    manifest = catalogue.read_manifest(ctx.catalogue_dir)
    manifest = catalogue.stratified_slice(manifest, params.data.limit, params.data.seed)
    out = ctx.stage_dir("validate")
    result = validation.validate_catalogue(
        manifest, ctx.catalogue_dir, params.data.categories, params.validation, out / "docs"
    )
    validation.write_validation_outputs(result, out)
    validation.check_quarantine_share(result, params.validation.max_quarantine_share)
    return result.report


def run_label_cleaning(ctx: RunContext) -> dict:
    """Out-of-fold probabilities → cleanlab issues → the policy (drop / relabel / keep)."""
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


def run_training(ctx: RunContext) -> dict:
    """Train on the cleaned training rows; checkpoints make a re-run resume after a crash."""
    train = pd.read_parquet(ctx.work / "labels" / "train_manifest.parquet")
    images = load_images(ctx, train)
    result = training.train_model(
        images,
        train["label"].to_numpy(),
        ctx.params.train,
        num_classes=len(ctx.params.data.categories),
        checkpoint_dir=ctx.paths.home / "checkpoints",
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


def load_trained_model(ctx: RunContext) -> VitrineNet:
    return torch.load(ctx.work / "train" / "model.pt", weights_only=False).eval()


def build_index(ctx: RunContext, model: VitrineNet, products: pd.DataFrame) -> Path:
    """Embed every accepted product with THIS model: the search index registered beside it."""
    out = ctx.stage_dir("evaluate") / "index"
    out.mkdir(exist_ok=True)
    _, emb = training.predict_batches(model, load_images(ctx, products, model))
    np.save(out / "embeddings.npy", emb.astype(np.float32))
    cols = ["product_id", "label", "category", "title", "path", "split"]
    products[cols].reset_index(drop=True).to_parquet(out / "products.parquet", index=False)
    return out


def run_evaluation(ctx: RunContext) -> dict:
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
    registered beside the model and its index (components/reference.py)."""
    from components import reference

    rows = reference.build_reference(model, test, ctx.catalogue_dir, ctx.params.data.categories)
    out = ctx.stage_dir("evaluate") / reference.REFERENCE_ARTIFACT
    return reference.write_reference(rows, out)


def build_text_projection(
    ctx: RunContext, products: pd.DataFrame, emb: np.ndarray, index_dir: Path
) -> dict[str, float]:
    """Fit the image → MiniLM-text projection on the catalogue's (train split) products and save
    it beside the index; precision@10 of held-out phrasings over the whole index is the metric."""
    from components import textsearch  # the sentence model loads only when text search is on

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


def data_version(ctx: RunContext) -> str:
    """DVC's md5 of data/ when the catalogue is the DVC-tracked one, else a manifest digest."""
    tracked = ctx.repo / "data"
    if ctx.catalogue_dir.resolve().is_relative_to(tracked.resolve()):
        version = versioning.read_data_version(ctx.repo)
        if version:
            return version
    manifest = catalogue.read_manifest(ctx.catalogue_dir)
    digest = hashlib.sha256("".join(sorted(manifest["sha256"])).encode()).hexdigest()
    return f"manifest-{digest[:16]}"


def git_commit(repo: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"
