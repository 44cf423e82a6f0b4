"""components/data/labels.py on a real Fashion-MNIST slice with injected label flips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.config import LabelParams
from components.data.catalogue import load_fashion_mnist
from components.data.labels import (
    ISSUE_COLUMNS,
    apply_label_policy,
    clean_labels,
    cleaning_model,
    cleaning_probs,
    early_epochs,
    find_label_issues,
)
from components.data.noise import FASHION_MNIST_PAIRS, inject_pair_noise, score_flip_detection
from tests.conftest import FMNIST_DIR

FMNIST = FMNIST_DIR
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist missing")


def inject_flips(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric noise: `share` of the labels move to a uniformly random OTHER class."""
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(labels)) < share
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    return noisy, flipped


def manifest_of(labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"product_id": [f"fm-{i:05d}" for i in range(len(labels))], "label": labels}
    )


@pytest.fixture(scope="module")
def fmnist_slice() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist(FMNIST)["train"]
    return images[:3000, :, :, None], labels[:3000].astype(np.int64)


@pytest.fixture(scope="module")
def noisy_run(fmnist_slice):
    images, labels = fmnist_slice
    noisy, flipped = inject_flips(labels, 0.2, seed=1)
    manifest = manifest_of(noisy)
    probs = cleaning_probs(images, noisy, LabelParams(model="mlp"), seed=0)
    return manifest, probs, flipped


def test_out_of_fold_probs_shape_and_normalised(noisy_run) -> None:
    manifest, probs, _ = noisy_run
    assert probs.shape == (len(manifest), 10)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)


def test_issues_find_most_injected_flips(noisy_run) -> None:
    manifest, probs, flipped = noisy_run
    issues = find_label_issues(manifest, probs)
    assert list(issues.columns) == ISSUE_COLUMNS
    found = manifest["product_id"].isin(issues["product_id"]).to_numpy()
    recall = (found & flipped).sum() / flipped.sum()
    precision = (found & flipped).sum() / found.sum()
    # measured on this slice (filter_by both): recall 0.87, precision 0.70 (chance is 0.2)
    assert recall >= 0.8
    assert precision >= 0.55
    # worst first: self-confidence (prob of the given label) is non-decreasing down the table
    rows = manifest.set_index("product_id").index.get_indexer(issues["product_id"])
    self_conf = probs[rows, issues["given_label"].to_numpy()]
    assert np.all(np.diff(self_conf) >= -1e-12)
    assert (issues["suggested_label"].to_numpy() == probs[rows].argmax(axis=1)).all()
    # suggested labels mostly restore the true one for the flips found
    assert (issues["suggested_label"] != issues["given_label"]).mean() > 0.9


def test_filter_both_is_a_more_precise_subset(noisy_run) -> None:
    """The default rule flags only rows the noise-rate rule flags too, with better precision."""
    manifest, probs, flipped = noisy_run
    ids = manifest["product_id"]
    both = ids.isin(find_label_issues(manifest, probs, filter_by="both")["product_id"])
    rate = ids.isin(
        find_label_issues(manifest, probs, filter_by="prune_by_noise_rate")["product_id"]
    )
    assert both.sum() < rate.sum() and not (both & ~rate).any()
    strict, loose = score_flip_detection(both, flipped), score_flip_detection(rate, flipped)
    assert strict["precision"] > loose["precision"]
    assert strict["f1"] > loose["f1"]  # measured on this slice: 0.776 vs 0.758


def test_clean_labels_is_the_three_steps(fmnist_slice) -> None:
    """The flow's one entry point = OOF probs → issues (params.filter_by) → policy."""
    images, labels = fmnist_slice
    images, labels = images[:600], labels[:600]
    manifest = pd.DataFrame({"product_id": [f"p{i:04d}" for i in range(600)], "label": labels})
    params = LabelParams(
        model="mlp", folds=3, pca_components=16, filter_by="prune_by_class", review_below_rows=0
    )
    cleaned, issues, summary = clean_labels(manifest, images, params, seed=2)
    probs = cleaning_probs(images, labels, params, seed=2)
    expected = find_label_issues(manifest, probs, filter_by="prune_by_class")
    pd.testing.assert_frame_equal(issues, expected)
    assert summary["flagged"] == len(issues) and len(cleaned) == 600 - len(issues)
    assert summary["model"] == "mlp"
    with pytest.raises(ValueError, match="600 manifest rows but 599 images"):
        clean_labels(manifest, images[:599], params)


def test_out_of_fold_probs_do_not_memorise_labels(fmnist_slice) -> None:
    """Labels independent of the images: out-of-fold accuracy stays at chance (no leakage)."""
    images, _ = fmnist_slice
    random_labels = np.random.default_rng(3).integers(0, 10, 800)
    params = LabelParams(model="mlp", folds=2)
    probs = cleaning_probs(images[:800], random_labels, params, seed=0)
    assert (probs.argmax(axis=1) == random_labels).mean() < 0.2


@pytest.mark.filterwarnings("ignore:The least populated class")
def test_out_of_fold_probs_deterministic_and_keep_rare_classes(fmnist_slice) -> None:
    images, labels = fmnist_slice
    images, labels = images[:400], labels[:400].copy()
    labels[labels == 9] = 8
    labels[0] = 9  # class 9 has one member: most folds never train on it
    params = LabelParams(model="mlp", folds=3, pca_components=16)
    a = cleaning_probs(images, labels, params, seed=5)
    b = cleaning_probs(images, labels, params, seed=5)
    assert a.shape == (400, 10)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-9)


@pytest.fixture()
def small_manifest() -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.DataFrame(
        {
            "product_id": ["a", "b", "c", "d", "e"],
            "label": [0, 1, 1, 2, 0],
            "category": ["zero", "one", "one", "two", "zero"],
        }
    )
    issues = pd.DataFrame(
        {
            "product_id": ["c", "e"],
            "given_label": [1, 0],
            "suggested_label": [2, 1],
            "suggested_confidence": [0.95, 0.6],
            "label_quality": [0.01, 0.2],
        }
    )
    return manifest, issues


def test_policy_drop(small_manifest) -> None:
    manifest, issues = small_manifest
    out, summary = apply_label_policy(
        manifest, issues, LabelParams(policy="drop", review_below_rows=0)
    )
    assert out["product_id"].tolist() == ["a", "b", "d"]
    assert summary == {
        "policy": "drop",
        "flagged": 2,
        "dropped": 2,
        "relabelled": 0,
        "per_class": {0: 1, 1: 1},
    }
    assert manifest["product_id"].tolist() == ["a", "b", "c", "d", "e"]  # input untouched


def test_policy_relabel(small_manifest) -> None:
    manifest, issues = small_manifest
    params = LabelParams(policy="relabel", relabel_min_confidence=0.9, review_below_rows=0)
    out, summary = apply_label_policy(manifest, issues, params)
    assert out["product_id"].tolist() == ["a", "b", "c", "d"]  # e: too unsure, dropped
    row = out.set_index("product_id").loc["c"]
    assert (row["label"], row["original_label"], row["category"]) == (2, 1, "two")
    assert (out["label"] == out["original_label"]).sum() == 3
    assert out["label"].dtype == np.int64
    assert (summary["flagged"], summary["dropped"], summary["relabelled"]) == (2, 1, 1)
    loose = LabelParams(policy="relabel", relabel_min_confidence=0.5, review_below_rows=0)
    out, summary = apply_label_policy(manifest, issues, loose)
    assert out.set_index("product_id").loc["e", "label"] == 1
    assert (summary["dropped"], summary["relabelled"]) == (0, 2)


def test_policy_keep(small_manifest) -> None:
    manifest, issues = small_manifest
    out, summary = apply_label_policy(manifest, issues, LabelParams(policy="keep"))
    pd.testing.assert_frame_equal(out, manifest)
    assert (summary["flagged"], summary["dropped"], summary["relabelled"]) == (2, 0, 0)


@pytest.mark.parametrize("policy", ["drop", "relabel"])
def test_small_catalogues_get_a_review_queue_instead(small_manifest, policy) -> None:
    manifest, issues = small_manifest
    params = LabelParams(policy=policy, review_below_rows=6)  # 5 rows: below
    out, summary = apply_label_policy(manifest, issues, params)
    pd.testing.assert_frame_equal(out, manifest)
    assert summary["policy"] == "review" and (summary["dropped"], summary["relabelled"]) == (0, 0)
    assert summary["flagged"] == 2 and f"{policy} not applied" in summary["review_reason"]
    acting = LabelParams(policy=policy, review_below_rows=5)  # 5 rows: at the threshold
    out, summary = apply_label_policy(manifest, issues, acting)
    assert summary["policy"] == policy and len(out) < len(manifest)


@pytest.fixture(scope="module")
def pair_noise_slice(fmnist_slice):
    """20% of each confusable-pair class (Shirt↔T-shirt, Pullover↔Coat, Sneaker↔Ankle boot)
    takes the partner's label: the hard case for label cleaning."""
    images, labels = fmnist_slice
    noisy, flipped = inject_pair_noise(labels, 0.2, FASHION_MNIST_PAIRS, seed=4)
    return images, labels, noisy, flipped


def test_cnn_out_of_fold_model_finds_pair_flips(pair_noise_slice) -> None:
    """labels.model=cnn: the training stage's CNN per fold. On 3,000 rows (2,000 per fold) a
    narrow CNN is still no better than the MLP (measured: OOF accuracy 0.77 vs 0.79, flip F1
    0.55 vs 0.60); it overtakes it from 20k rows (benchmarks/label_noise.py). Here: the
    probabilities are well-formed, recover the true labels and flag the flips far above chance
    (chance: F1 0.21 at this slice's 12% flips)."""
    images, truth, noisy, flipped = pair_noise_slice
    manifest = manifest_of(noisy)
    params = LabelParams(model="cnn", folds=3, cnn_width=16, cnn_epochs=15, filter_by="both")
    probs = cleaning_probs(images, noisy, params, seed=0)
    assert probs.shape == (len(noisy), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (probs.argmax(1) == truth).mean() > 0.72
    flagged = manifest["product_id"].isin(find_label_issues(manifest, probs, "both")["product_id"])
    assert score_flip_detection(flagged.to_numpy(), flipped)["f1"] > 0.45


def test_cnn_out_of_fold_probs_do_not_memorise_labels(fmnist_slice) -> None:
    images, _ = fmnist_slice
    random_labels = np.random.default_rng(3).integers(0, 10, 800)
    params = LabelParams(model="cnn", folds=2, cnn_width=8, cnn_epochs=3)
    probs = cleaning_probs(images[:800], random_labels, params, seed=0)
    assert (probs.argmax(axis=1) == random_labels).mean() < 0.2


def test_early_learning_cnn_finds_pair_flips_without_memorising_them(pair_noise_slice) -> None:
    """labels.model=early: one CNN on every row, stopped early, scored on its own rows. The
    flipped rows were trained on with their wrong labels, yet their probabilities mostly
    point at the true label (measured here: 0.71 true, 0.14 the wrong given one): the model
    learnt the classes, not the noise. A model that memorised its rows would flag nothing."""
    images, truth, noisy, flipped = pair_noise_slice
    manifest = manifest_of(noisy)
    params = LabelParams(model="early", cnn_width=16, early_row_passes=12 * 3000, filter_by="both")
    assert early_epochs(params, len(noisy)) == 12
    probs = cleaning_probs(images, noisy, params, seed=0)
    assert probs.shape == (len(noisy), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (probs[flipped].argmax(1) == truth[flipped]).mean() > 0.6
    assert (probs[flipped].argmax(1) == noisy[flipped]).mean() < 0.3
    flagged = manifest["product_id"].isin(find_label_issues(manifest, probs, "both")["product_id"])
    assert score_flip_detection(flagged.to_numpy(), flipped)["f1"] > 0.45  # chance: 0.21


def test_auto_is_the_early_cnn_and_its_epochs_follow_the_catalogue_size() -> None:
    auto = LabelParams()
    assert cleaning_model(auto) == "early"
    assert cleaning_model(LabelParams(model="cnn")) == "cnn"
    assert cleaning_model(LabelParams(model="early")) == "early"
    assert cleaning_model(LabelParams(model="mlp")) == "mlp"
    # 300,000 rows seen: 5 epochs of the 60k catalogue (59,988 after validation too), 40 at most
    sizes = (60_000, 20_000, 12_000, 3_000, 400)
    assert [early_epochs(auto, n) for n in sizes] == [5, 15, 25, 40, 40]
    assert early_epochs(auto, 59_988) == 5 and early_epochs(auto, 10**7) == 1
