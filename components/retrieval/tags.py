"""Tags derived from a category and a photo: the category's group, the product's shade and its
named colours (`colours_of`, also stored per product in the catalogue index)."""

from __future__ import annotations

import numpy as np

from components.retrieval.colours import FOREGROUND_DELTA, colours_of

__all__ = ["colours_of", "group_of", "shade_of", "tag_answer"]

GROUPS: dict[str, str] = {
    "T-shirt/top": "tops",
    "Shirt": "tops",
    "Pullover": "tops",
    "Trouser": "bottoms",
    "Dress": "dresses",
    "Coat": "outerwear",
    "Sandal": "footwear",
    "Sneaker": "footwear",
    "Ankle boot": "footwear",
    "Bag": "bags",
}
OTHER_GROUP = "other"
# shade_of: mean foreground luminance (0..1) below DARK_MAX is "dark", above LIGHT_MIN "light".
DARK_MAX, LIGHT_MIN = 0.35, 0.65


def group_of(category: str) -> str:
    return GROUPS.get(category, OTHER_GROUP)


def shade_of(image: np.ndarray) -> tuple[str, float]:
    """("dark" | "mid" | "light", mean brightness 0..1) of the product's pixels.

    Luminance is 0.299 R + 0.587 G + 0.114 B (grey images as they are). The foreground is every
    pixel whose luminance differs from the border colour (median of the outermost pixels) by more
    than FOREGROUND_DELTA, and is not fully transparent; Fashion-MNIST products are light on black,
    so the black background must not darken them. With under 1% foreground pixels the whole image
    is used. Thresholds: brightness < 0.35 dark, > 0.65 light, otherwise mid.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    opaque = np.ones(img.shape[:2], dtype=bool)
    if img.ndim == 3:
        if img.shape[2] == 4:
            opaque = img[:, :, 3] > 0
        rgb = img[:, :, :3].astype(np.float64)
        lum = rgb @ np.array([0.299, 0.587, 0.114])
    else:
        lum = img.astype(np.float64)
    border = np.concatenate([lum[0], lum[-1], lum[:, 0], lum[:, -1]])
    fg = (np.abs(lum - np.median(border)) > FOREGROUND_DELTA) & opaque
    pixels = lum[fg] if fg.sum() >= max(1, 0.01 * lum.size) else lum.ravel()
    brightness = float(pixels.mean() / 255.0)
    shade = "dark" if brightness < DARK_MAX else "light" if brightness > LIGHT_MIN else "mid"
    return shade, brightness


def tag_answer(
    category: str,
    confidence: float,
    probs: np.ndarray,
    categories: list[str],
    pixels: np.ndarray,
    neighbour_categories: list[str],
    colours: list[tuple[str, float]] | None = None,
) -> dict:
    """POST /tags: the photo's category, its group (summed probability of the group's
    categories), its shade, the majority category of its nearest catalogue neighbours, and its
    named colours (`colours_of` of the decoded upload, best first)."""
    majority = (
        max(set(neighbour_categories), key=neighbour_categories.count)
        if neighbour_categories
        else None
    )
    group = group_of(category)
    group_score = sum(
        float(p) for c, p in zip(categories, probs, strict=True) if group_of(c) == group
    )
    shade, brightness = shade_of(pixels)
    n = len(neighbour_categories)
    return {
        "category": {"value": category, "score": round(confidence, 6)},
        "group": {"value": group, "score": round(group_score, 6)},
        "shade": {"value": shade, "score": round(brightness, 4)},
        "neighbours": {
            "value": majority,
            "score": round(neighbour_categories.count(majority) / n, 4) if n else 0.0,
            "agrees": majority == category,
            "k": n,
        },
        "colours": [{"value": name, "score": share} for name, share in colours or []],
    }
