"""THE preprocessing, shared by training, evaluation and serving so they cannot drift apart.

Any decodable image (JPEG, PNG, WebP, GIF first frame, BMP; modes RGB, RGBA, LA, L, P,
CMYK, I;16, I, F) becomes a square uint8 array of `size`×`size`×`channels`:
  1. first frame, EXIF orientation applied;
  2. colour mode normalised (transparency composited on black, 16-bit scaled to 8-bit);
  3. padded to a square with the border colour, so the product keeps its aspect;
  4. resized with a box/bilinear filter;
and then, as a float tensor, normalised (x - 127) / 128 as EfficientNet-Lite expects.

With `canonical=True` (models trained since the shopper's-photo work carry
`preprocess = "canonical"`), step 3 is replaced by `canonicalise`: the product is found
against its background, cropped, and brought to the catalogue's look, so a shopper's photo
(dark product on a white or textured background, small and off-centre in a phone frame)
reaches the model the way a catalogue image does.
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


# canonicalise: a pixel belongs to the product when its luminance differs from the background
# (the median of the outermost ring) by more than the ring's own spread plus FOREGROUND_MIN.
FOREGROUND_MIN = 24.0
LOCATE_MAX_SIDE = 256  # larger photos are box-reduced before locating (the output is 28-64 px)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # luminance of RGB
ROW_SHARE = 0.02  # a row / column is part of the product with at least this share of its pixels


def product_box(lum: np.ndarray) -> tuple[float, float, tuple[int, int, int, int] | None]:
    """(background level, background spread, (top, bottom, left, right) or None) of a
    luminance array: the background is the median of the outermost ring (1/28 of the short side
    wide), its spread the 75th percentile of the ring's distance to it (0 on a plain
    background, large on a textured one); the box holds the rows and columns with enough
    pixels farther than spread + FOREGROUND_MIN from the background."""
    h, w = lum.shape
    r = max(1, round(min(h, w) / 28))
    ring = np.concatenate(
        [lum[:r].ravel(), lum[-r:].ravel(), lum[:, :r].ravel(), lum[:, -r:].ravel()]
    )
    background = float(np.median(ring))
    spread = float(np.percentile(np.abs(ring - background), 75))
    mask = np.abs(lum - background) > spread + FOREGROUND_MIN
    rows = np.flatnonzero(mask.sum(axis=1) >= max(1, ROW_SHARE * w))
    cols = np.flatnonzero(mask.sum(axis=0) >= max(1, ROW_SHARE * h))
    if len(rows) == 0 or len(cols) == 0:
        return background, spread, None
    return background, spread, (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def canonicalise(image: Image.Image, size: int) -> np.ndarray:
    return canonical_with_frame(image, size)[0]


def canonical_with_frame(
    image: Image.Image, size: int
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A photo of one product, as the catalogue shows products: uint8 size×size (mode L) or
    size×size×3 (RGB).

    1. large photos are box-reduced to at most LOCATE_MAX_SIDE px (cheap; the output is small);
    2. the product is located against the background (`product_box`);
    3. grayscale (mode L): every pixel becomes its distance from the background minus the
       background's spread, so a dark product on white, a light one on black and one on a
       textured wall all become a light product on black, as Fashion-MNIST's are; then the
       contrast is stretched so the product's 99.9th percentile is 255 (Fashion-MNIST's images
       all reach 255). RGB keeps its colours: only the geometry is canonical;
    4. the box is padded to a centred square (with the background) and resized so its longer
       side fills `size`: Fashion-MNIST's own framing (trimmed, longest edge 28 px).
    A photo where no product stands out keeps its whole frame. Also returns the frame: the
    model input's square as (x, y, side) in the photo's own pixels (for explanations)."""
    factor = max(1, max(image.size) // LOCATE_MAX_SIDE)
    if factor > 1:
        image = image.reduce(factor)
    arr = np.asarray(image)
    lum = arr.astype(np.float32) if arr.ndim == 2 else arr.astype(np.float32) @ LUMA
    background, spread, box = product_box(lum)
    if arr.ndim == 2:
        out = np.clip(np.abs(lum - background) - spread, 0, None)
        fill: float | tuple = 0.0
    else:
        out = arr.astype(np.float32)
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        fill = tuple(float(v) for v in np.median(border, axis=0))
    top, left = 0, 0
    if box is not None:
        top, bottom, left, right = box
        out = out[top:bottom, left:right]
    if arr.ndim == 2:
        peak = float(np.percentile(out, 99.9)) if out.size else 0.0
        if peak > 0:
            out = out * (255.0 / peak)
    bh, bw = out.shape[:2]
    side = max(bh, bw)
    canvas = np.empty((side, side, *out.shape[2:]), np.float32)
    canvas[...] = fill
    y, x = (side - bh) // 2, (side - bw) // 2
    canvas[y : y + bh, x : x + bw] = out
    square = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), image.mode)
    if side != size:
        square = square.resize(
            (size, size), Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
        )
    frame = ((left - x) * factor, (top - y) * factor, side * factor)  # in the photo's pixels
    return np.asarray(square), frame


def image_to_uint8(
    image: Image.Image, size: int, channels: int = 1, canonical: bool = False
) -> np.ndarray:
    """The model input for one photo: size×size×channels uint8 (see the module docstring)."""
    image = canonical_image(image, channels)
    if canonical:
        arr = canonicalise(image, size)
    else:
        arr = np.asarray(square_resize(image, size), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def input_frame(image: Image.Image, model: object) -> tuple[float, float, float]:
    """Where the model's square input lies in the photo: (x, y, side) in its pixels (the
    square may reach past the photo's edges, where it was padded)."""
    if getattr(model, "preprocess", "plain") == "canonical":
        channels, size = model.in_channels, model.image_size  # type: ignore[attr-defined]
        return canonical_with_frame(canonical_image(image, channels), size)[1]
    w, h = image.size
    side = max(w, h)
    return (-((side - w) // 2), -((side - h) // 2), side)


def model_input(image: Image.Image, model: object) -> np.ndarray:
    """`image_to_uint8` with the model's own input size, channels and preprocessing."""
    return image_to_uint8(
        image,
        model.image_size,  # type: ignore[attr-defined]
        model.in_channels,  # type: ignore[attr-defined]
        canonical=getattr(model, "preprocess", "plain") == "canonical",
    )


def load_uint8(path: Path, size: int, channels: int = 1, canonical: bool = False) -> np.ndarray:
    with Image.open(path) as image:
        return image_to_uint8(image, size, channels, canonical)


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
