"""Products in a busy photo (issue 18): the detector's boxes against a classical baseline on
held-out composed scenes. So far the boxes only: the per-item category accuracy and Recall@1
come when the detector is wired to a model version's classifier and index.

The detector (components/model/detector.py) is trained by components/model/detector_training.py
for --budget-seconds on --scenes scenes composed from the first --train-products Fashion-MNIST
training images (1-5 products each, six kinds of background, looks as-is, dyed or
colour-mapped). It is measured on --test-scenes scenes of 2-5 products composed from the test
split only, at 512 x 384 px: class-agnostic mAP@0.5 and mAP@0.5:0.95 (COCO style,
components/model/detection_metrics.py), and the detector's latency per photo (one thread
pool of torch's default size, one photo at a time). The baseline in the same run: connected
regions unlike the photo's border colour (components/model/detection.propose_components).
Goals of the issue, for the boxes: mAP@0.5 >= 0.90 (there with categories), p50 <= 40 ms for
a 512 px photo of 3 products (there including each item's classification and search).

    python benchmarks/detect.py --json bench-detect.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from components.config import load_params, state_paths  # noqa: E402
from components.data.catalogue import load_fashion_mnist  # noqa: E402
from components.data.sources import fashion_mnist_dir  # noqa: E402
from components.model.detection import propose_components  # noqa: E402
from components.model.detection_metrics import (  # noqa: E402
    COCO_THRESHOLDS,
    Detections,
    mean_average_precision,
)
from components.model.detector_training import DetectorSettings, train_detector  # noqa: E402
from components.model.scenes import compose_scenes  # noqa: E402


def as_detections(boxes: list) -> Detections:
    arr = np.array([b.box for b in boxes], np.float64).reshape(-1, 4)
    return Detections(arr, np.zeros(len(boxes), int), np.array([b.score for b in boxes]))


def scores(truths: list[Detections], predictions: list[Detections]) -> dict:
    return {
        "map50": round(mean_average_precision(truths, predictions), 4),
        "map50_95": round(mean_average_precision(truths, predictions, COCO_THRESHOLDS), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--budget-seconds", type=float, default=240.0)
    parser.add_argument("--scenes", type=int, default=8000)
    parser.add_argument("--train-products", type=int, default=20000)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--min-score", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    data = load_fashion_mnist(fashion_mnist_dir(load_params().data, state_paths()))
    train = [Image.fromarray(a) for a in data["train"][0][: args.train_products]]
    settings = DetectorSettings(
        budget_seconds=args.budget_seconds, scenes=args.scenes, min_score=args.min_score
    )
    start = time.perf_counter()
    detector, summary = train_detector(train, [0] * len(train), settings, args.seed, log=print)
    summary["seconds_with_scenes"] = round(time.perf_counter() - start, 1)
    print(f"trained: {summary}", flush=True)

    test = [Image.fromarray(a) for a in data["test"][0]]
    scenes = compose_scenes(
        test, [0] * len(test), args.test_scenes, args.seed + 7, items=(2, 5), size=(512, 384)
    )
    truths, found, baseline, ms = [], [], [], []
    for scene in scenes:
        truths.append(Detections(scene.boxes, np.zeros(len(scene.boxes), int)))
        t0 = time.perf_counter()
        boxes = detector.detect(scene.photo)
        ms.append(1000 * (time.perf_counter() - t0))
        found.append(as_detections(boxes))
        baseline.append(as_detections(propose_components(scene.photo)))
    row = {
        **scores(truths, found),
        "p50_ms": round(float(np.median(ms)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "baseline": scores(truths, baseline),
        "training": summary,
        "test_scenes": args.test_scenes,
        "threads": torch.get_num_threads(),
        "boxes_only": True,
    }
    row["map50_x_baseline"] = round(row["map50"] / max(row["baseline"]["map50"], 1e-9), 2)
    print(
        f"boxes, class-agnostic, {args.test_scenes} test scenes of 2-5 products: detector "
        f"mAP@0.5 {row['map50']} (@0.5:0.95 {row['map50_95']}), baseline {row['baseline']['map50']} "
        f"({row['baseline']['map50_95']}): x{row['map50_x_baseline']}; detector p50 "
        f"{row['p50_ms']} ms, p95 {row['p95_ms']} ms a 512x384 photo"
    )
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
