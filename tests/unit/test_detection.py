"""Products in a busy photo (components/model/detection.py, detector_training.py): crops,
per-item classification, the classical baseline, and mirrored training targets."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import TrainParams
from components.model import detector as det
from components.model.detection import (
    Item,
    classify_boxes,
    crop,
    evaluate_detection,
    item_stats,
    largest,
    propose_components,
)
from components.model.detection_metrics import box_iou
from components.model.detector_training import (
    DetectorSettings,
    flipped,
    train_detector,
)
from components.model.models import build_model
from components.model.scenes import compose_scene, compose_scenes


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


def pixels(photo: Image.Image) -> str:
    return hashlib.sha256(photo.convert("RGB").tobytes()).hexdigest()


class OracleDetector(det.Detector):
    """A detector that returns given boxes: evaluate_detection's bookkeeping is tested apart
    from how good a trained detector is."""

    def __init__(self, answers: dict[int, list]):
        super().__init__(det.TinyDetector((4, 4, 4)), side=64)
        self.answers = answers

    def detect(self, photo, top_k=20):
        return self.answers[pixels(photo)]


def test_evaluating_perfect_boxes_scores_them_perfect_and_classifies_each_item(fmnist):
    images = [Image.fromarray(fmnist["test"][0][i]) for i in range(12)]
    labels = [int(c) for c in fmnist["test"][1][:12]]
    scenes = compose_scenes(images, labels, 4, seed=3, items=(2, 3), size=(256, 192))
    answers = {
        pixels(s.photo): [det.Box(tuple(map(float, b)), 0.9) for b in s.boxes] for s in scenes
    }
    torch.manual_seed(0)
    model = build_model(TrainParams(embedding_dim=16, cnn_widths=[8, 8, 8]), 10).eval()
    items = sum(len(s.boxes) for s in scenes)
    catalogue = np.eye(16, dtype=np.float32)[:10]  # one unit vector per category
    result = evaluate_detection(OracleDetector(answers), model, scenes, catalogue, np.arange(10))
    m = result.metrics
    assert m["detect_map50"] == pytest.approx(1.0) and m["detect_map50_95"] == pytest.approx(1.0)
    assert m["detect_item_found"] == 1.0 and m["detect_items_per_scene"] == items / 4
    # an untrained classifier: its accuracy and Recall@1 are what it says of each item's crop
    truth = [int(c) for s in scenes for c in s.labels]
    by_box = {item.box: item for found in result.items for item in found}  # (sorted by score)
    said = [by_box[tuple(map(float, b))] for s in scenes for b in s.boxes]
    assert m["detect_item_accuracy"] == pytest.approx(
        np.mean([item.category == t for item, t in zip(said, truth, strict=True)])
    )
    nearest = [int(np.argmax(item.embedding[:10])) for item in said]  # unit vector per category
    assert m["detect_item_recall_at_1"] == pytest.approx(np.mean(np.equal(nearest, truth)))


def test_evaluating_no_boxes_finds_no_item():
    scenes = compose_scenes([_square()], [1], 2, seed=0)
    answers = {pixels(s.photo): [] for s in scenes}
    torch.manual_seed(0)
    model = build_model(TrainParams(embedding_dim=16, cnn_widths=[8, 8, 8]), 10).eval()
    result = evaluate_detection(
        OracleDetector(answers), model, scenes, np.eye(16, dtype=np.float32)[:10], np.arange(10)
    )
    assert result.metrics["detect_map50"] == 0.0 and result.metrics["detect_item_found"] == 0.0


def _square() -> Image.Image:
    image = Image.new("L", (28, 28), 0)
    image.paste(200, (6, 6, 22, 22))
    return image


def test_the_largest_item_and_what_the_request_log_keeps_of_a_detection():
    emb = np.zeros(4, np.float32)
    small = Item((0, 0, 10, 10), 0.9, 1, 0.9, emb)
    large = Item((50, 0, 100, 50), 0.5, 2, 0.6, emb)
    assert largest([small, large]) is large
    # 100 + 2,500 px of a 100 x 100 photo; overlaps count once
    assert item_stats([small, large], (100, 100)) == {"items": 2, "item_area": 0.26}
    assert (
        item_stats([small, Item((0, 0, 5, 5), 0.1, 1, 0.1, emb)], (100, 100))["item_area"] == 0.01
    )
    assert item_stats([], (640, 480)) == {"items": 0, "item_area": 0.0}
    # a large photo is counted on a reduced grid: the same share
    assert item_stats([Item((0, 0, 2000, 1000), 1, 0, 1, emb)], (4000, 2000))["item_area"] == 0.25


def test_a_detector_saved_and_loaded_is_the_same_detector(tmp_path):
    torch.manual_seed(0)
    one = det.Detector(det.TinyDetector((8, 16, 32)), side=96, min_score=0.4)
    again = det.Detector.load(one.save(tmp_path / "detector.pt"))
    assert (again.side, again.min_score, again.digest) == (96, 0.4, one.digest)
    photo = Image.new("RGB", (120, 80), (30, 60, 90))
    x = det.to_batch(det.letterbox(photo, 96)[0][None])
    for a, b in zip(one.net(x), again.net(x), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    assert det.Detector(det.TinyDetector((8, 16, 32)), side=96).digest != one.digest
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="detector format"):
        det.Detector.load(tmp_path / "other.pt")


def test_a_version_without_detector_answers_detect_with_a_409():
    from bentos.http import ApiError
    from bentos.loader import Bundle
    from bentos.predictor import Predictor
    from components.serving.uploads import UploadLimits

    model = build_model(TrainParams(embedding_dim=16, cnn_widths=[8, 8, 8]), 10).eval()
    bundle = Bundle("7", model, None, "now", 0.0, torch_model=model)
    predictor = Predictor([str(i) for i in range(10)], UploadLimits(1 << 20, 1 << 22), 4, 4)
    try:
        with pytest.raises(ApiError) as refused:
            predictor.detect(bundle, b"not read", "image/png", 10, 0.5)
        assert refused.value.status == 409 and "version 7 has no detector" in refused.value.message
    finally:
        predictor.close()
