"""Scenes composed from the catalogue: photos of several products at once, with each product's
box and category known by construction (what a detector learns from and is measured on).

A scene is 1-5 catalogue products (components/model/shopper.py's layers: the product's real
look, as-is, dyed one colour or colour-mapped) pasted at varied scales and positions on a
varied background (plain light or dark, a gradient, a texture, noise, clutter), later ones
partly over earlier ones. Every product keeps at least `min_visible` of its silhouette in
view: a placement hiding more of an earlier product is drawn again. An item's box is the
tight box of its visible pixels, [x0, y0, x1, y1) in the scene's pixels.

Scenes are seeded per (seed, scene index), like the shopper-style photos: training scenes
are built from training rows only and evaluation scenes from the frozen test split only (the
caller passes the rows).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from components.model import shopper

BACKGROUNDS = ("plain_light", "plain_dark", "gradient", "texture", "noise", "clutter")
LOOKS = shopper.LOOKS
MAX_TRIES = 20  # placements drawn per item before the scene keeps fewer items


@dataclass(frozen=True)
class Scene:
    photo: Image.Image  # RGB, width x height
    boxes: np.ndarray  # items x 4 int: [x0, y0, x1, y1) of each item's visible pixels
    labels: np.ndarray  # items: the category index of each item
    rows: np.ndarray  # items: which of the given catalogue rows each item is
    masks: np.ndarray  # items x H x W bool: each item's visible pixels
    visible: np.ndarray  # items: the share of each item's silhouette in view
    background: str


def background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A scene's background, H x W x 3 float 0-255."""
    if kind == "plain_light":
        return np.tile(shopper._light_colour(rng), (height, width, 1))
    if kind == "plain_dark":
        return np.tile(rng.uniform(10, 70, 3), (height, width, 1))
    if kind == "gradient":
        top, bottom = rng.uniform(20, 250, 3), rng.uniform(20, 250, 3)
        t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
        return np.broadcast_to(top + t * (bottom - top), (height, width, 3)).copy()
    if kind == "texture":
        return shopper.texture(height, width, rng)
    if kind == "noise":
        base = rng.uniform(60, 200)
        return np.clip(base + rng.normal(0, rng.uniform(10, 40), (height, width, 3)), 0, 255)
    if kind == "clutter":
        return shopper.clutter(height, width, rng)
    raise ValueError(f"unknown background {kind!r}: choose from {', '.join(BACKGROUNDS)}")


def compose_scene(
    images: list[Image.Image],
    labels: list[int],
    rng: np.random.Generator,
    size: tuple[int, int] = (512, 384),
    min_visible: float = 0.6,
    scale: tuple[float, float] = (0.18, 0.5),
    backgrounds: tuple[str, ...] = BACKGROUNDS,
) -> Scene:
    """One scene of `images` (their categories `labels`), width x height `size`; each product's
    longer side a `scale` share of the scene's shorter side."""
    width, height = size
    kind = backgrounds[int(rng.integers(len(backgrounds)))]
    canvas = background(kind, height, width, rng)
    owner = np.full((height, width), -1, np.int16)  # which item each pixel shows
    silhouettes: list[int] = []  # each kept item's full silhouette area
    kept: list[int] = []
    for i, image in enumerate(images):
        appearance, alpha = shopper.product_layers(image)
        if alpha.sum() == 0:
            continue
        look = shopper.recolour(appearance, LOOKS[int(rng.integers(len(LOOKS)))], rng)
        for _ in range(MAX_TRIES):
            side = int(min(width, height) * rng.uniform(*scale))
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            placed = shopper.placed_mask(alpha, (x, y, side), size)
            trial = np.where(placed, len(kept), owner)
            left = [np.count_nonzero(trial == j) / area for j, area in enumerate(silhouettes)]
            if placed.any() and all(share >= min_visible for share in left):
                break
        else:
            continue  # no placement leaves every earlier item visible enough
        canvas = shopper.composite(canvas, look, alpha, (x, y, side))
        owner = trial
        silhouettes.append(int(placed.sum()))
        kept.append(i)
    masks = (
        np.stack([owner == j for j in range(len(kept))])
        if kept
        else np.zeros((0, height, width), bool)
    )
    visible = [m.sum() / area for m, area in zip(masks, silhouettes, strict=True)]
    return Scene(
        photo=shopper._as_image(canvas),
        boxes=np.array([_tight_box(m) for m in masks], dtype=np.int64).reshape(-1, 4),
        labels=np.array([labels[i] for i in kept], dtype=np.int64),
        rows=np.array(kept, dtype=np.int64),
        masks=masks,
        visible=np.array(visible, dtype=np.float64),
        background=kind,
    )


def _tight_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x5CE4E, index])


def compose_scenes(
    images: list[Image.Image],
    labels: list[int],
    n_scenes: int,
    seed: int,
    items: tuple[int, int] = (1, 5),
    **kwargs,
) -> list[Scene]:
    """`n_scenes` scenes, each of `items` (min, max) products drawn without repeats from
    `images` (a split's rows: training rows for training scenes, test rows for evaluation);
    scene i is the same for the same (seed, i) whatever else is asked. Each scene's `rows`
    index into `images`."""
    scenes = []
    for index in range(n_scenes):
        rng = scene_rng(seed, index)
        count = int(rng.integers(items[0], items[1] + 1))
        picks = rng.choice(len(images), size=min(count, len(images)), replace=False)
        scene = compose_scene([images[p] for p in picks], [labels[p] for p in picks], rng, **kwargs)
        scenes.append(replace(scene, rows=picks[scene.rows]))
    return scenes
