"""components/model/evaluation.py: retrieval by hand, classification metrics, outputs, latency."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.config import EvaluationParams
from components.model.evaluation import (
    classification_metrics,
    evaluate_model,
    measure_latency,
    retrieval_metrics,
    write_evaluation_outputs,
)
from components.model.transforms import to_tensor

CATEGORIES = ["zero", "one", "two"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BrightnessNet(nn.Module):
    """Follows VitrineNet's contract: NCHW float in → (logits, L2-normalised embedding).

    The class is the image's mean brightness band (3 bands), so a test can build images whose
    true class it knows, and a perfect or deliberately wrong classifier.
    """

    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.wrong = wrong
        self.centres = nn.Parameter(torch.tensor([-0.75, 0.0, 0.75]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=(1, 2, 3))
        logits = -20.0 * (mean[:, None] - self.centres[None]).abs()
        if self.wrong:
            logits = logits.roll(1, dims=1)
        return logits, F.normalize(torch.softmax(logits, dim=1) + 1e-3, dim=1)


def band_images(labels: np.ndarray) -> np.ndarray:
    """uint8 N×8×8×1 images whose brightness encodes the label (0: dark, 1: grey, 2: bright)."""
    level = np.array([32, 127, 223], dtype=np.uint8)[labels]
    return np.broadcast_to(level[:, None, None, None], (len(labels), 8, 8, 1)).copy()


def test_retrieval_metrics_match_a_hand_computed_case() -> None:
    # 5 catalogue items on the unit circle; queries rank them by angle.
    angles = np.deg2rad([0, 10, 20, 90, 180])
    cat = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    cat_labels = np.array([0, 1, 0, 1, 2])
    queries = cat[[0, 3, 4]]  # same directions as items 0, 3, 4
    # q0 (0°) ranks 0,1,2,3,4 → labels 0,1,0,1,2; its label 0 → hits at ranks 1 and 3.
    # q1 (90°) ranks 3,2,1,0,4 → labels 1,0,1,0,2 with its label 0 → hits at ranks 2 and 4.
    # q2 (180°) ranks 4,3,2,1,0 → labels 2,1,0,1,0 with label 2 → hit at rank 1 only.
    q_labels = np.array([0, 0, 2])
    got = retrieval_metrics(queries, q_labels, cat, cat_labels, ks=(1, 2, 5))
    assert got["recall_at_1"] == pytest.approx(2 / 3)
    assert got["recall_at_2"] == pytest.approx(1.0)
    assert got["recall_at_5"] == pytest.approx(1.0)
    ap0 = (1 / 1 + 2 / 3) / 2  # two relevant items in the catalogue
    ap1 = (1 / 2 + 2 / 4) / 2
    ap2 = 1.0  # one relevant item
    assert got["map_at_10"] == pytest.approx((ap0 + ap1 + ap2) / 3)


def test_retrieval_metrics_scale_and_chunk_consistently() -> None:
    rng = np.random.default_rng(0)
    cat = F.normalize(torch.from_numpy(rng.normal(size=(3000, 16)).astype(np.float32)), dim=1)
    labels = rng.integers(0, 4, 3000)
    queries = cat[:1500].numpy()
    got = retrieval_metrics(queries, labels[:1500], cat.numpy(), labels, ks=(1, 10))
    # Each query is in the catalogue, so its nearest item is itself: recall@1 and AP's first hit.
    assert got["recall_at_1"] == 1.0
    assert got["map_at_10"] > 0.1
    shuffled = rng.permutation(1500)
    again = retrieval_metrics(queries[shuffled], labels[:1500][shuffled], cat.numpy(), labels)
    assert again["map_at_10"] == pytest.approx(got["map_at_10"])


def test_classification_metrics_perfect_and_imperfect() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[labels] * 0.8 + 0.2 / 3
    metrics, per_class = classification_metrics(labels, perfect, CATEGORIES)
    assert metrics["accuracy"] == metrics["macro_f1"] == metrics["roc_auc_ovr"] == 1.0
    assert per_class["support"].tolist() == [2, 2, 2]
    # one "two" predicted as "one": class one precision 2/3, class two recall 1/2
    probs = perfect.copy()
    probs[5] = [0.1, 0.8, 0.1]
    metrics, per_class = classification_metrics(labels, probs, CATEGORIES)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert per_class.set_index("category").loc["one", "precision"] == pytest.approx(2 / 3)
    assert per_class.set_index("category").loc["two", "recall"] == pytest.approx(0.5)
    f1_two = 2 * 1 * 0.5 / 1.5
    f1_one = 2 * (2 / 3) * 1 / (5 / 3)
    assert metrics["macro_f1"] == pytest.approx((1 + f1_one + f1_two) / 3)


@pytest.fixture()
def test_split() -> tuple[np.ndarray, np.ndarray, list[str]]:
    labels = np.array([2, 0, 1, 1, 0, 2, 2, 0, 1])
    ids = [f"p{i}" for i in (8, 3, 5, 0, 7, 1, 2, 6, 4)]  # deliberately not sorted
    return band_images(labels), labels, ids


def run_evaluation(model, split, tmp_path):
    images, labels, ids = split
    cat_labels = np.array([0, 1, 2] * 4)
    _, cat_emb = model(to_tensor(band_images(cat_labels)))
    params = EvaluationParams(latency_images=4)
    return evaluate_model(
        model, images, labels, ids, cat_emb.numpy(), cat_labels, CATEGORIES, params, tmp_path
    )


def test_evaluate_model_perfect_classifier(test_split, tmp_path) -> None:
    result = run_evaluation(BrightnessNet().eval(), test_split, tmp_path)
    m = result.metrics
    assert m["accuracy"] == m["macro_f1"] == m["recall_at_1"] == m["recall_at_10"] == 1.0
    assert m["n_test"] == 9 and m["n_catalogue"] == 12
    assert m["latency_ms"] > 0 and m["latency_ms_batch"] > 0
    p = result.predictions
    assert list(p.columns) == ["product_id", "label", "predicted", "confidence", "correct"]
    assert p["product_id"].tolist() == sorted(test_split[2])
    by_id = dict(zip(test_split[2], test_split[1], strict=True))
    assert p["label"].tolist() == [by_id[i] for i in p["product_id"]]
    assert p["correct"].dtype == bool and p["correct"].all()
    assert result.confusion_png.read_bytes()[:8] == PNG_MAGIC


def test_evaluate_model_wrong_classifier_is_caught(test_split, tmp_path) -> None:
    result = run_evaluation(BrightnessNet(wrong=True).eval(), test_split, tmp_path)
    assert result.metrics["accuracy"] == 0.0
    assert not result.predictions["correct"].any()
    # the embedding still groups by band, so retrieval stays perfect: the metrics are separate
    assert result.metrics["recall_at_1"] == 1.0


def test_write_evaluation_outputs(test_split, tmp_path) -> None:
    result = run_evaluation(BrightnessNet().eval(), test_split, tmp_path / "eval")
    paths = write_evaluation_outputs(result, tmp_path / "out")
    assert set(paths) == {"metrics", "per_class", "predictions", "confusion"}
    assert json.loads(paths["metrics"].read_text())["accuracy"] == 1.0
    assert pd.read_csv(paths["per_class"])["category"].tolist() == CATEGORIES
    back = pd.read_parquet(paths["predictions"])
    pd.testing.assert_frame_equal(back, result.predictions)
    assert paths["confusion"].read_bytes()[:8] == PNG_MAGIC


class SlowNet(nn.Module):
    """A contract-following model whose forward takes at least `pause` seconds per call."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.pause)
        out = x.flatten(1)[:, :3]
        return out, F.normalize(out + 1.0, dim=1)


def test_measure_latency_positive_and_per_image() -> None:
    images = band_images(np.zeros(10, dtype=int))
    single, batched = measure_latency(SlowNet(0.004), images, 10)
    assert single >= 4.0  # each batch-1 call sleeps 4 ms
    assert 4.0 / 32 <= batched < single  # one 4 ms call shared by 32 images
    fast_single, fast_batched = measure_latency(BrightnessNet(), images, 10)
    assert 0 < fast_single < single and fast_batched > 0


class ThreadsNet(torch.nn.Module):
    """Records the torch thread count each forward pass sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.add(torch.get_num_threads())
        out = x.flatten(1)[:, :3]
        return out, F.normalize(out + 1.0, dim=1)


def test_measure_latency_runs_on_one_thread_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        net = ThreadsNet()
        measure_latency(net, band_images(np.zeros(4, dtype=int)), 4)
        assert net.seen == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
