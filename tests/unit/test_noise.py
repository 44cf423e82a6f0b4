"""components/data/noise.py: exact-rate label noise (symmetric, confusable pairs) and flip scoring."""

from __future__ import annotations

import numpy as np
import pytest

from components.data.noise import (
    FASHION_MNIST_PAIRS,
    inject_pair_noise,
    inject_symmetric_noise,
    score_flip_detection,
)

LABELS = np.repeat(np.arange(10), 500)  # 10 balanced classes, 5,000 rows


def test_symmetric_noise_flips_exact_share_to_other_classes() -> None:
    noisy, flipped = inject_symmetric_noise(LABELS, 0.2, 10, seed=0)
    assert flipped.sum() == 1000  # exactly round(0.2 · 5,000), not a Bernoulli draw
    assert (noisy[flipped] != LABELS[flipped]).all()  # a flip always changes the class
    assert (noisy[~flipped] == LABELS[~flipped]).all()
    assert noisy.min() >= 0 and noisy.max() <= 9
    # the new class is uniform over the other nine: each offset 1..9 about 1000/9 times
    offsets = np.bincount((noisy[flipped] - LABELS[flipped]) % 10, minlength=10)
    assert offsets[0] == 0 and offsets[1:].min() > 70 and offsets[1:].max() < 150
    # flipped rows spread over every class, not one block of rows
    assert np.bincount(LABELS[flipped], minlength=10).min() > 60
    np.testing.assert_array_equal(LABELS, np.repeat(np.arange(10), 500))  # input untouched


def test_noise_is_seeded() -> None:
    a, fa = inject_symmetric_noise(LABELS, 0.2, 10, seed=3)
    b, fb = inject_symmetric_noise(LABELS, 0.2, 10, seed=3)
    c, _ = inject_symmetric_noise(LABELS, 0.2, 10, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)
    assert (a != c).any()
    p, _ = inject_pair_noise(LABELS, 0.2, FASHION_MNIST_PAIRS, seed=3)
    q, _ = inject_pair_noise(LABELS, 0.2, FASHION_MNIST_PAIRS, seed=3)
    np.testing.assert_array_equal(p, q)


def test_pair_noise_flips_share_of_each_paired_class_to_its_partner() -> None:
    noisy, flipped = inject_pair_noise(LABELS, 0.2, FASHION_MNIST_PAIRS, seed=0)
    partner = {a: b for pair in FASHION_MNIST_PAIRS for a, b in (pair, pair[::-1])}
    for cls in range(10):
        rows = np.equal(LABELS, cls)
        if cls in partner:
            assert flipped[rows].sum() == 100  # 20% of the class's 500 rows
            assert (noisy[rows & flipped] == partner[cls]).all()
        else:  # Trouser, Dress, Sandal, Bag stay clean
            assert not flipped[rows].any()
    assert flipped.sum() == 600  # 6 paired classes × 100: 12% of all rows
    np.testing.assert_array_equal(flipped, noisy != LABELS)


def test_noise_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="rate"):
        inject_symmetric_noise(LABELS, 1.0, 10, seed=0)
    with pytest.raises(ValueError, match="rate"):
        inject_pair_noise(LABELS, -0.1, FASHION_MNIST_PAIRS, seed=0)
    with pytest.raises(ValueError, match="lie in"):
        inject_symmetric_noise(LABELS, 0.2, 5, seed=0)
    with pytest.raises(ValueError, match="integer"):
        inject_symmetric_noise(LABELS.astype(float), 0.2, 10, seed=0)
    with pytest.raises(ValueError, match="disjoint"):
        inject_pair_noise(LABELS, 0.2, ((0, 6), (6, 2)), seed=0)
    with pytest.raises(ValueError, match="disjoint"):
        inject_pair_noise(LABELS, 0.2, ((3, 3),), seed=0)


def test_zero_rate_changes_nothing() -> None:
    noisy, flipped = inject_pair_noise(LABELS, 0.0, FASHION_MNIST_PAIRS, seed=0)
    np.testing.assert_array_equal(noisy, LABELS)
    assert not flipped.any()


def test_score_flip_detection() -> None:
    flipped = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    flagged = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    s = score_flip_detection(flagged, flipped)
    assert (s["true_positives"], s["flagged"], s["flipped"]) == (3, 4, 4)
    assert s["precision"] == pytest.approx(0.75)
    assert s["recall"] == pytest.approx(0.75)
    assert s["f1"] == pytest.approx(0.75)
    everything = score_flip_detection(np.ones(10, bool), flipped)
    assert (everything["precision"], everything["recall"]) == (pytest.approx(0.4), 1.0)
    assert everything["f1"] == pytest.approx(2 * 0.4 / 1.4)
    nothing = score_flip_detection(np.zeros(10, bool), flipped)
    assert (nothing["precision"], nothing["recall"], nothing["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        score_flip_detection(flagged[:5], flipped)
