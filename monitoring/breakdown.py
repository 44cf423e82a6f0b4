"""Per-category breakdown of a drift window, its most drifted slice, and pictures of that slice.

The request log keeps no images (issue 3), so the report shows, for the requests of the most
drifted slice that sit farthest from the reference, the catalogue products nearest to their
embeddings in the champion's own index: real images that look like what the service was sent.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

MIN_SLICE_ROWS = 20  # fewer requests (or reference rows) in a category: no embedding shift


def _spread(emb: np.ndarray, centre: np.ndarray) -> float:
    return float(np.sqrt(((emb - centre) ** 2).sum(axis=1).mean())) or 1e-9


def category_breakdown(
    ref_rows: pd.DataFrame, ref_emb: np.ndarray, cur_rows: pd.DataFrame, cur_emb: np.ndarray
) -> pd.DataFrame:
    """One row per predicted category: shares, mean confidence and brightness on both sides,
    and the embedding shift (distance between the category's centroids over the reference
    spread), sorted most drifted first."""
    rows = []
    for cat in sorted(set(ref_rows["category"]) | set(cur_rows["category"])):
        r = (ref_rows["category"] == cat).to_numpy()
        c = (cur_rows["category"] == cat).to_numpy()
        shift = None
        if r.sum() >= MIN_SLICE_ROWS and c.sum() >= MIN_SLICE_ROWS:
            centre = ref_emb[r].mean(axis=0)
            shift = float(
                np.linalg.norm(cur_emb[c].mean(axis=0) - centre) / _spread(ref_emb[r], centre)
            )
        rows.append(
            {
                "category": cat,
                "reference_n": int(r.sum()),
                "current_n": int(c.sum()),
                "reference_share": r.mean(),
                "current_share": c.mean(),
                "share_change": c.mean() - r.mean(),
                "reference_confidence": _mean(ref_rows.loc[r, "confidence"]),
                "current_confidence": _mean(cur_rows.loc[c, "confidence"]),
                "reference_brightness": _mean(ref_rows.loc[r, "brightness"]),
                "current_brightness": _mean(cur_rows.loc[c, "brightness"]),
                "embedding_shift": shift,
            }
        )
    table = pd.DataFrame(rows)
    table["abs_share_change"] = table["share_change"].abs()
    table = table.sort_values(
        ["embedding_shift", "abs_share_change"], ascending=False, na_position="last"
    )
    return table.drop(columns="abs_share_change").reset_index(drop=True)


def _mean(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None


def drifted_requests(
    slice_name: str,
    ref_rows: pd.DataFrame,
    ref_emb: np.ndarray,
    cur_rows: pd.DataFrame,
    cur_emb: np.ndarray,
    k: int,
) -> np.ndarray:
    """Positions of the slice's k requests farthest from the slice's reference centroid."""
    c = np.flatnonzero((cur_rows["category"] == slice_name).to_numpy())
    r = (ref_rows["category"] == slice_name).to_numpy()
    if not len(c) or k <= 0:
        return np.zeros(0, dtype=int)
    centre = ref_emb[r].mean(axis=0) if r.any() else ref_emb.mean(axis=0)
    distance = np.linalg.norm(cur_emb[c] - centre, axis=1)
    return c[np.argsort(-distance)[:k]]


def nearest_products(
    query: np.ndarray, index_emb: np.ndarray, products: pd.DataFrame, catalogue_dir: Path
) -> list[dict]:
    """For each query embedding, the most similar catalogue product (cosine) as a thumbnail."""
    if not len(query):
        return []
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    e = index_emb / np.maximum(np.linalg.norm(index_emb, axis=1, keepdims=True), 1e-12)
    best = (q @ e.T).argmax(axis=1)
    out, seen = [], set()
    for row, j in enumerate(best):
        if int(j) in seen:  # several requests may share a look-alike: show it once
            continue
        seen.add(int(j))
        product = products.iloc[int(j)]
        out.append(
            {
                "product_id": str(product["product_id"]),
                "category": str(product["category"]),
                "similarity": round(float(q[row] @ e[j]), 4),
                "image": _thumbnail(Path(catalogue_dir) / str(product["path"])),
            }
        )
    return out


def _thumbnail(path: Path, size: int = 84) -> str | None:
    """A data: URL of the image scaled for the report, or None if the file is gone."""
    try:
        with Image.open(path) as image:
            image = ImageOps.pad(image.convert("RGB"), (size, size), Image.Resampling.NEAREST)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
