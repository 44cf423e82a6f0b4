"""The shopper's photo: vitrine's default model against today's default before the
shopper's-photo work (the baseline: plain preprocessing, no shopper-style views), both trained
in the same run with the same budget of benchmarks/train.py, measured on the catalogue's own
test split (in-domain) and on the shopper-style photos of the evaluate stage.

Both models train on the full Fashion-MNIST training split (60,000 images) for
--budget-minutes each (epochs planned from timed probes, benchmarks/train.py); the vitrine
model with params.yaml's `train` section (canonical preprocessing, shopper-style views), the
baseline with `preprocess: plain, shopper_share: 0`. Then a seeded, stratified sample of
--images test products is rendered under every shift of components/model/shopper.py and
scored by the evaluate stage's own code (components/model/evaluation.evaluate_shopper):
accuracy, macro-F1 and Recall@1 (the photo searched against the 60,000 training images,
same category = relevant), each shift's ratio to in-domain, and vitrine's ratio to the
baseline. Goals (issue: the shopper's photo): every shift's accuracy >= 0.90 x in-domain and
Recall@1 >= 0.88 x in-domain, in-domain accuracy >= 0.94.

With `train.segmenter.enabled: true` in the --params file, the vitrine model first trains the
learned busy-background mask (its own budget, outside --budget-minutes) and is canonicalised,
trained and evaluated with it, as the train stage does (benchmarks/train.py prepare).

    python benchmarks/shopper.py --budget-minutes 20 --json bench-shopper.json
    python benchmarks/shopper.py --budget-minutes 1 --images 200     # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train import load_splits, train_and_score  # noqa: E402

from components.config import TrainParams  # noqa: E402
from components.model.evaluation import evaluate_shopper, pick_shopper_rows  # noqa: E402

GOAL_ACCURACY_RATIO = 0.90  # every shift's accuracy against in-domain
GOAL_RECALL_RATIO = 0.88  # every shift's Recall@1 against in-domain
GOAL_IN_DOMAIN = 0.94


def measure(name: str, data: dict, params: TrainParams, budget: float, shopper_set: dict) -> dict:
    """Train one configuration in the budget; its in-domain and per-shift scores."""
    print(f"{name}: training", flush=True)
    model, train_emb, row = train_and_score(data, params, budget)
    in_domain = {k: row.pop(k) for k in ("accuracy", "macro_f1", "recall_at_1")}
    y_train = data["train"][1]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shifts = evaluate_shopper(
            model,
            shopper_set["photos"],
            shopper_set["labels"],
            shopper_set["ids"],
            train_emb,
            y_train,
            shopper_set["categories"],
            shopper_set["shifts"],
            shopper_set["seed"],
            in_domain,
            Path(tmp),
        ).table
    row = {
        "in_domain": in_domain,
        "shifts": {
            r.shift: {
                "accuracy": round(float(r.accuracy), 4),
                "macro_f1": round(float(r.macro_f1), 4),
                "recall_at_1": round(float(r.recall_at_1), 4),
                "accuracy_ratio": round(float(r.accuracy_ratio), 4),
                "recall_ratio": round(float(r.recall_ratio), 4),
            }
            for r in shifts.itertuples()
        },
        "preprocess": params.preprocess,
        "shopper_share": params.shopper_share,
        **row,
        "shopper_minutes": round((time.perf_counter() - start) / 60, 2),
    }
    print(f"{name}: {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument(
        "--images", type=int, default=None, help="test products per shift (evaluation.shopper)"
    )
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    params, data = load_splits(args.params)
    config = params.evaluation.shopper
    x_test, y_test = data["test"][0][..., 0], data["test"][1]
    rows = pick_shopper_rows(y_test, args.images or config.images, config.seed)
    shopper_set = {
        "photos": [Image.fromarray(x_test[i]) for i in rows],
        "labels": y_test[rows].astype(np.int64),
        "ids": [f"test-{i}" for i in rows],
        "categories": [str(c) for c in range(10)],
        "shifts": list(config.shifts),
        "seed": config.seed,
    }
    print(
        f"{len(rows)} test products x {len(config.shifts)} shifts; "
        f"{args.budget_minutes} min each; {torch.get_num_threads()} threads",
        flush=True,
    )
    vitrine = measure("vitrine", data, params.train, args.budget_minutes, shopper_set)
    plain = params.train.model_copy(update={"preprocess": "plain", "shopper_share": 0.0})
    baseline = measure("baseline", data, plain, args.budget_minutes, shopper_set)

    print(
        f"\n{'shift':<22}{'accuracy':>9}{'x in-dom':>9}{'R@1':>8}{'x in-dom':>9}"
        f"{'base acc':>9}{'base R@1':>9}{'acc x base':>11}"
    )
    names = ["in_domain", *vitrine["shifts"]]
    for name in names:
        v = vitrine["in_domain"] if name == "in_domain" else vitrine["shifts"][name]
        b = baseline["in_domain"] if name == "in_domain" else baseline["shifts"][name]
        print(
            f"{name:<22}{v['accuracy']:>9.4f}{v.get('accuracy_ratio', 1.0):>9.3f}"
            f"{v['recall_at_1']:>8.4f}{v.get('recall_ratio', 1.0):>9.3f}"
            f"{b['accuracy']:>9.4f}{b['recall_at_1']:>9.4f}"
            f"{v['accuracy'] / max(b['accuracy'], 1e-9):>11.2f}"
        )
    worst_acc = min(s["accuracy_ratio"] for s in vitrine["shifts"].values())
    worst_r1 = min(s["recall_ratio"] for s in vitrine["shifts"].values())
    goals = {
        "accuracy_ratio_min": worst_acc,
        "recall_ratio_min": worst_r1,
        "every_shift_accuracy": worst_acc >= GOAL_ACCURACY_RATIO,
        "every_shift_recall_at_1": worst_r1 >= GOAL_RECALL_RATIO,
        "in_domain_accuracy": vitrine["in_domain"]["accuracy"] >= GOAL_IN_DOMAIN,
    }
    print(
        f"\nworst shift: accuracy x{worst_acc:.3f} of in-domain (goal {GOAL_ACCURACY_RATIO}), "
        f"Recall@1 x{worst_r1:.3f} (goal {GOAL_RECALL_RATIO}); in-domain accuracy "
        f"{vitrine['in_domain']['accuracy']:.4f} (goal {GOAL_IN_DOMAIN})"
    )
    result = {
        **vitrine,
        "baseline": baseline,
        "goals": goals,
        "images_per_shift": len(rows),
        "budget_minutes": args.budget_minutes,
        "cpu_threads": torch.get_num_threads(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
