"""Synthetic label noise and flip-detection scoring: how vitrine proves its cleaning stage pays.

The cleaning stage (components/data/labels.py) cannot be judged on real labels, whose errors are
unknown. Flipping a known set of labels gives a ground truth: the stage's flagged rows are then
scored against the flips (precision / recall / F1), and a model trained on the cleaned labels
is compared with one trained on the clean and on the noisy labels (benchmarks/label_noise.py).

Two noise models, both with an exact count of flips (not a Bernoulli draw per row) so the rate
printed is the rate injected:

- symmetric: `rate` of all rows move to a uniformly random OTHER class;
- asymmetric: within each class of a confusable pair, `rate` of that class's rows move to
  its partner (the per-class transition matrix has 1 - rate on the diagonal and `rate` on the
  partner). This is the usual definition (Patrini et al. 2017): the same per-class noise rate
  as the symmetric case, only structured the way real annotators err. Classes outside the
  pairs stay clean, so the overall share of flipped rows is rate × (the pairs' share of rows).
"""

from __future__ import annotations

import numpy as np

# Fashion-MNIST's confusable pairs (label indices): Shirt↔T-shirt/top, Pullover↔Coat,
# Sneaker↔Ankle boot.
FASHION_MNIST_PAIRS: tuple[tuple[int, int], ...] = ((6, 0), (2, 4), (7, 9))


def inject_symmetric_noise(
    labels: np.ndarray, rate: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): round(rate·N) rows, chosen uniformly, get another class."""
    labels = _check(labels, rate)
    if num_classes < 2 or labels.max(initial=0) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) with at least 2 classes")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
    noisy = labels.copy()
    noisy[rows] = (labels[rows] + rng.integers(1, num_classes, len(rows))) % num_classes
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rows] = True
    return noisy, flipped


def inject_pair_noise(
    labels: np.ndarray, rate: float, pairs: tuple[tuple[int, int], ...], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): in each paired class, round(rate·n_class) rows chosen
    uniformly take the partner's label. Flips are decided on the true labels, so a row moves
    at most once and the partners swap independently."""
    labels = _check(labels, rate)
    members = [c for pair in pairs for c in pair]
    if any(len(pair) != 2 or pair[0] == pair[1] for pair in pairs) or len(set(members)) != len(
        members
    ):
        raise ValueError(f"pairs must be disjoint pairs of two distinct classes, got {pairs}")
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    for a, b in pairs:
        for source, target in ((a, b), (b, a)):
            rows = np.flatnonzero(labels == source)
            picked = rng.choice(rows, size=round(rate * len(rows)), replace=False)
            noisy[picked] = target
    return noisy, noisy != labels


def score_flip_detection(flagged: np.ndarray, flipped: np.ndarray) -> dict[str, float | int]:
    """Precision, recall and F1 of the flagged rows at finding the flipped ones.

    Precision is 0 when nothing is flagged and recall 0 when nothing was flipped (no credit for
    an empty answer); F1 is their harmonic mean, 0 when both are 0.
    """
    flagged, flipped = np.asarray(flagged, dtype=bool), np.asarray(flipped, dtype=bool)
    if flagged.shape != flipped.shape:
        raise ValueError(f"flagged has shape {flagged.shape} but flipped {flipped.shape}")
    hits = int((flagged & flipped).sum())
    precision = hits / flagged.sum() if flagged.any() else 0.0
    recall = hits / flipped.sum() if flipped.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "flagged": int(flagged.sum()),
        "flipped": int(flipped.sum()),
        "true_positives": hits,
    }


def _check(labels: np.ndarray, rate: float) -> np.ndarray:
    """Labels as a 1-D int64 copy; a rate outside [0, 1) or negative labels are refused."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("labels must be a 1-D integer array")
    if not 0 <= rate < 1:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    return labels.astype(np.int64)
