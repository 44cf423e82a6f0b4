"""Shopper-style photos rendered from catalogue images: what evaluation, the gate and the
benchmark measure besides the catalogue's own look, and what training augments towards.

A catalogue image is split into the product's appearance and its silhouette:
  * a grayscale image on a dark background is a negative (Fashion-MNIST's conversion negated
    Zalando's shop photos: light product on black), so the product's real look is 255 - x;
  * any other image keeps its pixels; the background is the median of its outermost ring.
The silhouette is every pixel that stands out from the background, holes filled.

Each named shift then renders the product the way a shopper's photo shows it. The first seven
change the setting (the product as it really looks, on something else than the catalogue's
background); the last four are single degradations of the catalogue image itself:

  white_background     dark product on white (the shop photo's own look), 56-112 px
  light_background     on a light grey, beige or pastel wall
  textured_background  on wood grain, a woven fabric, tiles or a mottled wall
  busy_background      on clutter: overlapping shapes of many colours
  colour_tint          the product dyed one colour, on white
  colour_photo         a two-tone colour product (colour map of its shading), light background
  phone                a phone frame (3:4, 9:16, 4:3; 200-400 px short side), the product small
                       (30-60% of the short side) and off-centre, colour, uneven light, JPEG 70-90
  jpeg                 the catalogue image as a JPEG of quality 5-15
  blur_noise           Gaussian blur (radius 0.6-1.2) and sensor noise (sigma 6-14)
  occlusion            a quarter of the product's box hidden by a grey or coloured block
  rotation             tilted 8-20 degrees either way

Every rendering is seeded per (seed, shift, image index): the same call gives the same photos,
whatever the order or the subset asked for.
"""

from __future__ import annotations

import colorsys
import io
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from components.config import SHOPPER_SHIFTS as SHIFTS
from components.model.transforms import Segment, canonical_image, image_to_uint8

DEGRADATIONS = ("jpeg", "blur_noise", "occlusion", "rotation")  # the catalogue image's own frame
SETTINGS = tuple(s for s in SHIFTS if s not in DEGRADATIONS)  # the product placed on a setting
LOOKS = ("as_is", "tinted", "colour_mapped")  # render_with_mask: the product recoloured
SILHOUETTE_MIN = 10.0  # distance from the background (0-255) that makes a pixel the product's


def shift_rng(seed: int, shift: str, index: int) -> np.random.Generator:
    """The generator of one rendering: independent of order and of the other shifts."""
    return np.random.default_rng([seed, zlib.crc32(shift.encode()), index])


def product_layers(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(appearance H×W×3 float 0-255, silhouette H×W float 0-1) of a catalogue image."""
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    arr = np.asarray(image).astype(np.float32)
    lum = arr if arr.ndim == 2 else arr @ np.array([0.299, 0.587, 0.114], np.float32)
    ring = np.concatenate([lum[0], lum[-1], lum[:, 0], lum[:, -1]])
    background = float(np.median(ring))
    mask = ndimage.binary_fill_holes(np.abs(lum - background) > SILHOUETTE_MIN)
    rgb = arr[..., None].repeat(3, axis=2) if arr.ndim == 2 else arr
    if arr.ndim == 2 and background < 128:  # a grayscale negative: the real look is 255 - x
        rgb = 255.0 - rgb
    return rgb, mask.astype(np.float32)


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float H×W(×3) → float at (width, height), bilinear."""
    if arr.ndim == 2:
        return np.asarray(
            Image.fromarray(arr.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR)
        )
    return np.stack([_resize(arr[..., c], size) for c in range(arr.shape[2])], axis=2)


def composite(
    background: np.ndarray, appearance: np.ndarray, alpha: np.ndarray, box: tuple[int, int, int]
) -> np.ndarray:
    """The product scaled to `side` px (its longer side) pasted at (x, y) on `background`."""
    x, y, side = box
    h, w = alpha.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    a = np.clip(_resize(alpha, size), 0, 1)[..., None]
    look = _resize(appearance, size)
    out = background.copy()
    region = out[y : y + size[1], x : x + size[0]]
    a, look = a[: region.shape[0], : region.shape[1]], look[: region.shape[0], : region.shape[1]]
    out[y : y + size[1], x : x + size[0]] = a * look + (1 - a) * region
    return out


def _light_colour(rng: np.random.Generator, saturation: float = 0.25) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0, saturation), rng.uniform(0.72, 0.95)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A light textured surface, H×W×3: wood grain, woven fabric, tiles or a mottled wall."""
    base = _light_colour(rng, 0.3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(4)
    amplitude = rng.uniform(15, 35)
    if kind == 0:  # wood grain: wavy stripes
        period = rng.uniform(6, 14)
        wobble = 4 * np.sin(yy / rng.uniform(12, 30) + rng.uniform(0, 6))
        pattern = np.sin((xx + wobble) * 2 * np.pi / period)
    elif kind == 1:  # woven fabric
        period = rng.uniform(3, 6)
        pattern = np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / period)
    elif kind == 2:  # tiles with grout lines
        tile = int(rng.integers(14, 30))
        pattern = np.where((xx % tile < 2) | (yy % tile < 2), -1.0, 0.3)
    else:  # mottled wall: smoothed noise
        noise = rng.normal(0, 1, (height, width)).astype(np.float32)
        pattern = ndimage.gaussian_filter(noise, rng.uniform(1.5, 3.0))
        pattern /= max(float(np.abs(pattern).max()), 1e-6)
    return np.clip(base + amplitude * pattern[..., None], 0, 255)


def clutter(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A busy background, H×W×3: 12-30 overlapping rectangles and ellipses of any colour."""
    canvas = Image.new("RGB", (width, height), tuple(int(v) for v in _light_colour(rng, 0.5)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(12, 31))):
        x0, y0 = rng.integers(-width // 4, width), rng.integers(-height // 4, height)
        x1 = x0 + rng.integers(width // 8, width // 2)
        y1 = y0 + rng.integers(height // 8, height // 2)
        colour = tuple(int(v) for v in (rng.integers(0, 256, 3)))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([int(x0), int(y0), int(x1), int(y1)], fill=colour)
    return np.asarray(canvas).astype(np.float32)


def placed_mask(alpha: np.ndarray, box: tuple[int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The product's pixels (bool H×W) in a photo of `size` (width, height) where `composite`
    pasted the silhouette `alpha` at `box`: the ground truth of a segmenter."""
    width, height = size
    placed = composite(
        np.zeros((height, width, 1), np.float32), np.ones((*alpha.shape, 1)), alpha, box
    )
    return placed[..., 0] > 0.5


def _on_background(
    appearance: np.ndarray, alpha: np.ndarray, rng: np.random.Generator, make_background
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(photo, box): the product (56-112 px) with a 5-25% margin, somewhere on a square
    background."""
    side = int(rng.integers(56, 113))
    canvas = int(side * rng.uniform(1.1, 1.5))
    x, y = (int(rng.integers(0, canvas - side + 1)) for _ in range(2))
    box = (x, y, side)
    return composite(make_background(canvas, canvas), appearance, alpha, box), box


def _tinted(appearance: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Dyed: the colour's hue, the product's shading (a black product becomes a dark shade of
    the colour, not black)."""
    return colour * (0.35 + 0.65 * appearance / 255.0)


def _colour_mapped(appearance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shading → colour: the product's dark parts one colour, its light parts a lighter one."""
    dark = _saturated_colour(rng) * rng.uniform(0.2, 0.6)
    light = np.clip(_saturated_colour(rng) * 0.4 + 150, 0, 255)
    t = (appearance.mean(axis=2, keepdims=True) / 255.0) ** 1.2
    return dark + t * (light - dark)


def recolour(appearance: np.ndarray, look: str, rng: np.random.Generator) -> np.ndarray:
    """The product in `look` (LOOKS): as it is, dyed one saturated colour, or its shading
    mapped to two colours."""
    if look == "tinted":
        return _tinted(appearance, _saturated_colour(rng))
    if look == "colour_mapped":
        return _colour_mapped(appearance, rng)
    return appearance


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _as_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def _phone(
    appearance: np.ndarray, alpha: np.ndarray, rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int, int]]:
    short = int(rng.integers(200, 401))
    aspect = [4 / 3, 16 / 9, 3 / 4][int(rng.integers(3))]  # height / width
    width, height = short, round(short * aspect)
    if aspect < 1:
        width, height = round(short / aspect), short
    across = (np.arange(width, dtype=np.float32) / width - 0.5) * rng.uniform(-0.12, 0.12)
    down = (np.arange(height, dtype=np.float32) / height - 0.5) * rng.uniform(-0.12, 0.12)
    light = 1 + across[None, :] + down[:, None]  # uneven light across the frame
    background = _light_colour(rng, 0.15) * light[..., None]
    side = int(min(width, height) * rng.uniform(0.3, 0.6))
    x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    look = _colour_mapped(appearance, rng) if rng.random() < 0.7 else appearance
    photo = composite(np.clip(background, 0, 255), look, alpha, (x, y, side))
    return _jpeg(_as_image(photo), int(rng.integers(70, 91))), (x, y, side)


def render(image: Image.Image, shift: str, rng: np.random.Generator) -> Image.Image:
    """One shopper-style photo of the catalogue image under `shift` (an RGB image, any size)."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}: choose from {', '.join(SHIFTS)}")
    if image.mode not in (
        "L",
        "RGB",
    ):  # transparency, palettes, CMYK, 16-bit: as the model sees them
        image = canonical_image(image, 3)
    if shift in DEGRADATIONS:
        return degrade(image, shift, rng)
    return _placed(image, shift, rng)[0]


def render_with_mask(
    image: Image.Image, shift: str, rng: np.random.Generator, look: str = "as_is"
) -> tuple[Image.Image, np.ndarray]:
    """`render`'s photo (the same pixels for the same generator) and the product's pixels in it
    (bool H×W), known by construction. Only the shifts that place the product on a setting:
    a degradation keeps the catalogue's own frame and has no placement. `look` (LOOKS)
    recolours the product first: "tinted" dyes it one saturated colour, "colour_mapped" maps
    its shading to two colours (what colour_tint and colour_photo do); "as_is" (the default)
    keeps it, and only then is the photo `render`'s."""
    if shift not in SHIFTS or shift in DEGRADATIONS:
        raise ValueError(f"no placement for shift {shift!r}: choose from {', '.join(SETTINGS)}")
    if look not in LOOKS:
        raise ValueError(f"unknown look {look!r}: choose from {', '.join(LOOKS)}")
    if image.mode not in ("L", "RGB"):
        image = canonical_image(image, 3)
    photo, alpha, box = _placed(image, shift, rng, look)
    return photo, placed_mask(alpha, box, photo.size)


def _placed(
    image: Image.Image, shift: str, rng: np.random.Generator, look: str = "as_is"
) -> tuple[Image.Image, np.ndarray, tuple[int, int, int]]:
    """(photo, silhouette, box) of a shift that places the product on a setting."""
    appearance, alpha = product_layers(image)
    appearance = recolour(appearance, look, rng)
    if shift == "phone":
        photo, box = _phone(appearance, alpha, rng)
        return photo, alpha, box
    if shift == "white_background":
        level = rng.uniform(235, 255)
        photo, box = _on_background(appearance, alpha, rng, lambda h, w: np.full((h, w, 3), level))
    elif shift == "light_background":
        colour = _light_colour(rng)
        photo, box = _on_background(appearance, alpha, rng, lambda h, w: np.tile(colour, (h, w, 1)))
    elif shift == "textured_background":
        photo, box = _on_background(appearance, alpha, rng, lambda h, w: texture(h, w, rng))
    elif shift == "busy_background":
        photo, box = _on_background(appearance, alpha, rng, lambda h, w: clutter(h, w, rng))
    elif shift == "colour_tint":
        look = _tinted(appearance, _saturated_colour(rng))
        photo, box = _on_background(look, alpha, rng, lambda h, w: np.full((h, w, 3), 245.0))
    else:  # colour_photo
        look = _colour_mapped(appearance, rng)
        colour = _light_colour(rng, 0.1)
        photo, box = _on_background(look, alpha, rng, lambda h, w: np.tile(colour, (h, w, 1)))
    return _as_image(photo), alpha, box


def degrade(image: Image.Image, shift: str, rng: np.random.Generator) -> Image.Image:
    """The catalogue image itself, degraded: jpeg, blur_noise, occlusion or rotation."""
    image = image.convert("RGB")
    if shift == "jpeg":
        return _jpeg(image, int(rng.integers(5, 16)))
    if shift == "rotation":
        angle = float(rng.choice([-1, 1]) * rng.uniform(8, 20))
        border = tuple(int(v) for v in np.median(np.asarray(image)[0], axis=0))
        return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=border)
    if shift == "blur_noise":
        blurred = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.2))))
        arr = np.asarray(blurred).astype(np.float32)
        return _as_image(arr + rng.normal(0, rng.uniform(6, 14), arr.shape[:2])[..., None])
    # occlusion: a block covering a quarter of the product's box, from one of its sides
    arr = np.asarray(image).astype(np.float32)
    _, alpha = product_layers(image)
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if len(rows) == 0:
        return image
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = bottom - top, right - left
    colour = rng.uniform(40, 200) if rng.random() < 0.5 else _saturated_colour(rng)
    side = int(rng.integers(4))
    if side < 2:  # a band across the top or the bottom quarter
        band = max(1, round(h / 4))
        y0 = top if side == 0 else bottom - band
        arr[y0 : y0 + band, left:right] = colour
    else:  # the left or the right quarter
        band = max(1, round(w / 4))
        x0 = left if side == 2 else right - band
        arr[top:bottom, x0 : x0 + band] = colour
    return _as_image(arr)


def render_set(
    images: list[Image.Image], shift: str, seed: int, indices: list[int] | None = None
) -> list[Image.Image]:
    """`images` under `shift`, image i seeded by (seed, shift, indices[i])."""
    indices = list(range(len(images))) if indices is None else indices
    return [
        render(im, shift, shift_rng(seed, shift, i)) for im, i in zip(images, indices, strict=True)
    ]


def training_shift_odds(weights: dict[str, float] | None) -> np.ndarray:
    """Probability of each shift (SHIFTS order) for a training view: `weights` relative, a
    shift not named weighs 1."""
    odds = np.array([(weights or {}).get(shift, 1.0) for shift in SHIFTS], np.float64)
    return odds / odds.sum()


def training_shift(seed: int, index: int, odds: np.ndarray) -> tuple[str, np.random.Generator]:
    """(the shift drawn for training row `index`, the generator that goes on to render it)."""
    rng = shift_rng(seed, "training", index)
    return SHIFTS[int(rng.choice(len(SHIFTS), p=odds))], rng


def _render_views_chunk(job: tuple) -> np.ndarray:
    """Worker: open, render under a per-image shift, preprocess; uint8 N×size×size×channels."""
    paths, indices, seed, size, channels, canonical, odds, segment = job
    out = []
    for path, i in zip(paths, indices, strict=True):
        shift, rng = training_shift(seed, i, odds)
        if isinstance(path, np.ndarray):  # an already decoded catalogue image
            photo = render(Image.fromarray(path.squeeze()), shift, rng)
        else:
            with Image.open(path) as image:
                photo = render(image, shift, rng)
        out.append(image_to_uint8(photo, size, channels, canonical, segment))
    return np.stack(out) if out else np.zeros((0, size, size, channels), np.uint8)


def render_views(
    paths: list,
    seed: int,
    size: int,
    channels: int,
    canonical: bool,
    processes: int | None = None,
    progress: bool = True,
    weights: dict[str, float] | None = None,
    segment: Segment | None = None,
) -> np.ndarray:
    """One shopper-style view per catalogue image (each under a shift drawn for it with the
    odds of `weights`, see training_shift_odds), as the model takes it: training's
    augmentation towards the shopper domain (training rows only; evaluation renders the test
    split with its own seed). Rendered in `processes` worker
    processes (default: every core), forked: a spawned worker would re-import the caller's
    main module, and the workers use numpy and PIL only (no torch threads). With `segment` (a
    learned segmenter, canonical only: it runs torch) the views are rendered in this process:
    torch after a fork of a process that ran OpenMP threads can deadlock."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm import tqdm

    chunk = 500
    jobs = [
        (
            paths[i : i + chunk],
            list(range(i, min(i + chunk, len(paths)))),
            seed,
            size,
            channels,
            canonical,
            training_shift_odds(weights),
            segment,
        )
        for i in range(0, len(paths), chunk)
    ]
    workers = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
    if segment is not None:
        workers = 1
    parts = []
    with tqdm(total=len(paths), desc="shopper views", unit="img", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                parts.append(_render_views_chunk(job))
                bar.update(len(job[0]))
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                for job, part in zip(jobs, pool.map(_render_views_chunk, jobs), strict=True):
                    parts.append(part)
                    bar.update(len(job[0]))
    return np.concatenate(parts) if parts else np.zeros((0, size, size, channels), np.uint8)
