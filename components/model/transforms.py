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

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from scipy import ndimage

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
# A busy background (clutter, tiles: the ring's spread above BUSY_SPREAD) is told apart by
# colour instead: the product is what differs by more than PALETTE_MIN (RGB distance) from
# every colour of the ring, located on a copy of at most BUSY_SIDE px.
BUSY_SPREAD = 25.0
PALETTE_MIN = 22.0
PALETTE_SIZE = 64  # the ring's most frequent colours (quantised to steps of 8)
BUSY_SIDE = 64


def _ring(arr: np.ndarray) -> np.ndarray:
    """The outermost ring (1/28 of the short side wide) of an H×W(×C) array, as N(×C)."""
    h, w = arr.shape[:2]
    r = max(1, round(min(h, w) / 28))
    tail = arr.shape[2:]
    return np.concatenate(
        [
            arr[:r].reshape(-1, *tail),
            arr[-r:].reshape(-1, *tail),
            arr[:, :r].reshape(-1, *tail),
            arr[:, -r:].reshape(-1, *tail),
        ]
    )


def product_box(lum: np.ndarray) -> tuple[float, float, tuple[int, int, int, int] | None]:
    """(background level, background spread, (top, bottom, left, right) or None) of a
    luminance array: the background is the median of the outermost ring, its spread the 75th
    percentile of the ring's distance to it (0 on a plain background, large on a textured
    one); the box holds the rows and columns with enough pixels farther than
    spread + FOREGROUND_MIN from the background."""
    ring = _ring(lum)
    background = float(np.median(ring))
    spread = float(np.percentile(np.abs(ring - background), 75))
    return background, spread, mask_box(np.abs(lum - background) > spread + FOREGROUND_MIN)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the rows and columns with at least ROW_SHARE product."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.sum(axis=1) >= max(1, ROW_SHARE * w))
    cols = np.flatnonzero(mask.sum(axis=0) >= max(1, ROW_SHARE * h))
    if len(rows) == 0 or len(cols) == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def busy_mask(rgb: np.ndarray) -> np.ndarray | None:
    """The product's pixels (bool H×W) on a busy background, or None where nothing stands out:
    the pixels farther than PALETTE_MIN from every colour of the ring (a clutter or a pattern
    shows its colours at the border), in connected regions at least a fifth of the largest
    one (stray bits of clutter are smaller than the product), holes filled. Works on a copy of
    at most BUSY_SIDE px; the mask comes back at the input's size."""
    h, w = rgb.shape[:2]
    factor = max(1, max(h, w) // BUSY_SIDE)
    small = rgb
    if factor > 1:
        small = np.asarray(Image.fromarray(rgb.astype(np.uint8), "RGB").reduce(factor), np.float32)
    quantised, counts = np.unique((_ring(small) // 8).astype(np.int32), axis=0, return_counts=True)
    palette = (quantised[np.argsort(-counts)[:PALETTE_SIZE]] * 8 + 4).astype(np.float32)
    distance = np.full(small.shape[:2], np.inf, np.float32)
    for colour in palette:  # ≤ 64 passes over ≤ 64×64 px: well under a millisecond each
        np.minimum(distance, np.sqrt(((small - colour) ** 2).sum(axis=2)), out=distance)
    far = distance > PALETTE_MIN
    labels, count = ndimage.label(far)
    if count == 0:
        return None
    sizes = ndimage.sum(far, labels, range(1, count + 1))
    keep = ndimage.binary_fill_holes(
        np.isin(labels, np.flatnonzero(sizes >= 0.2 * sizes.max()) + 1)
    )
    if factor > 1:
        keep = np.asarray(Image.fromarray(keep).resize((w, h), Image.Resampling.NEAREST))
    return keep


Segment = Callable[[np.ndarray], np.ndarray | None]  # float H×W×3 → bool H×W mask, or None


def canonicalise(
    image: Image.Image, size: int, mode: str | None = None, segment: Segment | None = None
) -> np.ndarray:
    return canonical_with_frame(image, size, mode, segment)[0]


def canonical_with_frame(
    image: Image.Image,
    size: int,
    mode: str | None = None,
    segment: Segment | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A photo of one product (mode L or RGB), as the catalogue shows products: uint8
    size×size in `mode` (default: the photo's), L or RGB.

    1. large photos are box-reduced to at most LOCATE_MAX_SIDE px (cheap; the output is small);
    2. the product is located against the background (`product_box`); on a busy background
       (the ring's spread above BUSY_SPREAD) by its colours instead (`busy_mask`), and what is
       not the product is blanked to the background;
    3. grayscale (mode L): every pixel becomes its distance from the background minus the
       background's spread, so a dark product on white, a light one on black and one on a
       textured wall all become a light product on black, as Fashion-MNIST's are (on a busy
       background: the product's negative when the background is light, itself when dark);
       then the contrast is stretched so the product's 99.9th percentile is 255
       (Fashion-MNIST's images all reach 255). RGB keeps its colours: only the geometry is
       canonical;
    4. the box is padded to a centred square (with the background) and resized so its longer
       side fills `size`: Fashion-MNIST's own framing (trimmed, longest edge 28 px).
    A photo where no product stands out keeps its whole frame. Also returns the frame: the
    model input's square as (x, y, side) in the photo's own pixels (for explanations).
    `segment` (float H×W×3 → bool H×W or None) replaces `busy_mask` on a busy background: a
    model's learned segmenter (components/model/segmenter.py, `model.segmenter`)."""
    mode = mode or image.mode
    factor = max(1, max(image.size) // LOCATE_MAX_SIDE)
    if factor > 1:
        image = image.reduce(factor)
    arr = np.asarray(image).astype(np.float32)
    lum = arr if arr.ndim == 2 else arr @ LUMA
    background, spread, box = product_box(lum)
    busy = arr.ndim == 3 and spread > BUSY_SPREAD
    mask = (segment or busy_mask)(arr) if busy else None
    if mask is not None:
        box = mask_box(mask)
    if mode == "L":
        if mask is None:
            out = np.clip(np.abs(lum - background) - spread, 0, None)
        else:
            out = (255.0 - lum if background >= 128 else lum) * mask
        fill: float | tuple = 0.0
    else:
        out = arr if arr.ndim == 3 else arr[..., None].repeat(3, axis=2)
        fill = tuple(float(v) for v in np.median(_ring(out), axis=0))
        if mask is not None:
            out = np.where(mask[..., None], out, np.array(fill, np.float32))
    top, left = 0, 0
    if box is not None:
        top, bottom, left, right = box
        out = out[top:bottom, left:right]
    if mode == "L":
        peak = float(np.percentile(out, 99.9)) if out.size else 0.0
        if peak > 0:
            out = out * (255.0 / peak)
    bh, bw = out.shape[:2]
    side = max(bh, bw)
    canvas = np.empty((side, side, *out.shape[2:]), np.float32)
    canvas[...] = fill
    y, x = (side - bh) // 2, (side - bw) // 2
    canvas[y : y + bh, x : x + bw] = out
    square = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mode)
    if side != size:
        square = square.resize(
            (size, size), Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
        )
    frame = ((left - x) * factor, (top - y) * factor, side * factor)  # in the photo's pixels
    return np.asarray(square), frame


def _located(image: Image.Image, channels: int) -> Image.Image:
    """The decoded photo canonicalise locates the product on: its colours kept (a busy
    background is told apart by colour) unless it is grayscale already."""
    grey = image.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1")
    return canonical_image(image, 1 if grey else 3)


def image_to_uint8(
    image: Image.Image,
    size: int,
    channels: int = 1,
    canonical: bool = False,
    segment: Segment | None = None,
) -> np.ndarray:
    """The model input for one photo: size×size×channels uint8 (see the module docstring);
    `segment`: the mask function of a busy background (canonical only; default busy_mask)."""
    if canonical:
        mode = "L" if channels == 1 else "RGB"
        arr = canonicalise(_located(image, channels), size, mode, segment)
    else:
        arr = np.asarray(square_resize(canonical_image(image, channels), size), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def input_frame(image: Image.Image, model: object) -> tuple[float, float, float]:
    """Where the model's square input lies in the photo: (x, y, side) in its pixels (the
    square may reach past the photo's edges, where it was padded)."""
    if getattr(model, "preprocess", "plain") == "canonical":
        channels, size = model.in_channels, model.image_size  # type: ignore[attr-defined]
        mode = "L" if channels == 1 else "RGB"
        segment = getattr(model, "segmenter", None)
        return canonical_with_frame(_located(image, channels), size, mode, segment)[1]
    w, h = image.size
    side = max(w, h)
    return (-((side - w) // 2), -((side - h) // 2), side)


def model_input(image: Image.Image, model: object) -> np.ndarray:
    """`image_to_uint8` with the model's own input size, channels and preprocessing, and its
    learned segmenter where it carries one (`model.segmenter`, loaded with the model)."""
    return image_to_uint8(
        image,
        model.image_size,  # type: ignore[attr-defined]
        model.in_channels,  # type: ignore[attr-defined]
        canonical=getattr(model, "preprocess", "plain") == "canonical",
        segment=getattr(model, "segmenter", None),
    )


def load_uint8(
    path: Path,
    size: int,
    channels: int = 1,
    canonical: bool = False,
    segment: Segment | None = None,
) -> np.ndarray:
    with Image.open(path) as image:
        return image_to_uint8(image, size, channels, canonical, segment)


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
