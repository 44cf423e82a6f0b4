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

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from components.model.detection_metrics import nms
from components.model.detector import Box, Detector
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
    batch = np.stack([model_input(crop(photo, b.box), model) for b in boxes])
    logits, embeddings = model(to_tensor(batch))
    probs = torch.softmax(logits.float(), dim=1).numpy()
    items = []
    for b, p, e in zip(boxes, probs, embeddings.float().numpy(), strict=True):
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
