"""Label cleaning: cleanlab on probabilities from a model that has not learnt the label noise.

cleanlab flags a row when the model's probability for its given label is low against the
per-class confidence it learns from all rows. The model must not have memorised the given
labels. Three models, `params.model`:

- "mlp" (seconds), out of fold (StratifiedKFold, `params.folds`): pixels/255 → PCA
  (`params.pca_components`, fitted once on all images; PCA never sees a label, so sharing it
  across folds leaks nothing) → standardised → a one-hidden-layer MLP trained in torch.
  Measured on the 60k train split (5 folds): OOF accuracy 0.890 in ~30 s.
- "cnn" (minutes), out of fold: the training stage's own compact CNN
  (components.model.training.train_model, stages of width w, 2w, 4w with w =
  `params.cnn_width`, `params.cnn_epochs` epochs, bf16 / channels-last where the CPU has them)
  trained on each fold's training part. It costs (folds-1)·epochs passes over the rows: 4
  folds × 8 epochs took 4 minutes on 20k rows and 12 on 60k (2 cores).
- "early" (minutes), in sample: the same CNN trained ONCE on every row, then scored on those
  rows. A network learns the patterns shared by most rows of a class before it memorises the
  rows whose labels disagree with them (the early-learning phase: Arpit et al. 2017, "A
  closer look at memorization in deep networks"; Liu et al. 2020, "Early-learning
  regularization"): stopped early, it still gives a mislabelled row's given label little
  probability. How early (`early_epochs`): after `params.early_row_passes` rows seen (5
  epochs of 60k rows: 5 passes instead of the out-of-fold CNN's 24, about 3 minutes against
  12, finding the flips as well), at most `params.early_max_epochs` (40) on a small catalogue,
  which needs more epochs to learn its classes at all.
- "auto" (the default): the early CNN.

Flip detection F1, prune_by_noise_rate / both (benchmarks/label_noise.py's noise):

                                          symmetric 20%    pairs (Shirt/T-shirt, ...)
  mlp, 5 folds, 20k rows                   0.818 / 0.837    0.696 / 0.697
  mlp, 5 folds, 60k rows                   0.847 / 0.860    0.731 / 0.736
  cnn, 4 folds, 20k rows                          -         0.754 / 0.763
  cnn, 4 folds, 60k rows                   0.892 / -        0.819 / 0.816
  early, 60k rows, 2 / 3 / 5 / 8 epochs           -         0.764 / 0.786 / 0.823 / 0.845
  early, 60k rows, 3 / 5 epochs            0.878 / 0.894    -
  early, 60k rows, 5 epochs, progressive [20, 24] px       -         0.806 / 0.806

The early rows come from an experiment script run on 2 idle cores (83, 117, 169 and 255 s
for 2, 3, 5 and 8 epochs; symmetric 5 epochs: 0.894 / 0.900), not from a benchmark;
benchmarks/label_noise.py measures the default (docs/model-quality.md). On 60k rows, up to 8
epochs the in-sample model still gains accuracy on the TRUE labels (0.891, 0.901, 0.916,
0.927) faster than it memorises the noisy ones, so F1 rises; 5 epochs buy the out-of-fold
CNN's F1 for a quarter of its time.

Small catalogues: the same experiment on Fashion-MNIST slices of 1,275 and 3,000 rows and on
the tests' clean colour catalogue (flagged share of correct labels, flip F1 for 15 to 60
epochs) is tabled in docs/model-quality.md. The more epochs, the fewer correct labels are
flagged and, past some point, the fewer flips are found, as the model learns them too; 40
epochs (early_max_epochs) flag under 5% of the colour catalogue's rows and find flips at
least as well as the MLP on every slice.

Pair noise is the hard case: the flips sit where the classes genuinely overlap, so only a
model close to the champion's accuracy separates them (a champion trained on CLEAN labels
scores 0.828 on the same task). A flagged row's suggested label is the model's argmax.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cleanlab.filter
import cleanlab.rank
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

from components.config import LabelParams, TrainParams
from components.model import training
from components.threads import limited_threads

HIDDEN = 256
EPOCHS = 12
BATCH = 256
LR = 2e-3
WEIGHT_DECAY = 1e-4
ISSUE_COLUMNS = [
    "product_id",
    "given_label",
    "suggested_label",
    "suggested_confidence",
    "label_quality",
]


def project_pixels(images: np.ndarray, n_components: int) -> np.ndarray:
    """uint8 N×H×W(×C) → float32 N×k standardised principal components of pixels/255."""
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    x = x - x.mean(0, keepdim=True)
    k = min(n_components, x.shape[0], x.shape[1])
    cov = x.T @ x / max(len(x) - 1, 1)
    _, vectors = torch.linalg.eigh(cov.double())
    top = vectors[:, -k:].flip(1).float()
    z = x @ top
    return ((z - z.mean(0)) / (z.std(0) + 1e-6)).numpy()


def fit_predict_mlp(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int, seed: int
) -> np.ndarray:
    """Fit a small MLP on (x_train, y_train); softmax probabilities for x_test, N×n_classes."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(x_train.shape[1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_classes)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    steps = EPOCHS * max(1, -(-len(xt) // BATCH))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), BATCH):
            idx = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x_test)), dim=1).double().numpy()


def cleaning_probs(
    images: np.ndarray, labels: np.ndarray, params: LabelParams, seed: int = 0
) -> np.ndarray:
    """N×C probabilities (C = max label + 1), rows summing to 1, from the cleaning model
    (`cleaning_model`): out of fold for "mlp" and "cnn", early-stopped in sample for
    "early"."""
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = int(labels.max()) + 1
    if cleaning_model(params) == "early":
        probs = fit_predict_cnn(
            images,
            labels,
            images,
            n_classes,
            params,
            seed,
            "label cleaning: early-learning CNN",
            epochs=early_epochs(params, len(labels)),
        )
    else:
        probs = out_of_fold_probs(images, labels, n_classes, params, seed)
    return probs / probs.sum(axis=1, keepdims=True)


def out_of_fold_probs(
    images: np.ndarray, labels: np.ndarray, n_classes: int, params: LabelParams, seed: int
) -> np.ndarray:
    """Every row's probabilities from the "cnn" or "mlp" model trained on the other folds."""
    folds = StratifiedKFold(params.folds, shuffle=True, random_state=seed)
    splits = list(folds.split(np.zeros(len(labels)), labels))
    probs = np.zeros((len(labels), n_classes))
    if cleaning_model(params) == "cnn":
        for k, (train, test) in enumerate(splits):
            label = f"label cleaning: fold {k + 1}/{len(splits)}"
            probs[test] = fit_predict_cnn(
                images[train], labels[train], images[test], n_classes, params, seed + k, label
            )
    else:
        features = project_pixels(images, params.pca_components)
        # one thread: the tiny MLP's small matmuls gain nothing from more, and on a busy
        # 2-core machine two threads made one fold 15x slower (81 s vs 5.4 s, measured)
        with limited_threads(1):
            for k, (train, test) in enumerate(splits):
                probs[test] = fit_predict_mlp(
                    features[train], labels[train], features[test], n_classes, seed + k
                )
    return probs


def cleaning_model(params: LabelParams) -> str:
    """The cleaning model to use, "early", "cnn" or "mlp": params.model, where "auto" means
    the early-learning CNN at every size (the tables above)."""
    return "early" if params.model == "auto" else params.model


def early_epochs(params: LabelParams, n_rows: int) -> int:
    """The early-learning CNN's epochs on n_rows: params.early_row_passes rows seen in all
    (5 epochs of 60k rows), at least 1, at most params.early_max_epochs (40 on a small
    catalogue, see the tables above)."""
    return max(1, min(params.early_max_epochs, round(params.early_row_passes / max(n_rows, 1))))


def fit_predict_cnn(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    n_classes: int,
    params: LabelParams,
    seed: int,
    progress: bool | str = False,
    epochs: int | None = None,
) -> np.ndarray:
    """Train the compact CNN on (x_train, y_train) (uint8 N×H×W×C) for `epochs` (default
    params.cnn_epochs); probabilities for x_test. The training stage's defaults
    (augmentation, label smoothing, one-cycle AdamW) with the cleaning stage's width; no
    early stopping, a 2% validation split only to pick the best epoch."""
    w = params.cnn_width  # the stage layout its F1 figures were measured with
    epochs = epochs or params.cnn_epochs
    run = TrainParams(
        backbone="cnn",
        cnn_widths=[w, 2 * w, 4 * w],
        cnn_depths=[2, 2, 1],
        image_size=x_train.shape[1],
        epochs=epochs,
        patience=epochs + 1,
        val_fraction=0.02,
        seed=seed,
    )
    with tempfile.TemporaryDirectory(prefix="vitrine-labels-") as tmp:
        result = training.train_model(
            x_train, y_train, run, n_classes, Path(tmp), progress=progress, pretrained=False
        )
    probs, _ = training.predict_batches(result.model, x_test)
    return probs.astype(np.float64)


def find_label_issues(
    manifest: pd.DataFrame, probs: np.ndarray, filter_by: str = "prune_by_noise_rate"
) -> pd.DataFrame:
    """One row per suspected mislabel, worst first (lowest self-confidence first).

    `filter_by` is cleanlab's flagging rule; "both" (flagged by the noise-rate AND the per-class
    rule) is the more precise one: measured in benchmarks/label_noise.py.
    """
    given = manifest["label"].to_numpy(dtype=np.int64)
    if len(given) != len(probs):
        raise ValueError(f"{len(given)} manifest rows but {len(probs)} probability rows")
    # n_jobs=1: cleanlab's default forks a multiprocessing pool, and a fork of this process
    # (torch / OpenMP threads running) once hung the retrain flow's test for 20 minutes
    ranked = cleanlab.filter.find_label_issues(
        given, probs, filter_by=filter_by, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    quality = cleanlab.rank.get_label_quality_scores(given, probs)
    ranked = np.asarray(ranked, dtype=np.int64)
    suggested = probs[ranked].argmax(axis=1)
    return pd.DataFrame(
        {
            "product_id": manifest["product_id"].to_numpy()[ranked].astype(str),
            "given_label": given[ranked],
            "suggested_label": suggested.astype(np.int64),
            "suggested_confidence": probs[ranked, suggested].astype(float),
            "label_quality": quality[ranked].astype(float),
        },
        columns=ISSUE_COLUMNS,
    )


def clean_labels(
    manifest: pd.DataFrame, images: np.ndarray, params: LabelParams, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The whole cleaning stage: (training manifest after the policy, issues, summary).

    One entry point so the retrain flow and benchmarks/label_noise.py run the same code.
    `images` are the manifest's rows in order (uint8 N×H×W×C).
    """
    if len(images) != len(manifest):
        raise ValueError(f"{len(manifest)} manifest rows but {len(images)} images")
    probs = cleaning_probs(images, manifest["label"].to_numpy(), params, seed=seed)
    issues = find_label_issues(manifest, probs, filter_by=params.filter_by)
    cleaned, summary = apply_label_policy(manifest, issues, params)
    summary["model"] = cleaning_model(params)
    return cleaned, issues, summary


def apply_label_policy(
    manifest: pd.DataFrame, issues: pd.DataFrame, params: LabelParams
) -> tuple[pd.DataFrame, dict]:
    """The training manifest after the policy, and a summary of what it did.

    drop: flagged rows are removed. relabel: a flagged row whose suggested_confidence is at
    least params.relabel_min_confidence takes the suggested label (the old one kept in
    `original_label`, and `category` renamed when the manifest maps labels to names); the
    other flagged rows are removed. keep: the manifest is returned unchanged. Below
    params.review_below_rows rows, drop and relabel act as keep (policy "review": the flagged
    rows are a review queue, not trusted to the out-of-fold model) and the summary says why.
    """
    flagged = manifest["product_id"].isin(issues["product_id"])
    policy = params.policy
    if policy != "keep" and len(manifest) < params.review_below_rows:
        policy = "review"
    summary = {
        "policy": policy,
        "flagged": int(flagged.sum()),
        "dropped": 0,
        "relabelled": 0,
        "per_class": {
            int(k): int(v) for k, v in issues["given_label"].value_counts().sort_index().items()
        },
    }
    out = manifest.copy()
    if policy == "review":
        summary["review_reason"] = (
            f"{len(manifest)} training rows < labels.review_below_rows "
            f"({params.review_below_rows}): {params.policy} not applied, "
            f"{summary['flagged']} flagged rows kept for review"
        )
    if policy in ("keep", "review"):
        return out, summary
    relabel = issues[issues["suggested_confidence"] >= params.relabel_min_confidence]
    if params.policy == "drop":
        out = out[~flagged.to_numpy()].reset_index(drop=True)
        summary["dropped"] = summary["flagged"]
        return out, summary
    new_label = out["product_id"].map(relabel.set_index("product_id")["suggested_label"])
    change = new_label.notna().to_numpy()
    out["original_label"] = out["label"]
    if change.any():
        names = _label_names(manifest)
        out.loc[change, "label"] = new_label[change].astype(np.int64)
        if names and "category" in out.columns:
            out.loc[change, "category"] = out.loc[change, "label"].map(names).fillna("")
    keep = ~flagged.to_numpy() | change
    summary["dropped"] = int((~keep).sum())
    summary["relabelled"] = int(change.sum())
    out = out[keep].reset_index(drop=True)
    return out.astype({"label": "int64", "original_label": "int64"}), summary


def _label_names(manifest: pd.DataFrame) -> dict[int, str]:
    """label → category name as the manifest itself pairs them (empty without `category`)."""
    if "category" not in manifest.columns:
        return {}
    pairs = manifest[["label", "category"]].drop_duplicates("label")
    return dict(zip(pairs["label"].astype(int), pairs["category"], strict=True))
