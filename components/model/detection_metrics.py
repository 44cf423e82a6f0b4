"""Detection metrics, COCO style: box IoU, non-maximum suppression, and mean average precision
at one IoU threshold (mAP@0.5) or averaged over 0.50:0.05:0.95 (mAP@0.5:0.95).

Boxes are [x0, y0, x1, y1) in pixels. Average precision follows the COCO evaluation: per
category, the detections of every image sorted by score, each matched to the unmatched ground
truth box of its image and category it overlaps most (IoU >= the threshold) or counted a false
positive; the precision envelope (precision made non-increasing in recall) sampled at the 101
recall points 0, 0.01, ..., 1; categories without ground truth are left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COCO_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))
RECALL_POINTS = np.linspace(0, 1, 101)


@dataclass(frozen=True)
class Detections:
    """One image's boxes (N x 4), categories (N) and, for predictions, scores (N)."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (N x 4) with every box of `b` (M x 4): N x M."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou: float, max_items: int | None = None
) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first: a box is
    dropped when it overlaps a kept one by more than `iou`."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    overlaps = box_iou(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(overlaps[i, j] <= iou for j in kept):
            kept.append(int(i))
            if max_items is not None and len(kept) == max_items:
                break
    return np.array(kept, dtype=np.int64)


def average_precision(
    truths: list[Detections], predictions: list[Detections], category: int, threshold: float
) -> float | None:
    """COCO AP of one category at one IoU threshold over images (truths[i] and
    predictions[i] are image i's); None when no image has a box of that category."""
    scored, positives = [], 0
    for image, (truth, pred) in enumerate(zip(truths, predictions, strict=True)):
        positives += int(np.sum(np.asarray(truth.labels) == category))
        mine = np.flatnonzero(np.asarray(pred.labels) == category)
        scored += [(float(pred.scores[i]), image, int(i)) for i in mine]
    if positives == 0:
        return None
    scored.sort(key=lambda item: -item[0])  # stable: ties keep image order
    used = [np.zeros(len(t.labels), dtype=bool) for t in truths]
    hits = np.zeros(len(scored), dtype=bool)
    for n, (_, image, i) in enumerate(scored):
        truth = truths[image]
        candidates = np.flatnonzero((np.asarray(truth.labels) == category) & ~used[image])
        if not len(candidates):
            continue
        ious = box_iou(predictions[image].boxes[i], truth.boxes[candidates])[0]
        best = int(np.argmax(ious))
        if ious[best] >= threshold:
            used[image][candidates[best]] = True
            hits[n] = True
    tp = np.cumsum(hits)
    recall = tp / positives
    precision = tp / np.arange(1, len(hits) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    sampled = []
    for r in RECALL_POINTS:
        reached = np.searchsorted(recall, r, side="left")
        sampled.append(envelope[reached] if reached < len(envelope) else 0.0)
    return float(np.mean(sampled))


def mean_average_precision(
    truths: list[Detections],
    predictions: list[Detections],
    thresholds: tuple[float, ...] = (0.5,),
) -> float:
    """The mean over `thresholds` of the mean AP over categories that have ground truth."""
    categories = sorted({int(c) for t in truths for c in np.asarray(t.labels)})
    if not categories:
        raise ValueError("no ground-truth boxes: mAP is undefined")
    per_threshold = []
    for threshold in thresholds:
        aps = [average_precision(truths, predictions, c, threshold) for c in categories]
        per_threshold.append(np.mean([ap for ap in aps if ap is not None]))
    return float(np.mean(per_threshold))


def match(
    truth_boxes: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray, threshold: float = 0.5
) -> np.ndarray:
    """For each true box, the index of the prediction it is matched to (-1: missed): predictions
    in score order each take the free true box they overlap most, from IoU `threshold` (the
    one-to-one matching AP counts hits with, categories aside)."""
    truth_boxes = np.asarray(truth_boxes, np.float64).reshape(-1, 4)
    matched = np.full(len(truth_boxes), -1, dtype=np.int64)
    if not len(truth_boxes) or not len(pred_boxes):
        return matched
    ious = box_iou(pred_boxes, truth_boxes)
    for i in np.argsort(-np.asarray(pred_scores), kind="stable"):
        free = np.where(matched < 0, ious[i], -1.0)
        best = int(np.argmax(free))
        if free[best] >= threshold:
            matched[best] = i
    return matched
