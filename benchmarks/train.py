"""Accuracy per CPU-minute: vitrine's default training configuration against baselines trained
in the same run, on the standard Fashion-MNIST split (60,000 train / 10,000 test images, the
split of the benchmark table's anchors: 2-conv CNN 0.925, ResNet18 + augmentation 0.949,
MobileNet 0.950, WRN-28-10 0.963, all with GPU budgets).

vitrine: components.model.training.train_model with params.yaml's `train` section, the loop's own
code path; --budget-minutes sets the number of epochs from timed probes of real training
steps at each input size the run uses (progressive resizing trains the early epochs on
smaller images), so the one-cycle schedule ends inside the budget (early stopping is off: the
budget decides). The images go through the configured preprocessing (`train.preprocess`) and,
with `train.shopper_share`, training swaps in the same shopper-style views as the loop's
(rendered once before the clock starts: `prepare_minutes`, like the loop's cached decode).
The JSON records the probed and the measured seconds per epoch and size.
Baselines: logistic regression on raw pixels; frozen ImageNet EfficientNet-Lite0 features
(64 px, the shipped weights) + a logistic-regression head. Each row prints test accuracy,
macro-F1, Recall@1 (test images as queries against the train embeddings, same category =
relevant) and wall time.

    python benchmarks/train.py --budget-minutes 20 --json bench-train.json
    python benchmarks/train.py --curve 5,10,20          # accuracy at each budget
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.config import Params, TrainParams, load_params  # noqa: E402
from components.data.catalogue import load_fashion_mnist  # noqa: E402
from components.model import shopper, training  # noqa: E402
from components.model.evaluation import retrieval_metrics  # noqa: E402
from components.model.models import EfficientNetTrunk  # noqa: E402
from components.model.transforms import image_to_uint8, to_tensor  # noqa: E402

# The probes come out about 3% under a full run's epochs (55.0 s probed against 56.5 s measured
# at 28 px); the rest of the factor is a margin so a budget run ends inside its budget. (×1.12,
# set for earlier probes, left 8% of a 20-minute budget unused.)
PROBE_MARGIN = 1.05


def probe_epoch_seconds(
    images: np.ndarray,
    labels: np.ndarray,
    params: TrainParams,
    size: int,
    views: np.ndarray | None = None,
) -> float:
    """Seconds per epoch at `size` px from two timed probes of real training steps (10 and
    50 batches) after an untimed warm-up one: their difference is the per-batch cost, the
    rest (validating the held-out rows) the fixed part of an epoch. (With 10 and 40 batches
    and no warm-up, one run's probes put a 20 px epoch at 18.7 s; it took 32.8.)"""

    def probe(batches: int) -> float:
        run = params.model_copy(
            update={
                "epochs": 1,
                "max_batches_per_epoch": batches,
                "image_size": size,
                "progressive_sizes": [],
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            result = training.train_model(
                images, labels, run, 10, Path(tmp), progress=False, pretrained=False, views=views
            )
        return result.history[0]["seconds"]

    probe(3)
    short, long = probe(10), probe(50)
    per_step = max(long - short, 1e-3) / 40
    fixed = max(short - 10 * per_step, 0.0)
    steps = math.ceil(len(images) * (1 - params.val_fraction) / params.batch_size)
    return (per_step * steps + fixed) * PROBE_MARGIN


def plan_epochs(budget_s: float, epoch_s: dict[int, float], params: TrainParams) -> int:
    """The most epochs whose summed probed cost fits the budget (at least 1); under
    progressive resizing each epoch costs what its size costs, and more epochs shift the
    phase boundaries, so the sum is recomputed per candidate."""

    def cost(epochs: int) -> float:
        run = params.model_copy(update={"epochs": epochs})
        return sum(epoch_s[training.epoch_size(run, e)] for e in range(epochs))

    epochs = 1
    while cost(epochs + 1) <= budget_s:
        epochs += 1
    return epochs


def prepare(data: dict, params: TrainParams) -> tuple[dict, np.ndarray | None, float, Any]:
    """(the splits through the configured preprocessing, the training rows' shopper-style
    views or None, seconds spent, the learned segmenter or None): what the loop's train stage
    hands training. With canonical preprocessing and train.segmenter on, the segmenter is
    trained first on the training split (its own budget, counted in the seconds) and every
    image and view is canonicalised with it, as the train stage does."""
    start = time.perf_counter()
    canonical = params.preprocess == "canonical"
    segmenter = None
    if canonical and params.segmenter.enabled:
        from components.model.segmenter_training import train_from_params

        segmenter, _ = train_from_params(list(data["train"][0]), params.segmenter, params.seed)
    out = {}
    for split, (x, y) in data.items():
        if canonical:
            x = np.stack(
                [image_to_uint8(Image.fromarray(im[..., 0]), 28, 1, True, segmenter) for im in x]
            )
        out[split] = (x, y)
    views = None
    if params.shopper_share > 0:
        views = shopper.render_views(
            list(data["train"][0]),
            params.seed,
            28,
            1,
            canonical,
            processes=1 if segmenter is not None else None,  # torch after a fork can deadlock
            progress=False,
            weights=params.shopper_weights,
            segment=segmenter,
        )
    return out, views, time.perf_counter() - start, segmenter


def train_budgeted(
    x_train: np.ndarray,
    y_train: np.ndarray,
    params: TrainParams,
    budget_min: float,
    views: np.ndarray | None = None,
) -> tuple[training.TrainResult, dict]:
    """Train with as many epochs as the probes fit in the budget; (result, timing record)."""
    sizes = sorted({*params.progressive_sizes, params.image_size})
    epoch_s = {s: probe_epoch_seconds(x_train, y_train, params, s, views) for s in sizes}
    epochs = plan_epochs(budget_min * 60, epoch_s, params)
    run = params.model_copy(update={"epochs": epochs, "patience": epochs + 1})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = training.train_model(
            x_train, y_train, run, 10, Path(tmp), progress=False, pretrained=False, views=views
        )
    return result, {
        "train_minutes": round((time.perf_counter() - start) / 60, 2),
        "epochs": epochs,
        "epoch_sizes": [h["size"] for h in result.history],
        "probe_margin": PROBE_MARGIN,
        "epoch_seconds_probe": {str(size): round(s, 1) for size, s in epoch_s.items()},
        "epoch_seconds": {
            str(size): round(
                float(np.mean([h["seconds"] for h in result.history if h["size"] == size])), 1
            )
            for size in sorted({h["size"] for h in result.history})
        },
    }


def train_and_score(
    data: dict, params: TrainParams, budget_min: float
) -> tuple[torch.nn.Module, np.ndarray, dict]:
    """Prepare, train in the budget, score on the test split: (model, the training rows'
    embeddings (the catalogue searched), test scores + timing)."""
    prepared, views, prepare_s, segmenter = prepare(data, params)
    (x_train, y_train), (x_test, y_test) = prepared["train"], prepared["test"]
    result, timing = train_budgeted(x_train, y_train, params, budget_min, views)
    result.model.segmenter = segmenter  # evaluation's model_input canonicalises with it
    probs, test_emb = training.predict_batches(result.model, x_test)
    _, train_emb = training.predict_batches(result.model, x_train)
    row = {
        **scores(y_test, probs.argmax(1), test_emb, train_emb, y_train),
        **timing,
        "prepare_minutes": round(prepare_s / 60, 2),
    }
    return result.model, train_emb, row


def train_vitrine(data: dict, params: TrainParams, budget_min: float) -> dict:
    return train_and_score(data, params, budget_min)[2]


def load_splits(params_path: Path | None) -> tuple[Params, dict]:
    """(params, {split: (images N×28×28×1 uint8, labels int64)}) of the standard split; torch
    on every core training uses."""
    torch.set_num_threads(training.count_threads())
    params = load_params(params_path)
    fm = load_fashion_mnist(params.data.fashion_mnist_dir)
    return params, {split: (x[..., None], y.astype(np.int64)) for split, (x, y) in fm.items()}


def scores(y_test, predicted, test_emb, train_emb, y_train) -> dict:
    r1 = retrieval_metrics(test_emb, y_test, train_emb, y_train, ks=(1,))["recall_at_1"]
    return {
        "accuracy": round(float((predicted == y_test).mean()), 4),
        "macro_f1": round(float(f1_score(y_test, predicted, average="macro")), 4),
        "recall_at_1": round(float(r1), 4),
    }


def normalise(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def logistic_head(train_x, y_train, test_x, y_test, seconds: float) -> dict:
    start = time.perf_counter()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    head = LogisticRegression(max_iter=200)
    head.fit((train_x - mean) / std, y_train)
    predicted = head.predict((test_x - mean) / std)
    minutes = (seconds + time.perf_counter() - start) / 60
    return {
        **scores(y_test, predicted, normalise(test_x), normalise(train_x), y_train),
        "train_minutes": round(minutes, 2),
    }


def efficientnet_features(images: np.ndarray, size: int = 64) -> np.ndarray:
    trunk = EfficientNetTrunk(image_size=size, pretrained=True).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), 256):
            x = to_tensor(images[start : start + 256])
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
            out.append(trunk(x.repeat(1, 3, 1, 1)).numpy())
    return np.concatenate(out)


def baselines(data: dict, skip_efficientnet: bool) -> dict:
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    out = {
        "logreg_pixels": logistic_head(
            x_train.reshape(len(x_train), -1).astype(np.float32),
            y_train,
            x_test.reshape(len(x_test), -1).astype(np.float32),
            y_test,
            0.0,
        )
    }
    print(f"  logreg on pixels: {out['logreg_pixels']}", flush=True)
    if not skip_efficientnet:
        start = time.perf_counter()
        f_train, f_test = efficientnet_features(x_train), efficientnet_features(x_test)
        seconds = time.perf_counter() - start
        out["efficientnet_lite0_frozen_linear"] = logistic_head(
            f_train, y_train, f_test, y_test, seconds
        )
        print(
            f"  frozen EfficientNet-Lite0 + linear: {out['efficientnet_lite0_frozen_linear']}",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument(
        "--curve",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="train once per budget, e.g. 5,10,20 (replaces --budget-minutes)",
    )
    parser.add_argument("--skip-efficientnet", action="store_true")
    parser.add_argument(
        "--params", type=Path, default=None, help="params.yaml (default: the repo's)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    params, data = load_splits(args.params)
    config = params.train.model_dump(exclude={"max_batches_per_epoch"})
    print(f"vitrine default config: {config}; {torch.get_num_threads()} threads", flush=True)
    budgets = args.curve or [args.budget_minutes]
    curve = {}
    for budget in budgets:
        curve[str(budget)] = train_vitrine(data, params.train, budget)
        print(f"  vitrine, budget {budget} min: {curve[str(budget)]}", flush=True)
    base = baselines(data, args.skip_efficientnet)
    head = curve[str(max(budgets))]
    result = {
        **head,
        "budget_minutes": max(budgets),
        "config": config,
        "curve": curve if len(budgets) > 1 else None,
        "baselines": {name: row["accuracy"] for name, row in base.items()},
        "baseline_rows": base,
        "cpu_threads": torch.get_num_threads(),
    }
    print(f"\n{'model':<36}{'accuracy':>9}{'macro-F1':>10}{'R@1':>8}{'minutes':>9}")
    rows = [(f"vitrine {b} min ({r['epochs']} epochs)", r) for b, r in curve.items()]
    rows += list(base.items())
    for name, row in rows:
        print(
            f"{name:<36}{row['accuracy']:>9}{row['macro_f1']:>10}{row['recall_at_1']:>8}"
            f"{row['train_minutes']:>9}"
        )
    for name, row in base.items():
        print(f"vitrine / {name}: accuracy ×{head['accuracy'] / row['accuracy']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
