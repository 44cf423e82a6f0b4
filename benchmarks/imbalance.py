"""Does the training stage's imbalance handling pay? Subsample three Fashion-MNIST classes to
--keep (5%) of their training rows, then train twice with components.model.training.train_model and
params.yaml's `train` section: once with `class_weights: none` (the baseline) and once with the
stage's own handling (`class_weights: auto`). Both are tested on the frozen, balanced test split
(t10k, 1,000 per class): macro-F1, accuracy and per-class precision / recall / F1.

The default minority classes are Shirt, Coat and Sneaker: each has a confusable partner that
stays in the majority (T-shirt/top, Pullover, Ankle boot), which is where a model trained on
skewed data gives the rare class away.

Goal (issue 5): the handling raises the minority classes' F1.

    python benchmarks/imbalance.py --json bench-imbalance.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support

from components.config import TrainParams, load_params
from components.data import catalogue
from components.model import training


def imbalanced_subset(
    labels: np.ndarray, minority: list[int], keep: float, seed: int
) -> np.ndarray:
    """Sorted row indices: every row of the other classes, round(keep·n) of each minority."""
    rng = np.random.default_rng(seed)
    rows = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if cls in minority:
            members = rng.choice(members, size=max(1, round(keep * len(members))), replace=False)
        rows.append(members)
    return np.sort(np.concatenate(rows))


def train_and_score(
    images: np.ndarray,
    targets: np.ndarray,
    params: TrainParams,
    test: tuple[np.ndarray, np.ndarray],
    names: list[str],
    checkpoints: Path | None,
) -> dict:
    """Train with the training stage's function; per-class and macro scores on the test split.
    With `checkpoints` an interrupted run resumes (train_model checks the fingerprint)."""
    keep = contextlib.nullcontext(str(checkpoints)) if checkpoints else None
    with keep or tempfile.TemporaryDirectory(prefix="vitrine-bench-") as ckpt:
        result = training.train_model(
            images, targets, params, len(names), Path(ckpt), progress=False
        )
    probs, _ = training.predict_batches(result.model, test[0])
    pred, truth = probs.argmax(1), test[1]
    classes = list(range(len(names)))
    p, r, f, _ = precision_recall_fscore_support(truth, pred, labels=classes, zero_division=0)
    return {
        "macro_f1": float(f1_score(truth, pred, labels=classes, average="macro")),
        "accuracy": float((pred == truth).mean()),
        "per_class": {
            names[c]: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c])}
            for c in classes
        },
        "class_weights": result.class_weights,
        "best_epoch": result.best_epoch,
        "train_seconds": result.train_seconds,
    }


def print_table(runs: dict, names: list[str], minority: list[int]) -> None:
    base, handled = runs["without"], runs["with"]
    print(
        f"\n{'class':<13} {'F1 none':>8} {'F1 auto':>8} {'gain':>7}   "
        f"{'P none':>6} {'P auto':>6} {'R none':>6} {'R auto':>6}"
    )
    for c, name in enumerate(names):
        b, h = base["per_class"][name], handled["per_class"][name]
        mark = " *" if c in minority else ""
        print(
            f"{name + mark:<13} {b['f1']:8.4f} {h['f1']:8.4f} {h['f1'] - b['f1']:+7.4f}   "
            f"{b['precision']:6.3f} {h['precision']:6.3f} {b['recall']:6.3f} "
            f"{h['recall']:6.3f}"
        )
    for key in ("macro_f1", "accuracy", "minority_f1"):
        ratio = f"{handled[key] / base[key]:.3f}" if base[key] else "n/a"
        print(
            f"{key:<13} {base[key]:8.4f} {handled[key]:8.4f} {handled[key] - base[key]:+7.4f}"
            f"   (ratio {ratio})"
        )
    print(
        "* = minority class (subsampled); none = class_weights none (baseline), auto = the "
        "training stage's handling"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minority", default="Shirt,Coat,Sneaker", help="comma-separated categories")
    p.add_argument("--keep", type=float, default=0.05, help="share of each minority class kept")
    p.add_argument(
        "--train-size",
        type=int,
        default=0,
        help="stratified subset of the 60k train split before subsampling (0 = all)",
    )
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        help="keep training checkpoints here so a re-run resumes (default: temp)",
    )
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    names = params.data.categories
    unknown = [c for c in args.minority.split(",") if c not in names]
    if unknown:
        raise SystemExit(f"unknown categories {unknown}; choose from {names}")
    minority = [names.index(c) for c in args.minority.split(",")]
    data = catalogue.load_fashion_mnist(Path(params.data.fashion_mnist_dir))
    images, labels = data["train"][0][..., None], data["train"][1].astype(np.int64)
    if args.train_size:
        rng = np.random.default_rng(args.seed)
        pick = np.concatenate(
            [
                rng.permutation(np.flatnonzero(labels == c))[
                    : round(args.train_size * (labels == c).mean())
                ]
                for c in range(len(names))
            ]
        )
        images, labels = images[np.sort(pick)], labels[np.sort(pick)]
    rows = imbalanced_subset(labels, minority, args.keep, args.seed)
    counts = np.bincount(labels[rows], minlength=len(names))
    print(f"training rows per class: {dict(zip(names, counts.tolist(), strict=True))}", flush=True)
    test = (data["test"][0][..., None], data["test"][1].astype(np.int64))
    runs = {}
    for key, mode in (("without", "none"), ("with", "auto")):
        train_params = params.train.model_copy(
            update={"epochs": args.epochs, "class_weights": mode}
        )
        ckpt = args.checkpoints and args.checkpoints / key
        runs[key] = train_and_score(images[rows], labels[rows], train_params, test, names, ckpt)
        runs[key]["minority_f1"] = float(
            np.mean([runs[key]["per_class"][names[c]]["f1"] for c in minority])
        )
        print(
            f"class_weights {mode}: macro-F1 {runs[key]['macro_f1']:.4f} "
            f"({runs[key]['train_seconds']:.0f} s)",
            flush=True,
        )
    print_table(runs, names, minority)
    if args.json:
        out = {
            **runs,
            "minority": [names[c] for c in minority],
            "keep": args.keep,
            "train_counts": counts.tolist(),
            "epochs": args.epochs,
        }
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
