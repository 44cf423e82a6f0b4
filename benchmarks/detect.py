"""Products in a busy photo (issue 18): the champion's detector with its own classifier and
index, against a classical baseline in the same run.

It measures the champion of the local registry (`make run` first; its state folder is
$VITRINE_HOME or .vitrine), loaded as the service loads it (bentos/loader.py: the served model,
the detector pickled with it, the version's index), on --test-scenes held-out scenes of 2-5
products composed from the frozen test split only (components/model/scenes.py), 512 x 384 px:

- mAP@0.5 and mAP@0.5:0.95, class-agnostic (is each product found: COCO style,
  components/model/detection_metrics.py), and the same with the classifier's categories;
- per item matched at IoU 0.5: category accuracy, and Recall@1 (the crop's embedding searched
  against the catalogue's training-split products; a hit when the nearest one has the item's
  category, as the evaluate stage counts Recall@1); the share of items found;
- the time of one /detect answer without HTTP: detection, each crop classified, each item's 5
  most similar products searched in the index, on scenes of exactly 3 products, one thread
  per call as the service runs it (serving.threads).

The baseline in the same run: connected regions unlike the photo's border colour
(components/model/detection.propose_components), each classified and searched the same way.
Goals of the issue: mAP@0.5 >= 0.90, item accuracy >= 0.90 x the classifier's in-domain
accuracy, item Recall@1 >= 0.85, p50 <= 40 ms; the detector's training adds at most 4 minutes
to `make run` (the version's detect_train_seconds, printed).

    python benchmarks/detect.py --json bench-detect.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bentos.loader import ModelLoader  # noqa: E402
from components.config import (  # noqa: E402
    configure_environment,
    load_params,
    state_paths,
)
from components.model.detection import (  # noqa: E402
    detect_items,
    evaluate_detection,
    propose_components,
)
from components.model.detector import Detector, detector_of  # noqa: E402
from components.model.detector_training import scene_products  # noqa: E402
from components.model.scenes import compose_scenes  # noqa: E402
from components.release.registry import open_registry  # noqa: E402


class Baseline(Detector):
    """The classical proposals (propose_components) in the detector's place."""

    def __init__(self) -> None:  # no network: nothing to initialise
        pass

    def detect(self, photo, top_k: int = 20):
        return propose_components(photo, max_items=top_k)


def rounded(metrics: dict) -> dict:
    names = {
        "detect_map50": "map50",
        "detect_map50_95": "map50_95",
        "detect_map50_categories": "map50_categories",
        "detect_item_found": "item_found",
        "detect_item_accuracy": "item_accuracy",
        "detect_item_recall_at_1": "item_recall_at_1",
    }
    return {short: round(float(metrics[long]), 4) for long, short in names.items()}


def answer_ms(detector, bundle, scenes, k: int, max_items: int, nms_iou: float) -> list[float]:
    """Milliseconds of one /detect answer per scene (without HTTP and JSON)."""
    times = []
    for scene in scenes:
        start = time.perf_counter()
        items = detect_items(detector, bundle.model, scene.photo, max_items, nms_iou)
        for item in items:
            bundle.index.search(item.embedding, k)
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--latency-scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    paths = state_paths()
    configure_environment(paths)
    params = load_params()
    registry = open_registry(paths, params)
    version = registry.alias_version("champion")
    if version is None:
        sys.exit("no champion in the local registry: run `make run` first")
    info = registry.version_info(version)
    loader = ModelLoader(paths, params, None, params.serving.variant, "off")
    bundle = loader.load_bundle(registry, version)
    detector = detector_of(bundle.torch_model)
    if detector is None:
        sys.exit(f"champion version {version} has no detector (detect.enabled was false)")
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = registry.download_index(version, registry.index_revision(version), Path(tmp))
        products = pd.read_parquet(index_dir / "products.parquet")
        embeddings = np.load(index_dir / "embeddings.npy")
    catalogue_dir = params.data.catalogue_path()
    in_catalogue = (products["split"] == "train").to_numpy()
    test = products[~in_catalogue].reset_index(drop=True)
    images, labels = scene_products(
        [catalogue_dir / p for p in test["path"]], test["label"].tolist(), args.seed
    )
    scenes = compose_scenes(
        images, labels, args.test_scenes, args.seed, items=(2, 5), size=(512, 384)
    )
    three = compose_scenes(
        images, labels, args.latency_scenes, args.seed + 1, items=(3, 3), size=(512, 384)
    )
    settings = params.detect
    torch.set_num_threads(max(1, params.serving.threads))  # as each service call runs
    catalogue = (embeddings[in_catalogue], products.loc[in_catalogue, "label"].to_numpy())
    rows = {}
    for name, boxes in (("detector", detector), ("baseline", Baseline())):
        result = evaluate_detection(
            boxes, bundle.model, scenes, *catalogue, settings.max_items, settings.nms_iou
        )
        ms = answer_ms(boxes, bundle, three, 5, settings.max_items, settings.nms_iou)
        rows[name] = rounded(result.metrics) | {
            "p50_ms": round(float(np.median(ms)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
        }
    in_domain = float(info["metrics"].get("accuracy", float("nan")))
    row = {
        **rows["detector"],
        "baseline": rows["baseline"],
        "map50_x_baseline": round(
            rows["detector"]["map50"] / max(rows["baseline"]["map50"], 1e-9), 2
        ),
        "classifier_accuracy": in_domain,
        "item_accuracy_x_classifier": round(rows["detector"]["item_accuracy"] / in_domain, 4),
        "detect_train_seconds": info["metrics"].get("detect_train_seconds"),
        "model_version": version,
        "variant": bundle.variant,
        "test_scenes": args.test_scenes,
        "latency_scenes": args.latency_scenes,
        "threads": torch.get_num_threads(),
    }
    print(
        f"champion version {version} ({bundle.variant}), {args.test_scenes} held-out scenes of 2-5 products, 512x384:"
    )
    print(
        f"{'':10} {'mAP@0.5':>8} {'@.5:.95':>8} {'classes':>8} {'found':>7} {'item acc':>9} {'item R@1':>9} {'p50 ms':>7} {'p95 ms':>7}"
    )
    for name, r in rows.items():
        print(
            f"{name:10} {r['map50']:8.4f} {r['map50_95']:8.4f} {r['map50_categories']:8.4f} "
            f"{r['item_found']:7.4f} {r['item_accuracy']:9.4f} {r['item_recall_at_1']:9.4f} "
            f"{r['p50_ms']:7.2f} {r['p95_ms']:7.2f}"
        )
    print(
        f"mAP@0.5 x{row['map50_x_baseline']} the baseline; item accuracy "
        f"x{row['item_accuracy_x_classifier']} the classifier's in-domain {in_domain:.4f}; the "
        f"detector stage took {row['detect_train_seconds']} s of the run "
        f"(p50/p95: one answer of 3 products, {row['threads']} thread)"
    )
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
