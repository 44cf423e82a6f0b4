"""The detector's parts (components/model/detector.py): letterboxing, training targets, the
decoding of its heads back to boxes, and a loss that training can drive down."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from components.model import detector as D


def test_letterbox_scales_the_longer_side_and_pads():
    photo = Image.new("RGB", (400, 300), (200, 10, 10))
    image, scale = D.letterbox(photo, 200)
    assert image.shape == (200, 200, 3) and scale == pytest.approx(0.5)
    assert (image[:150, :, 0] == 200).all() and (image[150:] == 0).all()


def heads_from_targets(boxes: np.ndarray, side: int):
    """The outputs a perfect network would give for `boxes`: logits peaking exactly at the
    centres, the target sizes and offsets."""
    heat, size, offset, centre = D.targets(boxes, side)
    logits = np.where(centre, 10.0, np.log(heat * 0.5 + 1e-6) - np.log1p(-heat * 0.5))
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None]  # noqa: E731
    return as_tensor(logits[None]), as_tensor(size), as_tensor(offset)


def test_perfect_heads_decode_to_the_boxes_they_were_made_from():
    boxes = np.array([[10, 20, 60, 90], [100, 30, 150, 70], [40, 120, 180, 180]], np.float32)
    outputs = heads_from_targets(boxes, 192)
    found = D.decode(outputs, scale=1.0, photo_size=(192, 192), min_score=0.9)
    assert len(found) == 3
    got = sorted(tuple(np.round(b.box, 3)) for b in found)
    assert got == sorted(tuple(float(v) for v in b) for b in boxes)


def test_decoded_boxes_are_in_the_photos_pixels():
    boxes = np.array([[20, 20, 80, 60]], np.float32)  # in the letterboxed input (scale 0.5)
    outputs = heads_from_targets(boxes, 192)
    (found,) = D.decode(outputs, scale=0.5, photo_size=(384, 200), min_score=0.9)
    assert found.box == pytest.approx((40, 40, 160, 120))


def test_training_drives_the_loss_down_on_a_few_scenes():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = np.zeros((4, 64, 64, 3), np.uint8)
    boxes = []
    for i in range(4):
        x, y = rng.integers(0, 40, 2)
        images[i, y : y + 20, x : x + 16] = 220
        boxes.append(np.array([[x, y, x + 16, y + 20]]))
    heat, size, offset, centre = (
        torch.from_numpy(np.stack(parts))
        for parts in zip(*(D.targets(b, 64) for b in boxes), strict=True)
    )
    net = D.TinyDetector((8, 16, 32))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    x = D.to_batch(images)
    losses = []
    for _ in range(60):
        value = D.loss(net(x), heat, size, offset, centre)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        losses.append(float(value.detach()))
    assert losses[-1] < 0.3 * losses[0]
