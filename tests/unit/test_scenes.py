"""Scenes composed from the catalogue (components/model/scenes.py): boxes and categories right
by construction, seeded, built only from the rows given."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from components.model.scenes import BACKGROUNDS, compose_scene, compose_scenes


@pytest.fixture(scope="module")
def products(fmnist):
    images, labels = fmnist["train"]
    return [Image.fromarray(images[i]) for i in range(60)], [int(v) for v in labels[:60]]


def test_scenes_are_seeded_and_use_only_the_rows_given(products):
    images, labels = products
    first = compose_scenes(images, labels, 6, seed=3)
    again = compose_scenes(images, labels, 6, seed=3)
    other = compose_scenes(images, labels, 6, seed=4)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(np.asarray(a.photo), np.asarray(b.photo))
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.rows, b.rows)
    assert any(not np.array_equal(a.boxes, b.boxes) for a, b in zip(first, other, strict=True))
    for scene in first:
        assert 1 <= len(scene.rows) <= 5 and len(set(scene.rows)) == len(scene.rows)
        assert scene.labels.tolist() == [labels[r] for r in scene.rows]


@pytest.mark.parametrize("seed", range(8))
def test_each_box_is_the_tight_box_of_its_visible_product(products, seed):
    images, labels = products
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), 5, replace=False)
    scene = compose_scene(
        [images[p] for p in picks], [labels[p] for p in picks], rng, backgrounds=("plain_light",)
    )
    photo = np.asarray(scene.photo).astype(np.int16)
    assert len(scene.boxes) >= 2  # 5 products at most half the short side fit with overlap
    for box, mask, share in zip(scene.boxes, scene.masks, scene.visible, strict=True):
        ys, xs = np.nonzero(mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert 0 <= box[0] < box[2] <= 512 and 0 <= box[1] < box[3] <= 384
        assert share >= 0.6  # partly covered at most
    # on a plain background every pixel away from the products is the background's colour,
    # and the products are what differs from it (a 28 px product is scaled up to 7x: its
    # blended edge, under half the product, reaches a few pixels past its mask)
    near = ndimage.binary_dilation(scene.masks.any(axis=0), iterations=8)
    colour = np.median(photo[~near], axis=0)
    assert np.abs(photo[~near] - colour).max() <= 1
    for mask in scene.masks:
        assert np.abs(photo[mask] - colour).sum(axis=1).mean() > 20


def test_every_background_kind_renders(products):
    images, labels = products
    for kind in BACKGROUNDS:
        rng = np.random.default_rng(0)
        scene = compose_scene(images[:3], labels[:3], rng, size=(160, 120), backgrounds=(kind,))
        assert scene.background == kind and scene.photo.size == (160, 120)
        assert scene.photo.mode == "RGB" and len(scene.boxes) >= 1
