"""Real requests for drift demos, tests and the benchmark: held-out test images, shifted.

Each shift is a plausible change in what shoppers send (over-exposed or dark photos, tilted,
blurred, noisy, tightly cropped), drawn per request with its own random strength. The
`new-category` shift mixes in real images of a category the catalogue does not have:
handwritten digits from scikit-learn's bundled copy of the UCI digits set (1,797 8×8 scans,
shipped inside the scikit-learn wheel, so nothing is downloaded).
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

SHIFTS = ("none", "brightness", "darken", "rotate", "blur", "noise", "crop", "new-category")
NEW_CATEGORY_SHARE = 0.25  # share of `new-category` requests that show the unknown category
DIGIT_SIZE = 28  # digits are scaled to the catalogue's image size: only the content is new


def apply_shift(image: Image.Image, shift: str, rng: np.random.Generator) -> Image.Image:
    """`image` as a shopper's changed photo would show it (a new image; the input is kept)."""
    if shift in ("none", "new-category"):
        return image.copy()
    if shift == "rotate":
        angle = float(rng.choice([-1, 1]) * rng.uniform(8, 20))
        return image.rotate(angle, resample=Image.Resampling.BILINEAR)
    if shift == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.1))))
    if shift == "crop":
        w, h = image.size
        frac = float(rng.uniform(0.75, 0.9))
        cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.float64)
    if shift == "brightness":
        arr = arr * rng.uniform(1.05, 1.25) + rng.uniform(15, 35)
    elif shift == "darken":
        arr = arr * rng.uniform(0.65, 0.85)
    elif shift == "noise":
        arr = arr + rng.normal(0.0, 12.0, arr.shape)
    else:
        raise ValueError(f"unknown shift {shift!r}: choose from {', '.join(SHIFTS)}")
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), image.mode)


@lru_cache(maxsize=1)
def withheld_category_images() -> tuple[Image.Image, ...]:
    """The unknown category: scikit-learn's real handwritten digits, white on black like the
    catalogue's images, scaled to its size."""
    from sklearn.datasets import load_digits

    digits = load_digits().images  # 1797 × 8 × 8, grey levels 0..16
    scaled = np.clip(digits * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return tuple(
        Image.fromarray(d, "L").resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR)
        for d in scaled
    )


def held_out_products(catalogue_dir: Path) -> pd.DataFrame:
    """The catalogue's test split: images the model never trained on."""
    from components.data.catalogue import read_manifest

    manifest = read_manifest(catalogue_dir)
    test = manifest[manifest["split"] == "test"].sort_values("product_id").reset_index(drop=True)
    if test.empty:
        raise ValueError(f"the catalogue at {catalogue_dir} has no test split to draw from")
    return test


def open_images(catalogue_dir: Path, rel_paths: list[str]) -> list[Image.Image]:
    images = []
    for rel in rel_paths:
        with Image.open(Path(catalogue_dir) / rel) as image:
            image.load()
            images.append(image.copy())
    return images


def shifted_images(
    shift: str, sources: list[Image.Image], unknown: list[Image.Image], rng: np.random.Generator
) -> list[Image.Image]:
    """One request image per source: shifted, or (new-category) an unknown-category image for
    a NEW_CATEGORY_SHARE of them, drawn from `unknown` without repeats while it lasts."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}: choose from {', '.join(SHIFTS)}")
    out = []
    order = rng.permutation(len(unknown)) if unknown else np.zeros(0, dtype=int)
    used = 0
    for source in sources:
        if shift == "new-category" and len(order) and rng.random() < NEW_CATEGORY_SHARE:
            out.append(unknown[int(order[used % len(order)])])
            used += 1
        else:
            out.append(apply_shift(source, shift, rng))
    return out


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_requests(shift: str, n: int, catalogue_dir: Path, seed: int = 0) -> list[bytes]:
    """`n` PNG uploads for `vitrine simulate`: held-out test images (each used once while they
    last), shifted."""
    rng = np.random.default_rng(seed)
    test = held_out_products(catalogue_dir)
    picks = rng.choice(len(test), n, replace=n > len(test))
    sources = open_images(catalogue_dir, test["path"].iloc[picks].tolist())
    unknown = list(withheld_category_images()) if shift == "new-category" else []
    return [encode_png(image) for image in shifted_images(shift, sources, unknown, rng)]
