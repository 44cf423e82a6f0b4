"""A learned product segmenter for canonical preprocessing on busy backgrounds (issue 14).

`canonical_with_frame` finds the product on a busy background (clutter, tiles: the ring's
spread above BUSY_SPREAD) with `busy_mask`, a colour-palette heuristic. A `Segmenter` replaces
it: a tiny U-Net (`TinySegmenter`, ~46k weights) that takes the photo box-reduced to `side`×
`side` RGB and gives a product logit per pixel; the mask is probability > 0.5, upsampled to the
photo, holes filled. It is trained (components/model/segmenter_training.py `train_segmenter`,
kept apart so the service does not ship the renderer) on shopper-style renderings of TRAINING
products, whose masks are known by construction (shopper.render_with_mask), a share of them
recoloured so that "grey = product" cannot be learned.

benchmarks/segmenter_experiment.py measured it (480 s of one thread, docs/shopper.md): busy
mask IoU 0.617 (busy_mask) → 0.955 on grey products, 0.607 → 0.948 on tinted ones; 2.9 ms a
photo against busy_mask's 5.8 ms. A model trained with one
carries it as `model.segmenter` (transforms.model_input passes it on); saved on its own with
`save` / `load` (a state dict and the shape, loadable with weights_only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

SIDE = 64  # the network's input: the photo box-reduced to SIDE×SIDE RGB
WIDTH = 24
FILE = "segmenter.pt"  # its file in a run's train/ folder and in a compressed/ folder
FORMAT = 1


class TinySegmenter(nn.Module):
    """side×side RGB → side×side product logits: one level at full size, two down (stride 2),
    dilated convolutions at a quarter size for context, one skip back up at half size, logits
    upsampled to full size plus a 1×1 read-out of the full-size features (edges). `side` must
    be a multiple of 4."""

    def __init__(self, width: int = WIDTH) -> None:
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


def to_input(rgb: np.ndarray, side: int = SIDE) -> np.ndarray:
    """float/uint8 H×W×3 → uint8 side×side×3 (box filter)."""
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    return np.asarray(image.resize((side, side), Image.Resampling.BOX))


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W, normalised like the classifier's input."""
    return (torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).float() - 127.0) / 128.0


class Segmenter:
    """The `segment=` callable of canonical_with_frame: float H×W×3 → bool H×W or None (nothing
    found). Holds the network in eval mode; `digest` names its weights (cache keys)."""

    def __init__(self, net: TinySegmenter, side: int = SIDE, width: int = WIDTH) -> None:
        self.net, self.side, self.width = net.eval(), side, width
        digest = hashlib.sha256(f"{FORMAT}-{side}-{width}".encode())
        for name, tensor in sorted(net.state_dict().items()):
            digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
        self.digest = digest.hexdigest()[:16]

    def logits(self, rgb: np.ndarray) -> np.ndarray:
        """float side×side product logits of one photo."""
        with torch.inference_mode():
            return self.net(to_tensor(to_input(rgb, self.side)[None]))[0].numpy()

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        h, w = rgb.shape[:2]
        logits = Image.fromarray(self.logits(rgb).astype(np.float32), "F")
        mask = ndimage.binary_fill_holes(np.asarray(logits.resize((w, h), Image.BILINEAR)) > 0)
        return mask if mask.any() else None

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": FORMAT, "side": self.side, "width": self.width}
        torch.save({**state, "state_dict": self.net.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: Path) -> Segmenter:
        saved = torch.load(Path(path), map_location="cpu", weights_only=True)
        if saved.get("format") != FORMAT:
            raise ValueError(f"{path}: segmenter format {saved.get('format')!r}, expected {FORMAT}")
        net = TinySegmenter(int(saved["width"]))
        net.load_state_dict(saved["state_dict"])
        return cls(net, int(saved["side"]), int(saved["width"]))


def segmenter_of(model: Any) -> Segmenter | None:
    """The model's learned segmenter (None: canonical preprocessing uses busy_mask)."""
    return getattr(model, "segmenter", None)
