"""Feasibility of a LEARNED product segmenter for canonical preprocessing on busy backgrounds
(issue 14): is a tiny network's mask better than `busy_mask`'s colour-palette heuristic, and
cheap enough to serve?

Masks are known by construction (shopper.render_with_mask). The script
  1. renders --views shopper views of TRAINING-split products under every setting shift
     (--busy-share of them busy, the rest spread over white, light, textured, colour_tint,
     colour_photo and phone), box-reduced to 64×64 RGB, with their true masks;
  2. trains a tiny fully-convolutional segmenter (a two-level U-Net, ~46k weights, a
     per-pixel product logit) on them for --train-seconds of one thread;
  3. on --images busy views of TEST-split products (the evaluate stage's seeded sample, the
     photos benchmarks/canonical.py scores) compares, against the true mask, the precision,
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
from scipy import ndimage
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from canonical import correlation  # noqa: E402  (benchmarks/canonical.py's metric)

from components.config import load_params  # noqa: E402
from components.data.catalogue import load_fashion_mnist  # noqa: E402
from components.model import shopper  # noqa: E402
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

SIDE = 64  # the segmenter's input: the photo box-reduced to SIDE×SIDE RGB


class TinySegmenter(nn.Module):
    """64×64 RGB → 64×64 product logits: one level at full size, two down (stride 2), dilated
    convolutions at 16 px for context, one skip back up at 32 px, logits upsampled to 64 px
    plus a 1×1 read-out of the full-size features (edges)."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.at64 = block(3, 12)
        self.at32 = nn.Sequential(block(12, width, 2), block(width, width))
        self.at16 = nn.Sequential(
            block(width, 32, 2), block(32, 32, dilation=2), block(32, 32, dilation=4)
        )
        self.merge = block(32 + width, width)
        self.head_half, self.head_full = nn.Conv2d(width, 1, 1), nn.Conv2d(12, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.at64(x)
        half = self.at32(full)
        up = nn.functional.interpolate(self.at16(half), scale_factor=2, mode="bilinear")
        logits = self.head_half(self.merge(torch.cat([up, half], 1)))
        logits = nn.functional.interpolate(logits, scale_factor=2, mode="bilinear")
        return (logits + self.head_full(full))[:, 0]


def to_input(rgb: np.ndarray) -> np.ndarray:
    """float/uint8 H×W×3 → uint8 SIDE×SIDE×3 (box filter)."""
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    return np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BOX))


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).float() - 127.0) / 128.0


def training_views(images: np.ndarray, n: int, seed: int, busy_share: float):
    """(uint8 n×64×64×3 inputs, uint8 n×64×64 target shares 0-255) of n distinct products."""
    rng = np.random.default_rng(seed)
    others = [s for s in shopper.SETTINGS if s != "busy_background"]
    odds = [busy_share] + [(1 - busy_share) / len(others)] * len(others)
    shifts = rng.choice(["busy_background", *others], size=n, p=odds)
    rows = rng.choice(len(images), size=n, replace=False)
    x = np.empty((n, SIDE, SIDE, 3), np.uint8)
    y = np.empty((n, SIDE, SIDE), np.uint8)
    for k, (row, shift) in enumerate(zip(rows, shifts, strict=True)):
        view = shopper.shift_rng(seed, f"segmenter-{shift}", int(row))
        photo, mask = shopper.render_with_mask(Image.fromarray(images[row]), shift, view)
        x[k] = to_input(np.asarray(photo))
        share = Image.fromarray(mask.astype(np.float32), "F").resize((SIDE, SIDE), Image.BOX)
        y[k] = np.clip(np.asarray(share) * 255 + 0.5, 0, 255).astype(np.uint8)
    return x, y


def train_segmenter(x: np.ndarray, y: np.ndarray, seconds: float, seed: int) -> dict:
    """Adam, batches of 32, random horizontal flips, learning rate cosine over the time budget;
    soft targets (the product's share of each 64-px cell), binary cross-entropy."""
    torch.manual_seed(seed)
    model, rng = TinySegmenter(), np.random.default_rng(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    start, steps, losses = time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in optimiser.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + np.cos(np.pi * elapsed / seconds))
        pick = rng.integers(0, len(x), 32)
        xb, yb = to_tensor(x[pick]), torch.from_numpy(y[pick]).float() / 255.0
        if rng.random() < 0.5:
            xb, yb = xb.flip(3), yb.flip(2)
        loss = nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        steps += 1
        if steps % 500 == 0:
            print(f"  step {steps}  {elapsed:.0f} s  loss {np.mean(losses[-500:]):.4f}")
    model.eval()
    summary = {"steps": steps, "samples": steps * 32, "final_loss": float(np.mean(losses[-200:]))}
    return {"model": model, **summary, "weights": sum(p.numel() for p in model.parameters())}


def learned_mask(model: nn.Module):
    """rgb float H×W×3 → bool H×W: probability > 0.5 at 64 px, upsampled, holes filled."""

    def segment(rgb: np.ndarray) -> np.ndarray | None:
        h, w = rgb.shape[:2]
        with torch.inference_mode():
            logits = model(to_tensor(to_input(rgb)[None]))[0].numpy()
        prob = Image.fromarray(logits.astype(np.float32), "F").resize((w, h), Image.BILINEAR)
        mask = ndimage.binary_fill_holes(np.asarray(prob) > 0)
        return mask if mask.any() else None

    return segment


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


def evaluate(images, ids, shift: str, seed: int, segment) -> dict:
    """Medians over the photos of `shift`: mask scores (heuristic, learned) against the true
    mask, and the canonical image's correlation to the catalogue image's (heuristic, learned,
    true mask), as benchmarks/canonical.py scores it; `busy_path`: the share of photos where
    canonical_with_frame takes the busy path (the ring's spread above BUSY_SPREAD)."""
    scores: dict[str, list] = {k: [] for k in ("heuristic", "learned", "busy_path")}
    canon: dict[str, list[float]] = {"heuristic": [], "learned": [], "true_mask": []}
    for image, i in zip(images, ids, strict=True):
        photo, truth = shopper.render_with_mask(image, shift, shopper.shift_rng(seed, shift, i))
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


def time_masks(images, ids, seed: int, model: nn.Module) -> dict:
    """Per busy photo, one thread: p50/p90 ms of busy_mask, the segmenter's forward alone
    (a 64×64 input) and the whole learned mask (resize, forward, upsample, fill holes)."""
    model_input = to_tensor(to_input(np.zeros((SIDE, SIDE, 3)))[None])
    times: dict[str, list[float]] = {"busy_mask": [], "forward": [], "learned_mask": []}
    segment = learned_mask(model)
    for image, i in zip(images, ids, strict=True):
        photo = shopper.render(
            image, "busy_background", shopper.shift_rng(seed, "busy_background", i)
        )
        rgb = np.asarray(photo).astype(np.float32)
        for name, call in (
            ("busy_mask", busy_mask),
            ("forward", lambda _rgb: model(model_input)),
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
        f"\n{'shift':<21}{'n':>4}{'busy':>6} | {'mask P / R / IoU heuristic':>27}"
        f" | {'learned':>19} | {'canonical corr. heur / learned / true':>38}"
    )
    for shift, r in result["shifts"].items():
        h, m, c = r["heuristic"], r["learned"], r["canonical_median"]
        print(
            f"{shift:<21}{r['photos']:>4}{r['busy_path']:>6.2f} | "
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
    parser.add_argument("--images", type=int, default=300, help="busy test photos")
    parser.add_argument("--others", type=int, default=100, help="test photos per other shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params)
    data = load_fashion_mnist(params.data.fashion_mnist_dir)
    start = time.perf_counter()
    x, y = training_views(data["train"][0], args.views, args.seed, args.busy_share)
    render_s = time.perf_counter() - start
    print(
        f"{args.views} training views rendered in {render_s:.0f} s; training {args.train_seconds:.0f} s"
    )
    trained = train_segmenter(x, y, args.train_seconds, args.seed)
    model = trained.pop("model")
    segment = learned_mask(model)
    x_test, y_test = data["test"]
    seed = params.evaluation.shopper.seed
    result = {"training": {**trained, "views": args.views, "render_seconds": round(render_s, 1)}}
    result["shifts"] = {}
    for shift in ["busy_background", *(s for s in shopper.SETTINGS if s != "busy_background")]:
        n = args.images if shift == "busy_background" else args.others
        rows = [int(i) for i in pick_shopper_rows(y_test, n, seed)]
        images = [Image.fromarray(x_test[i]) for i in rows]
        result["shifts"][shift] = evaluate(images, rows, shift, seed, segment)
        if shift == "busy_background":
            result["timing"] = time_masks(images, rows, seed, model)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
