"""What every stage shares: the run context (params, state paths, the run folder), JSON helpers,
the cached image decode through the shared preprocessing, and the data version."""

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

from components.config import PROJECT_ROOT, Params, StatePaths
from components.data import catalogue, versioning
from components.model.models import VitrineNet
from components.model.segmenter import Segmenter, segmenter_of
from components.model.transforms import load_uint8


@dataclass
class RunContext:
    params: Params
    paths: StatePaths
    work: Path  # this run's folder: one sub-folder per stage
    repo: Path = PROJECT_ROOT

    @property
    def catalogue_dir(self) -> Path:
        return self.params.data.catalogue_path(self.repo)

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
    canonical: bool | None = None,
    segmenter: Segmenter | None = None,
) -> np.ndarray:
    """Decode manifest rows through the shared preprocessing at the model's input size, channels
    and preprocessing (or the given / configured ones), canonical with the model's learned
    segmenter (or `segmenter`) where there is one; cached on disk by content and all four."""
    size = size or (model.image_size if model is not None else ctx.params.train.image_size)
    channels = channels or (model.in_channels if model is not None else ctx.channels)
    if canonical is None:
        mode = getattr(model, "preprocess", "plain") if model else ctx.params.train.preprocess
        canonical = mode == "canonical"
    segmenter = (segmenter or segmenter_of(model)) if canonical else None
    key = hashlib.sha256("".join(manifest["sha256"]).encode()).hexdigest()[:16]
    suffix = ("-canonical" if canonical else "") + (f"-seg{segmenter.digest}" if segmenter else "")
    cache = ctx.paths.home / "cache" / f"images-{key}-{size}-{channels}{suffix}.npy"
    if cache.exists():
        return np.load(cache)
    paths = [ctx.catalogue_dir / p for p in manifest["path"]]
    arrays = [
        load_uint8(p, size, channels, canonical, segmenter)
        for p in tqdm(paths, desc="decode", unit="img", mininterval=2)
    ]
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, channels), np.uint8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, images)
    return images


def load_views(
    ctx: RunContext, manifest: pd.DataFrame, segmenter: Segmenter | None = None
) -> np.ndarray | None:
    """One shopper-style rendering per manifest row as the configured model takes it
    (components/model/shopper.py; canonical with `segmenter` where given), for training's
    augmentation; None when params.train.shopper_share is 0. Cached on disk like
    load_images."""
    from components.model import shopper

    train = ctx.params.train
    if train.shopper_share <= 0:
        return None
    weights = json.dumps(train.shopper_weights, sort_keys=True)
    key = hashlib.sha256(("".join(manifest["sha256"]) + weights).encode()).hexdigest()[:16]
    canonical = train.preprocess == "canonical"
    segmenter = segmenter if canonical else None
    seg = f"-seg{segmenter.digest}" if segmenter else ""
    name = f"views-{key}-{train.image_size}-{ctx.channels}-{train.preprocess}{seg}-{train.seed}.npy"
    cache = ctx.paths.home / "cache" / name
    if cache.exists():
        return np.load(cache)
    views = shopper.render_views(
        [str(ctx.catalogue_dir / p) for p in manifest["path"]],
        seed=train.seed,
        size=train.image_size,
        channels=ctx.channels,
        canonical=canonical,
        weights=train.shopper_weights,
        segment=segmenter,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, views)
    return views


def load_trained_model(ctx: RunContext) -> VitrineNet:
    """This run's classifier with its detector (components/stages/detect.py) when it has one."""
    from components.stages import detect

    model = torch.load(ctx.work / "train" / "model.pt", weights_only=False).eval()
    return detect.attach(ctx, model)


def dvc_tracked(ctx: RunContext) -> bool:
    """Whether the catalogue lives in the repository's DVC-tracked data/ folder (the default);
    a catalogue elsewhere (another folder on a worker host, a test's) is versioned by its
    manifest instead."""
    return ctx.catalogue_dir.resolve().is_relative_to((ctx.repo / "data").resolve())


def data_version(ctx: RunContext) -> str:
    """DVC's md5 of data/ when the catalogue is the DVC-tracked one, else a manifest digest."""
    if dvc_tracked(ctx):
        version = versioning.read_data_version(ctx.repo)
        if version:
            return version
    manifest = catalogue.read_manifest(ctx.catalogue_dir)
    digest = hashlib.sha256("".join(sorted(manifest["sha256"])).encode()).hexdigest()
    return f"manifest-{digest[:16]}"


def git_commit(repo: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"
