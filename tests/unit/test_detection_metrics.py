"""COCO-style detection metrics (components/model/detection_metrics.py), table-tested with
values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from components.model.detection_metrics import (
    COCO_THRESHOLDS,
    Detections,
    average_precision,
    box_iou,
    match,
    mean_average_precision,
    nms,
)

SQUARE = [0, 0, 10, 10]


def truth(*boxes_labels):
    boxes = [b for b, _ in boxes_labels]
    return Detections(np.array(boxes, float).reshape(-1, 4), np.array([c for _, c in boxes_labels]))


def pred(*boxes_labels_scores):
    boxes = [b for b, _, _ in boxes_labels_scores]
    return Detections(
        np.array(boxes, float).reshape(-1, 4),
        np.array([c for _, c, _ in boxes_labels_scores]),
        np.array([s for _, _, s in boxes_labels_scores], float),
    )


@pytest.mark.parametrize(
    ("other", "expected"),
    [(SQUARE, 1.0), ([5, 0, 15, 10], 50 / 150), ([10, 10, 20, 20], 0.0), ([0, 0, 10, 6], 0.6)],
)
def test_box_iou(other, expected):
    assert box_iou(np.array([SQUARE]), np.array([other]))[0, 0] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("truths", "predictions", "expected"),
    [
        # every box found, nothing else: 1
        ([truth((SQUARE, 0))], [pred((SQUARE, 0, 0.9))], 1.0),
        # a confident miss ranked above the hit: precision 1/2 at full recall
        ([truth((SQUARE, 0))], [pred(([50, 50, 60, 60], 0, 0.9), (SQUARE, 0, 0.8))], 0.5),
        # one of two boxes found: precision 1 up to recall 0.5 (51 of 101 recall points)
        ([truth((SQUARE, 0), ([20, 20, 30, 30], 0))], [pred((SQUARE, 0, 0.9))], 51 / 101),
        # a duplicate after full recall costs nothing
        ([truth((SQUARE, 0))], [pred((SQUARE, 0, 0.9), (SQUARE, 0, 0.8))], 1.0),
        # the right box with the wrong category is no hit
        ([truth((SQUARE, 0))], [pred((SQUARE, 1, 0.9))], 0.0),
        # across images: image 2's hit outranks image 1's miss
        (
            [truth((SQUARE, 0)), truth((SQUARE, 0))],
            [pred(([40, 40, 50, 50], 0, 0.5)), pred((SQUARE, 0, 0.9))],
            51 / 101,
        ),
    ],
)
def test_average_precision(truths, predictions, expected):
    assert average_precision(truths, predictions, 0, 0.5) == pytest.approx(expected)


def test_map_averages_categories_with_ground_truth_only():
    truths = [truth((SQUARE, 0), ([20, 0, 30, 10], 1))]
    predictions = [
        pred(
            (SQUARE, 0, 0.9),
            ([50, 50, 60, 60], 1, 0.9),
            ([20, 0, 30, 10], 1, 0.8),
            (SQUARE, 2, 0.7),
        )
    ]  # category 0: AP 1; category 1: AP 0.5; category 2 has no ground truth: left out
    assert mean_average_precision(truths, predictions) == pytest.approx(0.75)
    assert average_precision(truths, predictions, 2, 0.5) is None


def test_map_over_coco_thresholds_counts_where_the_overlap_suffices():
    truths, predictions = [truth((SQUARE, 0))], [pred(([0, 0, 10, 6], 0, 0.9))]  # IoU 0.6
    assert mean_average_precision(truths, predictions, (0.5,)) == 1.0
    assert mean_average_precision(truths, predictions, (0.75,)) == 0.0
    # hits at 0.50, 0.55, 0.60; misses at 0.65 ... 0.95
    assert mean_average_precision(truths, predictions, COCO_THRESHOLDS) == pytest.approx(0.3)


def test_map_without_ground_truth_is_refused():
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        mean_average_precision([truth()], [pred((SQUARE, 0, 0.9))])


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([SQUARE, [1, 0, 11, 10], [30, 30, 40, 40]], float)  # IoU(0, 1) = 0.82
    scores = np.array([0.8, 0.9, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.9).tolist() == [1, 0, 2]
    assert nms(boxes, scores, 0.5, max_items=1).tolist() == [1]


# true boxes, predicted (box, score) pairs, the prediction each true box is matched to
MATCH_CASES = [
    ("one_to_one", [SQUARE], [(SQUARE, 0.9)], [0]),
    ("missed_below_the_threshold", [SQUARE], [([5, 0, 15, 10], 0.9)], [-1]),  # IoU 1/3
    ("no_predictions", [SQUARE, [20, 20, 30, 30]], [], [-1, -1]),
    # two predictions on one product: the better-scored one takes it, the other matches nothing
    ("duplicate", [SQUARE], [([0, 0, 10, 9], 0.4), ([0, 0, 10, 10], 0.8)], [1]),
    # the better-scored prediction takes the box it overlaps most, although the other one fits
    # it exactly; that one overlaps the second box too little (IoU 0.43): missed
    (
        "greedy_by_score",
        [[0, 0, 10, 10], [4, 0, 14, 10]],
        [([1, 0, 11, 10], 0.9), ([0, 0, 10, 10], 0.5)],
        [0, -1],
    ),
]


@pytest.mark.parametrize(
    ("truths", "predictions", "expected"),
    [case[1:] for case in MATCH_CASES],
    ids=[case[0] for case in MATCH_CASES],
)
def test_match(truths, predictions, expected):
    boxes = np.array([b for b, _ in predictions], float).reshape(-1, 4)
    scores = np.array([s for _, s in predictions], float)
    assert match(np.array(truths, float), boxes, scores).tolist() == expected
