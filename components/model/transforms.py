"""THE preprocessing, shared by training, evaluation and serving so they cannot drift apart.

Any decodable image (JPEG, PNG, WebP, GIF first frame, BMP; modes RGB, RGBA, LA, L, P,
CMYK, I;16, I, F) becomes a square uint8 array of `size`×`size`×`channels`:
  1. first frame, EXIF orientation applied;
  2. colour mode normalised (transparency composited on black, 16-bit scaled to 8-bit);
  3. padded to a square with the border colour, so the product keeps its aspect;
  4. resized with a box/bilinear filter;
and then, as a float tensor, normalised (x - 127) / 128 as EfficientNet-Lite expects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

MEAN, SCALE = 127.0, 128.0


def canonical_image(image: Image.Image, channels: int) -> Image.Image:
    """One decoded frame in mode 'L' (channels=1) or 'RGB' (channels=3)."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB")


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Pad to a square with the median border colour, then resize to size×size."""
    w, h = image.size
    if w != h:
        arr = np.asarray(image)
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        fill = tuple(int(v) for v in np.median(border.reshape(len(border), -1), axis=0))
        side = max(w, h)
        canvas = Image.new(image.mode, (side, side), fill[0] if image.mode == "L" else fill)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    if image.size != (size, size):
        shrinking = image.size[0] > size
        image = image.resize((size, size), Image.Resampling.BOX if shrinking else Image.BILINEAR)
    return image


def image_to_uint8(image: Image.Image, size: int, channels: int = 1) -> np.ndarray:
    arr = np.asarray(square_resize(canonical_image(image, channels), size), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def load_uint8(path: Path, size: int, channels: int = 1) -> np.ndarray:
    with Image.open(path) as image:
        return image_to_uint8(image, size, channels)


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×C → float N×C×H×W, normalised; channels-last memory for CPU speed."""
    batch = np.ascontiguousarray(batch)
    if not batch.flags.writeable:  # e.g. a read-only view of a cache: torch wants its own copy
        batch = batch.copy()
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    return ((x - MEAN) / SCALE).contiguous(memory_format=torch.channels_last)


def augment(
    x: torch.Tensor, generator: torch.Generator, max_shift: int = 2, cutout: int = 0
) -> torch.Tensor:
    """Training-only: a random horizontal flip and a random shift of up to max_shift pixels,
    drawn per image, then (cutout > 0) a cutout×cutout square blacked out at a random centre
    per image (DeVries & Taylor 2017; clipped at the border); the result is channels-last
    (the layout training runs in)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = (max_shift,) * 4
    x = F.pad(x, pad, value=-MEAN / SCALE)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # N×H×1
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # N×1×W
    shifted = x[torch.arange(n)[:, None, None], :, rows, cols]  # N×H×W×C (indexed dims first)
    if cutout > 0:
        cy = torch.randint(0, h, (n,), generator=generator)
        cx = torch.randint(0, w, (n,), generator=generator)
        top, left = cy - cutout // 2, cx - cutout // 2
        in_rows = (torch.arange(h) >= top[:, None]) & (torch.arange(h) < top[:, None] + cutout)
        in_cols = (torch.arange(w) >= left[:, None]) & (torch.arange(w) < left[:, None] + cutout)
        hole = in_rows[:, :, None, None] & in_cols[:, None, :, None]  # N×H×W×1
        shifted = shifted.masked_fill(hole, -MEAN / SCALE)
    return shifted.permute(0, 3, 1, 2)  # N×C×H×W view of NHWC memory: channels-last
