"""Products in a busy photo (issue 18): the detector's boxes, each crop classified and embedded
by the classifier of the same model version, so a detected item's category is what /classify
would say of the crop; and the classical baseline the detector is measured against.

`detect_items` is what a /detect answer and the evaluation share: boxes (class-agnostic,
components/model/detector.py), non-maximum suppression, at most `max_items`, each crop (the
box and a margin) through the shared preprocessing (`model_input`: canonical, so the crop's
background is handled as a shopper photo's) into the classifier; an item's score is the box's
score times the category's probability (what mAP ranks by).

`propose_components` is the baseline: the background is the median colour of the photo's
outer ring, the foreground every pixel far from it, closed and split into connected
components; each large enough component is a box. It finds products on a plain background
and fails on textures, gradients and clutter, which is what the detector is for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from components.model.detection_metrics import (
    COCO_THRESHOLDS,
    Detections,
    match,
    mean_average_precision,
    nms,
)
from components.model.detector import Box, Detector
from components.model.device import device_of
from components.model.transforms import model_input, to_tensor

MARGIN = 0.08  # of the box's longer side, around each crop


@dataclass(frozen=True)
class Item:
    box: tuple[float, float, float, float]  # photo pixels, [x0, y0, x1, y1)
    score: float  # the box's score x the category's probability
    category: int
    confidence: float  # the category's probability
    embedding: np.ndarray


def crop(photo: Image.Image, box: tuple[float, float, float, float], margin: float = MARGIN):
    """The box and a margin (clipped to the photo): what the classifier sees of an item."""
    x0, y0, x1, y1 = box
    pad = margin * max(x1 - x0, y1 - y0)
    left, top = max(0, int(x0 - pad)), max(0, int(y0 - pad))
    right = min(photo.width, int(np.ceil(x1 + pad)))
    bottom = min(photo.height, int(np.ceil(y1 + pad)))
    return photo.crop((left, top, max(right, left + 1), max(bottom, top + 1)))


@torch.inference_mode()
def classify_boxes(model: torch.nn.Module, photo: Image.Image, boxes: list[Box]) -> list[Item]:
    """Each box's crop through the classifier: its category, probability and embedding."""
    if not boxes:
        return []
    batch = to_tensor(np.stack([model_input(crop(photo, b.box), model) for b in boxes]))
    logits, embeddings = model(batch.to(device_of(model)))  # a GPU-served model: its device
    probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
    items = []
    for b, p, e in zip(boxes, probs, embeddings.float().cpu().numpy(), strict=True):
        category = int(np.argmax(p))
        items.append(Item(b.box, b.score * float(p[category]), category, float(p[category]), e))
    return items


def detect_items(
    detector: Detector,
    model: torch.nn.Module,
    photo: Image.Image,
    max_items: int = 10,
    nms_iou: float = 0.5,
) -> list[Item]:
    """The products of `photo`: detected, suppressed, classified; best score first."""
    photo = photo.convert("RGB")
    found = detector.detect(photo, top_k=max_items * 2)
    if found:
        boxes = np.array([b.box for b in found])
        kept = nms(boxes, np.array([b.score for b in found]), nms_iou, max_items)
        found = [found[i] for i in kept]
    items = classify_boxes(model, photo, found)
    return sorted(items, key=lambda item: -item.score)


def largest(items: list[Item]) -> Item:
    """The item whose box is largest (/search with detect=true searches it)."""
    return max(items, key=lambda i: (i.box[2] - i.box[0]) * (i.box[3] - i.box[1]))


def item_stats(items: list[Item], size: tuple[int, int]) -> dict[str, float]:
    """What the request log keeps of a detection (drift signals): the number of items and the
    share of the photo their boxes cover (overlaps counted once)."""
    scale = min(1.0, 256 / max(size))  # counted on a grid of at most 256 px
    width, height = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    covered = np.zeros((height, width), bool)
    for item in items:
        x0, y0, x1, y1 = (int(round(v * scale)) for v in item.box)
        covered[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    area = float(covered.mean()) if items else 0.0
    return {"items": len(items), "item_area": round(area, 4)}


def propose_components(
    photo: Image.Image, threshold: float = 40.0, min_area: float = 0.004, max_items: int = 10
) -> list[Box]:
    """The classical baseline's boxes: connected regions that differ from the photo's border
    colour by more than `threshold` (0-255, the largest channel difference), of at least
    `min_area` of the photo, largest first (score: the region's share of the photo)."""
    arr = np.asarray(photo.convert("RGB")).astype(np.float32)
    ring = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(ring, axis=0)
    foreground = np.abs(arr - background).max(axis=2) > threshold
    foreground = ndimage.binary_closing(foreground, iterations=2)
    foreground = ndimage.binary_fill_holes(foreground)
    labels, _ = ndimage.label(foreground)
    total = arr.shape[0] * arr.shape[1]
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        area = float(np.count_nonzero(labels[found] == index)) / total
        if area >= min_area:
            ys, xs = found
            boxes.append(Box((xs.start, ys.start, xs.stop, ys.stop), area))
    return sorted(boxes, key=lambda b: -b.score)[:max_items]


def detections(items: list) -> Detections:
    """Items (or baseline Boxes, category 0) as one image's predictions for the mAP code."""
    boxes = np.array([item.box for item in items], np.float64).reshape(-1, 4)
    labels = np.array([getattr(item, "category", 0) for item in items], np.int64)
    return Detections(boxes, labels, np.array([item.score for item in items], np.float64))


def box_scores(truths: list[Detections], found: list[Detections]) -> dict[str, float]:
    """Class-agnostic mAP@0.5 and mAP@0.5:0.95: is each product found, whatever it is."""
    agnostic = [Detections(t.boxes, np.zeros(len(t.boxes), np.int64)) for t in truths]
    boxes = [Detections(f.boxes, np.zeros(len(f.boxes), np.int64), f.scores) for f in found]
    return {
        "map50": mean_average_precision(agnostic, boxes),
        "map50_95": mean_average_precision(agnostic, boxes, COCO_THRESHOLDS),
    }


@dataclass
class DetectionResult:
    metrics: dict[str, float]  # detect_* (the evaluate stage logs them to MLflow)
    items: list[list[Item]]  # each scene's detected items


def evaluate_detection(
    detector: Detector,
    model: torch.nn.Module,
    scenes: list,
    catalogue_embeddings: np.ndarray,
    catalogue_labels: np.ndarray,
    max_items: int = 10,
    nms_iou: float = 0.5,
) -> DetectionResult:
    """The detector with the classifier of its version on composed scenes (scenes.Scene, from
    the frozen test split): class-agnostic mAP@0.5 and @0.5:0.95 (are the products found), the
    same with the classifier's categories (COCO's class-aware mAP), and for every true item
    matched at IoU 0.5: its category accuracy and Recall@1 (the crop's embedding searched
    against the catalogue, a hit when the nearest product has the item's category); the share
    of items found; detect_items' time per scene."""
    truths, found, items, ms = [], [], [], []
    accurate = recalled = matched_items = total = 0
    for scene in scenes:
        start = time.perf_counter()
        scene_items = detect_items(detector, model, scene.photo, max_items, nms_iou)
        ms.append(1000 * (time.perf_counter() - start))
        items.append(scene_items)
        truth = Detections(scene.boxes, scene.labels)
        pred = detections(scene_items)
        truths.append(truth)
        found.append(pred)
        matched = match(truth.boxes, pred.boxes, pred.scores)
        total += len(matched)
        hits = [(t, int(i)) for t, i in enumerate(matched) if i >= 0]
        matched_items += len(hits)
        if hits:
            queries = np.stack([scene_items[i].embedding for _, i in hits])
            nearest = catalogue_labels[np.argmax(queries @ catalogue_embeddings.T, axis=1)]
            for (t, i), near in zip(hits, nearest, strict=True):
                accurate += int(scene_items[i].category == scene.labels[t])
                recalled += int(near == scene.labels[t])
    scores = box_scores(truths, found)
    metrics = {
        "detect_map50": scores["map50"],
        "detect_map50_95": scores["map50_95"],
        "detect_map50_categories": mean_average_precision(truths, found),
        "detect_item_found": matched_items / max(total, 1),
        "detect_item_accuracy": accurate / max(matched_items, 1),
        "detect_item_recall_at_1": recalled / max(matched_items, 1),
        "detect_items_per_scene": float(np.mean([len(i) for i in items])) if items else 0.0,
        "detect_p50_ms": float(np.median(ms)) if ms else 0.0,
    }
    return DetectionResult(metrics, items)


def plot_detections(
    scenes: list, items: list[list[Item]], categories: list[str], path: Path, n: int = 6
) -> Path:
    """A PNG of the first `n` scenes with the true boxes (thin white) and the detected items
    (thick, labelled with category and score): what the MLflow run shows of the detector."""
    tiles = []
    for scene, found in zip(scenes[:n], items[:n], strict=False):
        photo = scene.photo.convert("RGB").copy()
        draw = ImageDraw.Draw(photo)
        for box in scene.boxes:
            draw.rectangle([int(v) for v in box], outline=(255, 255, 255), width=1)
        for item in found:
            x0, y0, x1, y1 = (int(round(v)) for v in item.box)
            draw.rectangle([x0, y0, x1, y1], outline=(230, 40, 40), width=3)
            label = f"{categories[item.category]} {item.score:.2f}"
            draw.rectangle(
                [x0, max(0, y0 - 12), x0 + 6 * len(label) + 4, max(12, y0)], fill=(230, 40, 40)
            )
            draw.text((x0 + 2, max(0, y0 - 12)), label, fill=(255, 255, 255))
        tiles.append(photo)
    if not tiles:
        raise ValueError("no scenes to draw")
    width, height = tiles[0].size
    columns = min(3, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for k, tile in enumerate(tiles):
        sheet.paste(tile.resize((width, height)), ((k % columns) * width, (k // columns) * height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
