"""The drift reference of a model version: what its evaluation (test) images look like to it.

Registered beside the model and its index (artifact `reference/reference.parquet`), one row per
test image with the same fields the service's request log writes for a request: predicted
category, confidence, image statistics (components.serving.compute_image_stats, the function
the service calls) and the embedding. Monitoring compares the request log with these rows, so
both sides must be produced by the same preprocessing, model and statistics code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components.model.training import predict_batches
from components.model.transforms import model_input
from components.serving.uploads import compute_image_stats

REFERENCE_ARTIFACT = "reference"  # artifact folder of the registered version
REFERENCE_FILE = "reference.parquet"
DETECT_REFERENCE_FILE = "detect_reference.parquet"  # items, item_area per held-out scene
STAT_COLUMNS = ("width", "height", "aspect", "brightness", "contrast")
CHUNK = 1024  # images decoded and embedded at a time (bounded memory on a big test split)


def describe_images(
    model, images: list[Image.Image], categories: list[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Request-log fields for decoded images: (category, confidence, stats…) and embeddings.

    Preprocessing (transforms.model_input: the model's size, channels and preprocessing), softmax confidence and
    compute_image_stats are exactly what bentos/service.py does for a request.
    """
    pixels = [model_input(image, model) for image in images]
    stats = [compute_image_stats(image, px) for image, px in zip(images, pixels, strict=True)]
    probs, emb = predict_batches(model, np.stack(pixels))
    best = probs.argmax(axis=1)
    rows = pd.DataFrame(stats, columns=list(STAT_COLUMNS))
    rows.insert(0, "category", [categories[i] for i in best])
    rows.insert(1, "confidence", probs[np.arange(len(best)), best].astype(float).round(6))
    return rows, emb.astype(np.float32)


def build_reference(
    model, test: pd.DataFrame, catalogue_dir: Path, categories: list[str]
) -> pd.DataFrame:
    """One row per test product: product_id, its true category, and the request-log fields."""
    frames = []
    for start in range(0, len(test), CHUNK):
        chunk = test.iloc[start : start + CHUNK]
        images = []
        for rel in chunk["path"]:
            with Image.open(Path(catalogue_dir) / rel) as image:
                image.load()
                images.append(image.copy())
        rows, emb = describe_images(model, images, categories)
        rows.insert(0, "product_id", chunk["product_id"].to_numpy())
        rows.insert(1, "true_category", chunk["category"].to_numpy())
        rows["embedding"] = list(emb)
        frames.append(rows)
    if not frames:
        raise ValueError("no test images: the drift reference needs the evaluation split")
    return pd.concat(frames, ignore_index=True)


def write_reference(reference: pd.DataFrame, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REFERENCE_FILE
    reference.to_parquet(path, index=False)
    return path


def read_reference(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(the rows without embeddings, embeddings N×D float32)."""
    frame = pd.read_parquet(path)
    emb = np.stack(frame.pop("embedding").to_numpy()).astype(np.float32)
    return frame, emb
