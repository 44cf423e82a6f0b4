"""Feasibility of a LEARNED product segmenter for canonical preprocessing on busy backgrounds
(issue 14): is a tiny network's mask better than `busy_mask`'s colour-palette heuristic, and
cheap enough to serve?

Masks are known by construction (shopper.render_with_mask). The script trains the library's
segmenter (components/model/segmenter_training.py: `train_segmenter`, what the train stage runs when
params train.segmenter is on), which
  1. renders --views shopper views of TRAINING-split products under every setting shift
     (--busy-share of them busy, the rest spread over white, light, textured, colour_tint,
     colour_photo and phone; --colour-share of them with the product recoloured: tinted or
     colour-mapped), box-reduced to --side × --side RGB, with their true masks;
  2. trains a tiny fully-convolutional segmenter (a two-level U-Net, ~46k weights, a
     per-pixel product logit) on them for --train-seconds of one thread;
then
  3. on --images busy views of TEST-split products (the evaluate stage's seeded sample, the
     photos benchmarks/canonical.py scores), with the product as it is and recoloured
     (busy_background+tinted, +colour_mapped: a net that learned "grey = product" fails
     these), compares, against the true mask, the precision,
     recall and IoU of the heuristic mask and of the learned one (medians), and the
     canonical.py correlation of the canonical image to the catalogue image with the
     heuristic, the learned and the true mask (an upper bound) plugged into
     canonical_with_frame; the same for --others views of every other setting shift (the
     busy path also fires on some textured photos; elsewhere the masks are not used);
  4. times the segmenter per photo, one thread (resize + forward + mask), against busy_mask.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/segmenter_experiment.py \
        --train-seconds 480 --json bench-segmenter.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from canonical import correlation  # noqa: E402  (benchmarks/canonical.py's metric)

from components.config import load_params  # noqa: E402
from components.data.catalogue import load_fashion_mnist  # noqa: E402
from components.model import segmenter as segmenting  # noqa: E402
from components.model import segmenter_training, shopper  # noqa: E402
from components.model.evaluation import pick_shopper_rows  # noqa: E402
from components.model.transforms import (  # noqa: E402
    BUSY_SPREAD,
    LOCATE_MAX_SIDE,
    LUMA,
    busy_mask,
    canonical_with_frame,
    image_to_uint8,
    product_box,
)

# (shift, product look): busy photos of the product as it is and recoloured (the "grey =
# product" check: the catalogue's products are grey), then every other setting shift
CASES = [
    ("busy_background", "as_is"),
    ("busy_background", "tinted"),
    ("busy_background", "colour_mapped"),
    *((s, "as_is") for s in shopper.SETTINGS if s != "busy_background"),
]


def mask_scores(mask: np.ndarray | None, truth: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, IoU) of a mask against the true one (no mask: all zero)."""
    if mask is None or not mask.any():
        return 0.0, 0.0, 0.0
    hit = float((mask & truth).sum())
    return hit / mask.sum(), hit / max(truth.sum(), 1), hit / (mask | truth).sum()


def located(photo: Image.Image, truth: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """The photo (and its true mask) as canonical_with_frame locates on: box-reduced to at
    most LOCATE_MAX_SIDE px."""
    factor = max(1, max(photo.size) // LOCATE_MAX_SIDE)
    if factor == 1:
        return photo, truth
    small = photo.reduce(factor)
    return small, np.asarray(Image.fromarray(truth).resize(small.size, Image.NEAREST))


def evaluate(images, ids, shift: str, seed: int, segment, look: str = "as_is") -> dict:
    """Medians over the photos of `shift`: mask scores (heuristic, learned) against the true
    mask, and the canonical image's correlation to the catalogue image's (heuristic, learned,
    true mask), as benchmarks/canonical.py scores it; `busy_path`: the share of photos where
    canonical_with_frame takes the busy path (the ring's spread above BUSY_SPREAD). `look`:
    the product recoloured (shopper.LOOKS), e.g. a coloured product on clutter."""
    scores: dict[str, list] = {k: [] for k in ("heuristic", "learned", "busy_path")}
    canon: dict[str, list[float]] = {"heuristic": [], "learned": [], "true_mask": []}
    for image, i in zip(images, ids, strict=True):
        rng = shopper.shift_rng(seed, shift, i)
        photo, truth = shopper.render_with_mask(image, shift, rng, look)
        small, truth = located(photo, truth)
        rgb = np.asarray(small).astype(np.float32)
        scores["busy_path"].append(product_box(rgb @ LUMA)[1] > BUSY_SPREAD)
        scores["heuristic"].append(mask_scores(busy_mask(rgb), truth))
        scores["learned"].append(mask_scores(segment(rgb), truth))
        catalogue = image_to_uint8(image, 28, 1, canonical=True)
        canon["heuristic"].append(correlation(image_to_uint8(photo, 28, 1, True), catalogue))
        for name, fn in (("learned", segment), ("true_mask", lambda _a, t=truth: t)):
            seen = canonical_with_frame(small, 28, "L", segment=fn)[0]
            canon[name].append(correlation(seen, catalogue))
    row: dict = {"photos": len(ids), "busy_path": round(float(np.mean(scores["busy_path"])), 3)}
    for name in ("heuristic", "learned"):
        p, r, iou = np.median(np.array(scores[name]), axis=0)
        row[name] = {"precision": round(p, 3), "recall": round(r, 3), "iou": round(iou, 3)}
    row["canonical_median"] = {k: round(float(np.median(v)), 4) for k, v in canon.items()}
    row["canonical_share_low"] = {
        k: round(float(np.mean(np.array(v) < 0.8)), 3) for k, v in canon.items()
    }
    return row


def time_masks(images, ids, seed: int, segment: segmenting.Segmenter) -> dict:
    """Per busy photo, one thread: p50/p90 ms of busy_mask, the segmenter's forward alone
    (a 64×64 input) and the whole learned mask (resize, forward, upsample, fill holes)."""
    side = segment.side
    model_input = segmenting.to_tensor(segmenting.to_input(np.zeros((side, side, 3)), side)[None])
    times: dict[str, list[float]] = {"busy_mask": [], "forward": [], "learned_mask": []}
    for image, i in zip(images, ids, strict=True):
        photo = shopper.render(
            image, "busy_background", shopper.shift_rng(seed, "busy_background", i)
        )
        rgb = np.asarray(photo).astype(np.float32)
        for name, call in (
            ("busy_mask", busy_mask),
            ("forward", lambda _rgb: segment.net(model_input)),
            ("learned_mask", segment),
        ):
            with torch.inference_mode():
                start = time.perf_counter()
                call(rgb)
                times[name].append((time.perf_counter() - start) * 1000)
    return {
        k: {
            "p50_ms": round(float(np.median(v)), 3),
            "p90_ms": round(float(np.percentile(v, 90)), 3),
        }
        for k, v in times.items()
    }


def print_table(result: dict) -> None:
    print(
        f"\n{'shift':<31}{'n':>4}{'busy':>6} | {'mask P / R / IoU heuristic':>27}"
        f" | {'learned':>19} | {'canonical corr. heur / learned / true':>38}"
    )
    for shift, r in result["shifts"].items():
        h, m, c = r["heuristic"], r["learned"], r["canonical_median"]
        print(
            f"{shift:<31}{r['photos']:>4}{r['busy_path']:>6.2f} | "
            f"{h['precision']:>11.3f} {h['recall']:.3f} {h['iou']:.3f} | "
            f"{m['precision']:.3f} {m['recall']:.3f} {m['iou']:.3f} | "
            f"{c['heuristic']:>22.3f} {c['learned']:.3f} {c['true_mask']:.3f}"
        )
    print("busy: share of photos on canonical's busy path; the heuristic mask is busy_mask on")
    print("every photo (canonical uses it only on the busy path, product_box elsewhere)")
    print("\nms per photo, one thread:", json.dumps(result["timing"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-seconds", type=float, default=480.0)
    parser.add_argument("--views", type=int, default=16000, help="training views rendered")
    parser.add_argument("--busy-share", type=float, default=0.4)
    parser.add_argument("--colour-share", type=float, default=0.5, help="recoloured products")
    parser.add_argument("--side", type=int, default=segmenting.SIDE)
    parser.add_argument("--images", type=int, default=300, help="busy test photos (per look)")
    parser.add_argument("--others", type=int, default=100, help="test photos per other shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params)
    data = load_fashion_mnist(params.data.fashion_mnist_dir)
    start = time.perf_counter()
    print(f"{args.views} training views, training {args.train_seconds:.0f} s")
    segment, trained = segmenter_training.train_segmenter(
        data["train"][0],
        args.train_seconds,
        args.seed,
        views=args.views,
        busy_share=args.busy_share,
        colour_share=args.colour_share,
        side=args.side,
        log=print,
    )
    x_test, y_test = data["test"]
    seed = params.evaluation.shopper.seed
    result = {"training": {**trained, "colour_share": args.colour_share, "side": args.side}}
    result["shifts"] = {}
    rows_for = {}
    for shift, look in CASES:
        n = args.images if shift == "busy_background" else args.others
        rows = rows_for.setdefault(n, [int(i) for i in pick_shopper_rows(y_test, n, seed)])
        images = [Image.fromarray(x_test[i]) for i in rows]
        name = shift if look == "as_is" else f"{shift}+{look}"
        result["shifts"][name] = evaluate(images, rows, shift, seed, segment, look)
        if name == "busy_background":
            result["timing"] = time_masks(images, rows, seed, segment)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
