"""Grad-CAM explanations: which region of a shopper's photo drove the predicted category.

Grad-CAM (Selvaraju et al., 2017) weights the last convolutional feature map by the gradient
of the predicted class's logit, so the heatmap follows what the *classifier* used, at the
map's resolution (7×7 for the compact CNN at 28 px, upsampled bilinearly). The feature map is
taken by running the trunk in two explicit halves instead of through forward hooks: hooks are
global to a module and would also fire on the service's concurrent batched calls.

Everything is mapped back to the uploaded image's own coordinates by inverting the shared
preprocessing (transforms.square_resize pads to a centred square, then resizes), so the box
and the heatmap line up with the photo the shopper sent. The explanation always comes from
the version's fp32 torch weights (gradients), also when a compressed variant serves /classify.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from torch import nn

from components.model.device import device_of
from components.model.models import EfficientNetTrunk
from components.model.transforms import canonical_image, input_frame, model_input, to_tensor

MAX_HEATMAP_SIDE = 1024  # the PNG keeps the photo's size up to this many pixels on its long side
REGION_LEVEL = 0.5  # the region is the blob around the peak where saliency ≥ this × the peak
ALPHA = 0.5  # heatmap opacity over the photo
# A dark-blue → cyan → yellow → red ramp (the familiar "jet" order), as RGB anchors.
RAMP = np.array(
    [[0, 0, 128], [0, 64, 255], [0, 224, 255], [255, 255, 0], [255, 64, 0], [160, 0, 0]]
)


@dataclass(frozen=True)
class Explanation:
    category: str
    class_index: int
    confidence: float
    saliency: np.ndarray  # float 0..1 over the model's square input (size × size)
    box: dict[str, int]  # x0, y0, x1, y1 (exclusive) in the uploaded image's pixels
    png: bytes  # the photo with the heatmap and the box drawn over it
    png_size: tuple[int, int]  # (width, height) of the PNG


def feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last spatial feature map of the trunk (N×C×h×w), before global pooling."""
    x = model.adapt_input(x)
    trunk = model.trunk
    if isinstance(trunk, EfficientNetTrunk):
        return trunk.net.extract_features(x)
    if isinstance(trunk, nn.Sequential) and isinstance(trunk[-2], nn.AdaptiveAvgPool2d):
        return trunk[:-2](x)
    raise TypeError(f"no Grad-CAM layer known for trunk {type(trunk).__name__}")


def grad_cam(model: nn.Module, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(saliency size×size in 0..1, class probabilities) for one uint8 H×W×C image."""
    model.eval()
    with torch.enable_grad():
        fmap = feature_map(model, to_tensor(pixels[None]).to(device_of(model)))
        logits = model.classifier(fmap.mean(dim=(2, 3)))  # = the trunk's pool + flatten
        best = int(logits[0].argmax())
        (grad,) = torch.autograd.grad(logits[0, best], fmap)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True)).detach().cpu()
    size = pixels.shape[0]
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    probs = torch.softmax(logits.detach().float(), dim=1)[0].cpu().numpy()
    return cam.numpy().astype(np.float32), probs


def to_original(
    saliency: np.ndarray,
    width: int,
    height: int,
    scale: float,
    frame: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Undo the preprocessing's geometry: the saliency over the model's square input, placed
    where that square lies in the photo (`frame` = (x, y, side) in its pixels, from
    transforms.input_frame; default the centred padded square of square_resize), × scale;
    0 where the square does not reach."""
    if frame is None:
        side = max(width, height)
        frame = (-((side - width) // 2), -((side - height) // 2), side)
    fx, fy, side = frame
    out_side = max(1, round(side * scale))
    square = np.asarray(
        Image.fromarray(saliency).resize((out_side, out_side), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    out = np.zeros((h, w), np.float32)
    ox, oy = round(fx * scale), round(fy * scale)
    ys, xs = slice(max(0, oy), min(h, oy + out_side)), slice(max(0, ox), min(w, ox + out_side))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys, xs] = square[ys.start - oy : ys.stop - oy, xs.start - ox : xs.stop - ox]
    return out


def find_region(saliency: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the connected blob at ≥ REGION_LEVEL × peak around the peak."""
    peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    if saliency[peak] <= 0:
        return 0, 0, saliency.shape[1], saliency.shape[0]  # no evidence: the whole image
    blobs, _ = ndimage.label(saliency >= REGION_LEVEL * saliency[peak])
    ys, xs = np.nonzero(blobs == blobs[peak])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def colourise(saliency: np.ndarray) -> np.ndarray:
    """0..1 → uint8 RGB along RAMP."""
    stops = np.linspace(0.0, 1.0, len(RAMP))
    channels = [np.interp(saliency, stops, RAMP[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def render_overlay(
    image: Image.Image, saliency: np.ndarray, box: tuple[int, int, int, int]
) -> bytes:
    """PNG: the photo (as RGB) at the saliency's size, heatmap blended over it, box outlined."""
    h, w = saliency.shape
    photo = np.asarray(canonical_image(image, 3).resize((w, h), Image.Resampling.BILINEAR))
    blended = (1 - ALPHA) * photo.astype(np.float32) + ALPHA * colourise(saliency)
    out = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), "RGB")
    x0, y0, x1, y1 = box
    width = max(1, round(max(w, h) / 150))
    ImageDraw.Draw(out).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255), width=width)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()


def explain_image(model: nn.Module, image: Image.Image, categories: list[str]) -> Explanation:
    """Grad-CAM of the predicted category over a decoded upload (any size / colour mode)."""
    pixels = model_input(image, model)
    saliency, probs = grad_cam(model, pixels)
    width, height = image.size
    scale = min(1.0, MAX_HEATMAP_SIDE / max(width, height))
    heat = to_original(saliency, width, height, scale, input_frame(image, model))
    x0, y0, x1, y1 = find_region(heat)
    png = render_overlay(image, heat, (x0, y0, x1, y1))
    box = {  # back to the photo's own pixels
        "x0": min(width, int(x0 / scale)),
        "y0": min(height, int(y0 / scale)),
        "x1": min(width, max(1, round(x1 / scale))),
        "y1": min(height, max(1, round(y1 / scale))),
    }
    best = int(np.argmax(probs))
    return Explanation(
        categories[best],
        best,
        float(probs[best]),
        saliency,
        box,
        png,
        (heat.shape[1], heat.shape[0]),
    )


def explanation_json(ex: Explanation) -> dict:
    """The JSON body of POST /explain (the service adds model_version)."""
    return {
        "method": "grad-cam",
        "category": ex.category,
        "confidence": round(ex.confidence, 6),
        "region": ex.box,
        "heatmap_png": base64.b64encode(ex.png).decode("ascii"),
        "heatmap_size": {"width": ex.png_size[0], "height": ex.png_size[1]},
        # over the model's square input (the photo padded to a square, resized): 0..1
        "saliency": [[round(float(v), 3) for v in line] for line in ex.saliency],
    }
