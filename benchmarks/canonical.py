"""How close the canonical preprocessing brings a shopper-style photo to its catalogue image,
per shift, against plain preprocessing (pad + resize): model-free, in about a minute.

For --images test products (the evaluate stage's seeded, stratified sample), each shift of
components/model/shopper.py renders the photo. The photo and the catalogue image then both go
through the shared preprocessing to the default model's input (28 px grayscale). The score is
the Pearson correlation of the two inputs: 1.0 means that the model sees the catalogue image
again. The benchmark prints the median and the share below 0.8 for canonical and for plain
preprocessing, and the gain of the medians (canonical - plain; plain is the baseline). A
shift where canonical stays low is one that training's shopper-style views must teach
(train.shopper_weights, docs/shopper.md).

    python benchmarks/canonical.py --images 300 --json bench-canonical.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.config import SHOPPER_SHIFTS, load_params  # noqa: E402
from components.data.catalogue import load_fashion_mnist  # noqa: E402
from components.model import shopper  # noqa: E402
from components.model.evaluation import pick_shopper_rows  # noqa: E402
from components.model.transforms import image_to_uint8  # noqa: E402

LOW = 0.8  # a rendering whose correlation is below this counts as "not brought back"


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0  # a blank input: nothing of the product left
    return float(np.corrcoef(a, b)[0, 1])


def measure(images: list[Image.Image], ids: list[int], shift: str, seed: int) -> dict:
    scores: dict[str, list[float]] = {"canonical": [], "plain": []}
    start = time.perf_counter()
    for image, i in zip(images, ids, strict=True):
        photo = shopper.render(image, shift, shopper.shift_rng(seed, shift, i))
        for mode, canonical in (("canonical", True), ("plain", False)):
            seen = image_to_uint8(photo, 28, 1, canonical)
            catalogue = image_to_uint8(image, 28, 1, canonical)
            scores[mode].append(correlation(seen, catalogue))
    row = {"seconds": round(time.perf_counter() - start, 2)}
    for mode, values in scores.items():
        row[f"{mode}_median"] = round(float(np.median(values)), 4)
        row[f"{mode}_share_low"] = round(float(np.mean(np.array(values) < LOW)), 4)
    # a difference, not a ratio: plain's correlation is negative on light backgrounds
    row["median_gain"] = round(row["canonical_median"] - row["plain_median"], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    params = load_params(args.params)
    x_test, y_test = load_fashion_mnist(params.data.fashion_mnist_dir)["test"]
    seed = params.evaluation.shopper.seed
    rows = pick_shopper_rows(y_test, args.images, seed)
    images = [Image.fromarray(x_test[i]) for i in rows]
    print(f"{len(rows)} test products per shift; correlation with the catalogue image's input")
    print(f"{'shift':<22}{'canonical':>10}{'< 0.8':>7}{'plain':>8}{'< 0.8':>7}{'gain':>7}")
    result = {}
    for shift in SHOPPER_SHIFTS:
        r = result[shift] = measure(images, [int(i) for i in rows], shift, seed)
        print(
            f"{shift:<22}{r['canonical_median']:>10.3f}{r['canonical_share_low']:>7.2f}"
            f"{r['plain_median']:>8.3f}{r['plain_share_low']:>7.2f}{r['median_gain']:>+7.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"images": len(rows), "shifts": result}, indent=2))


if __name__ == "__main__":
    main()
