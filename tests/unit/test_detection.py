"""Products in a busy photo (components/model/detection.py, detector_training.py): crops,
per-item classification, the classical baseline, and mirrored training targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import TrainParams
from components.model import detector as det
from components.model.detection import classify_boxes, crop, propose_components
from components.model.detection_metrics import box_iou
from components.model.detector_training import (
    DetectorSettings,
    flipped,
    train_detector,
)
from components.model.models import build_model
from components.model.scenes import compose_scene


def test_a_crop_is_the_box_and_its_margin_inside_the_photo():
    photo = Image.new("RGB", (200, 100))
    assert crop(photo, (50, 20, 150, 80), margin=0.1).size == (120, 80)  # 10 px each side
    assert crop(photo, (0, 0, 40, 40), margin=0.5).size == (60, 60)  # clipped at the corner


def test_each_box_is_classified_on_its_crop(fmnist):
    torch.manual_seed(0)
    model = build_model(TrainParams(embedding_dim=16, cnn_widths=[8, 8, 8]), 10).eval()
    photo = Image.new("RGB", (120, 60), (255, 255, 255))
    boxes = [det.Box((0, 0, 60, 60), 0.9), det.Box((60, 0, 120, 60), 0.5)]
    photo.paste(Image.fromarray(255 - fmnist["train"][0][0]).convert("RGB"), (16, 16))
    items = classify_boxes(model, photo, boxes)
    assert [item.box for item in items] == [b.box for b in boxes]
    for item, box in zip(items, boxes, strict=True):
        assert 0 <= item.category < 10 and 0 < item.confidence <= 1
        assert item.score == pytest.approx(box.score * item.confidence)
        assert item.embedding.shape == (16,)
    # the two crops differ (a product and a blank), so do their embeddings
    assert not np.allclose(items[0].embedding, items[1].embedding)


def test_the_baseline_finds_products_on_a_plain_background_not_on_clutter(fmnist):
    images = [Image.fromarray(fmnist["train"][0][i]) for i in range(3)]
    found = {}
    for kind in ("plain_light", "clutter"):
        rng = np.random.default_rng(5)
        scene = compose_scene(images, [0, 1, 2], rng, min_visible=0.99, backgrounds=(kind,))
        boxes = np.array([b.box for b in propose_components(scene.photo)]).reshape(-1, 4)
        best = box_iou(scene.boxes, boxes).max(axis=1) if len(boxes) else np.zeros(3)
        found[kind] = int((best >= 0.5).sum()), len(scene.boxes)
    assert found["plain_light"][0] == found["plain_light"][1]  # every product
    assert found["clutter"][0] < found["clutter"][1]  # the clutter merges with them


def test_mirrored_targets_are_the_targets_of_the_mirrored_boxes():
    side = 64
    boxes = np.array([[5.5, 10.2, 25.1, 30.7], [40.3, 33.3, 61.9, 50.5]], np.float32)
    mirrored = boxes.copy()
    mirrored[:, [0, 2]] = side - boxes[:, [2, 0]]
    as_batch = lambda parts: [torch.from_numpy(p)[None] for p in parts]  # noqa: E731
    x = torch.arange(side, dtype=torch.float32).expand(1, 3, side, side)
    x_flip, got = flipped(x, as_batch(det.targets(boxes, side)))
    want = as_batch(det.targets(mirrored, side))
    assert torch.equal(x_flip[0, 0, 0], torch.arange(side - 1, -1, -1, dtype=torch.float32))
    assert torch.equal(got[3], want[3])  # the same centre cells
    centre = want[3][0]
    for g, w in zip(got[1:3], want[1:3], strict=True):
        assert torch.allclose(g[0][:, centre], w[0][:, centre], atol=1e-5)
    assert torch.allclose(got[0], want[0], atol=1e-5)


def test_a_detector_trains_within_its_step_limit(fmnist):
    images = [Image.fromarray(fmnist["train"][0][i]) for i in range(20)]
    settings = DetectorSettings(budget_seconds=60, max_steps=3, scenes=8, side=64, batch_size=4)
    trained, summary = train_detector(images, [0] * 20, settings, seed=1)
    assert summary["steps"] == 3 and summary["final_loss"] > 0
    assert trained.side == 64 and not trained.net.training
    assert isinstance(trained.detect(Image.new("RGB", (90, 60))), list)
