"""A small product detector (issue 18): where the products of a busy photo are.

`TinyDetector` is anchor-free, in the manner of CenterNet: the photo (its longer side scaled to
`side`, padded to side x side) goes through a small strided CNN with one skip connection, and
at a quarter of the input size three heads give, per cell, the logit that a product's centre
is there, the product's box size (in cells, as a log) and the centre's offset inside the cell.
Boxes are class-agnostic: each detected product's category comes from the classifier of the
same model version, on the crop (components/model/detection.py), so the detector never
disagrees with /classify about what a product is.

Training targets (`targets`): a Gaussian peak at each box centre on the heatmap (its spread a
sixth of the box's size in cells), the size and offset at the centre cell. The loss is
CenterNet's: the penalty-reduced focal loss on the heatmap, L1 on size and offset at centres.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

FILE = "detector.pt"  # its file in a run's train/ folder and in a version's artifacts
FORMAT = "vitrine-detector-1"
STRIDE = 4
SIDE = 256  # the network's input: the photo's longer side scaled to SIDE, padded square
WIDTHS = (24, 48, 96)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class TinyDetector(nn.Module):
    """side x side RGB (0-1) → (heat logits N×1×s×s, log sizes N×2×s×s, offsets N×2×s×s) at
    s = side / STRIDE."""

    def __init__(self, widths: tuple[int, int, int] = WIDTHS) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.widths = tuple(widths)
        self.stem = nn.Sequential(_block(3, w1, 2), _block(w1, w1))  # 1/2
        self.down4 = nn.Sequential(_block(w1, w2, 2), _block(w2, w2))  # 1/4
        self.down8 = nn.Sequential(_block(w2, w3, 2), _block(w3, w3), _block(w3, w3))  # 1/8
        self.down16 = nn.Sequential(_block(w3, w3, 2), _block(w3, w3))  # 1/16: context
        self.up8 = _block(w3 * 2, w3)
        self.up4 = _block(w3 + w2, w2)
        self.heat = nn.Conv2d(w2, 1, 1)
        self.size = nn.Conv2d(w2, 2, 1)
        self.offset = nn.Conv2d(w2, 2, 1)
        nn.init.constant_(self.heat.bias, -2.19)  # CenterNet's prior: few cells are centres

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x4 = self.down4(self.stem(x - 0.5))
        x8 = self.down8(x4)
        x16 = self.down16(x8)
        up = F.interpolate(x16, size=x8.shape[-2:], mode="nearest")
        y8 = self.up8(torch.cat([x8, up], 1))
        up = F.interpolate(y8, size=x4.shape[-2:], mode="nearest")
        y4 = self.up4(torch.cat([x4, up], 1))
        return self.heat(y4), self.size(y4), self.offset(y4)


def letterbox(photo: Image.Image, side: int = SIDE) -> tuple[np.ndarray, float]:
    """The photo as the detector takes it: RGB, its longer side scaled to `side`, padded at
    the right and bottom to side x side (uint8 H×W×3); and the scale (input px per photo px)."""
    photo = photo.convert("RGB")
    scale = side / max(photo.size)
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    canvas = np.zeros((side, side, 3), np.uint8)
    resized = np.asarray(photo.resize(size, Image.Resampling.BILINEAR))
    canvas[: size[1], : size[0]] = resized
    return canvas, scale


def targets(
    boxes: np.ndarray, side: int = SIDE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(heatmap s×s, log sizes 2×s×s, offsets 2×s×s, centre mask s×s) of boxes given in input
    pixels (N×4, [x0, y0, x1, y1))."""
    s = side // STRIDE
    heat = np.zeros((s, s), np.float32)
    size = np.zeros((2, s, s), np.float32)
    offset = np.zeros((2, s, s), np.float32)
    centre = np.zeros((s, s), bool)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    for x0, y0, x1, y1 in np.asarray(boxes, np.float32).reshape(-1, 4) / STRIDE:
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
        ix, iy = min(int(cx), s - 1), min(int(cy), s - 1)
        sigma = max(0.5, min(w, h) / 6)
        peak = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma**2))
        heat = np.maximum(heat, peak)
        size[:, iy, ix] = np.log([w, h])
        offset[:, iy, ix] = (cx - ix, cy - iy)
        centre[iy, ix] = True
    return heat, size, offset, centre


def loss(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    heat: torch.Tensor,
    size: torch.Tensor,
    offset: torch.Tensor,
    centre: torch.Tensor,
) -> torch.Tensor:
    """CenterNet's loss: penalty-reduced focal loss on the heatmap (alpha 2, beta 4) + L1 on
    log size and offset at the centre cells, each normalised by the number of products."""
    logits, size_out, offset_out = outputs
    p = torch.sigmoid(logits[:, 0]).clamp(1e-4, 1 - 1e-4)
    positive = centre.float()
    pos = -(torch.log(p) * (1 - p) ** 2) * positive
    neg = -(torch.log(1 - p) * p**2 * (1 - heat) ** 4) * (1 - positive)
    n = positive.sum().clamp(min=1)
    focal = (pos.sum() + neg.sum()) / n
    mask = positive[:, None]
    l1_size = (torch.abs(size_out - size) * mask).sum() / n
    l1_offset = (torch.abs(offset_out - offset) * mask).sum() / n
    return focal + 0.1 * l1_size + l1_offset


@dataclass(frozen=True)
class Box:
    box: tuple[float, float, float, float]  # in the photo's pixels
    score: float


def decode(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    photo_size: tuple[int, int],
    min_score: float,
    top_k: int = 20,
) -> list[Box]:
    """One image's boxes (photo pixels) from the heads: the heatmap's local maxima (3×3) with
    score >= min_score, best first, at most top_k."""
    logits, size_out, offset_out = (t[0] for t in outputs)
    heat = torch.sigmoid(logits[0])
    peaks = heat == F.max_pool2d(heat[None, None], 3, 1, 1)[0, 0]
    scores = torch.where(peaks, heat, torch.zeros_like(heat)).flatten()
    values, order = torch.topk(scores, min(top_k, scores.numel()))
    width = heat.shape[1]
    found = []
    for value, index in zip(values.tolist(), order.tolist(), strict=True):
        if value < min_score:
            break
        iy, ix = divmod(index, width)
        w, h = torch.exp(size_out[:, iy, ix]).tolist()
        cx = (ix + float(offset_out[0, iy, ix])) * STRIDE / scale
        cy = (iy + float(offset_out[1, iy, ix])) * STRIDE / scale
        w, h = w * STRIDE / scale, h * STRIDE / scale
        x0, y0 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
        x1, y1 = min(float(photo_size[0]), cx + w / 2), min(float(photo_size[1]), cy + h / 2)
        if x1 > x0 and y1 > y0:
            found.append(Box((x0, y0, x1, y1), float(value)))
    return found


def to_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in 0-1."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


class Detector:
    """A trained TinyDetector and its settings: what a model version carries (`model.detector`,
    pickled with the classifier: one bundle, never mixed) and the service runs. `digest` names
    its weights; the version's `detector` tag records it, and the loader checks the two agree."""

    def __init__(self, net: TinyDetector, side: int = SIDE, min_score: float = 0.3):
        self.net, self.side, self.min_score = net.eval(), side, min_score
        digest = hashlib.sha256(f"{FORMAT}-{side}-{net.widths}".encode())
        for name, tensor in sorted(net.state_dict().items()):
            digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
        self.digest = digest.hexdigest()[:16]

    @torch.inference_mode()
    def detect(self, photo: Image.Image, top_k: int = 20) -> list[Box]:
        image, scale = letterbox(photo, self.side)
        outputs = self.net(to_batch(image[None]))
        return decode(outputs, scale, photo.size, self.min_score, top_k)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": FORMAT, "side": self.side, "widths": list(self.net.widths)}
        torch.save(
            {**state, "min_score": self.min_score, "state_dict": self.net.state_dict()}, path
        )
        return path

    @classmethod
    def load(cls, path: Path) -> Detector:
        saved = torch.load(Path(path), map_location="cpu", weights_only=True)
        if saved.get("format") != FORMAT:
            raise ValueError(f"{path}: detector format {saved.get('format')!r}, expected {FORMAT}")
        net = TinyDetector(tuple(int(w) for w in saved["widths"]))
        net.load_state_dict(saved["state_dict"])
        return cls(net, int(saved["side"]), float(saved["min_score"]))


def detector_of(model: object) -> Detector | None:
    """The version's detector (None: a version trained without one, or before issue 18)."""
    return getattr(model, "detector", None)
