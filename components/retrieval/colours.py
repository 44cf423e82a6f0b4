"""Named colours of a product photo: the palette, `colours_of` (the located product's pixels,
not the background's, named in CIELAB), the colour filter's names and the text query's colour
word. Used by the /tags answer (components/retrieval/tags.py), the catalogue index's `colours`
column (components/stages/evaluate.py build_index) and its colour filter (index.py)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import numpy as np
from PIL import Image

FOREGROUND_DELTA = 16  # (0-255) a pixel must differ from the border colour by (also shade_of)

# The palette: name -> sRGB prototype. Pixels are named in CIELAB (D65): a pixel whose chroma
# sqrt(a*^2 + b*^2) is below CHROMA_MIN is achromatic and named by its lightness alone (L* below
# BLACK_MAX_L black, above WHITE_MIN_L white, else grey), so a grayscale image only ever gives
# black / grey / white; any other pixel takes the nearest prototype (CIE76 distance, all 13).
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "white": (255, 255, 255),
    "red": (200, 30, 35),
    "navy": (25, 35, 90),
    "blue": (40, 100, 210),
    "green": (50, 140, 60),
    "yellow": (240, 210, 50),
    "orange": (240, 130, 30),
    "pink": (240, 150, 190),
    "purple": (120, 50, 150),
    "beige": (215, 190, 150),
    "brown": (115, 70, 40),
}
COLOURS = tuple(PALETTE)
SYNONYMS = {"gray": "grey", "tan": "beige", "cream": "beige", "violet": "purple"}
CHROMA_MIN, BLACK_MAX_L, WHITE_MIN_L = 12.0, 30.0, 85.0
COLOUR_SHARE_MIN, MAX_COLOURS = 0.15, 3  # a colour is a tag with >= 15% of the product's pixels
COLOUR_MAX_SIDE = 64  # colour_pixels box-reduces larger photos to at most this many px a side
_LUT_BITS = 6  # pixels are named through a 64x64x64 lookup table of RGB bins
_CHUNK = 2048  # colours_of_batch works through this many images at a time (bounded memory)


class UnknownColour(ValueError):
    """A colour filter naming no colour of the palette (the service answers 422)."""


def colour_name(name: str) -> str:
    """The palette's name for `name` (case-insensitive; "gray" -> "grey"), else UnknownColour."""
    key = name.strip().lower()
    key = SYNONYMS.get(key, key)
    if key not in PALETTE:
        raise UnknownColour(f"unknown colour {name!r}; valid: {list(COLOURS)}")
    return key


def colour_bits(names: str) -> int:
    """The bitmask of comma-joined palette names ("navy,white"): bit i is COLOURS[i]."""
    parts = {part.strip().lower() for part in str(names or "").split(",")}
    return sum(1 << i for i, c in enumerate(COLOURS) if c in parts)


@functools.cache
def colours_from_bits(bits: int) -> tuple[str, ...]:
    return tuple(c for i, c in enumerate(COLOURS) if bits >> i & 1)


def split_colour_query(query: str) -> tuple[str | None, str]:
    """(palette colour, the query without that word) for the first colour word of a text
    query ("red dress" -> ("red", "dress")), or (None, query) when it names no colour."""
    for match in re.finditer(r"[A-Za-z]+", query):
        word = SYNONYMS.get(match.group().lower(), match.group().lower())
        if word in PALETTE:
            rest = query[: match.start()] + query[match.end() :]
            return word, " ".join(rest.split())
    return None, query


def _linear(srgb: np.ndarray) -> np.ndarray:
    """sRGB 0-255 -> linear light 0..1."""
    c = np.asarray(srgb, np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_XYZ = ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505))
_WHITE = (0.95047, 1.0, 1.08883)


def _lab_of_linear(linear: np.ndarray) -> np.ndarray:
    """Linear RGB (..., 3) -> CIELAB (D65 white); plain arithmetic, cheaper than a BLAS call."""
    r, g, b = linear[..., 0], linear[..., 1], linear[..., 2]
    fx, fy, fz = (
        _lab_f((m[0] * r + m[1] * g + m[2] * b) / w) for m, w in zip(_XYZ, _WHITE, strict=True)
    )
    return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -1)


def _lab_f(t: np.ndarray) -> np.ndarray:
    return np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)


@functools.cache
def _colour_table() -> np.ndarray:
    """Palette index (uint8) of every RGB bin's centre, flat over r * 64^2 + g * 64 + b."""
    step = 1 << (8 - _LUT_BITS)
    centres = np.arange(1 << _LUT_BITS) * step + (step - 1) / 2
    lin = _linear(centres)
    grid = np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    lab = _lab_of_linear(grid)
    protos = _lab_of_linear(_linear(np.array(list(PALETTE.values()))))
    light, a, b = lab[:, 0].copy(), lab[:, 1].copy(), lab[:, 2].copy()
    best, nearest = np.full(len(lab), np.inf), np.zeros(len(lab), np.intp)
    for i, (pl, pa, pb) in enumerate(protos):  # CIE76: Euclidean distance in L*a*b*
        distance = (light - pl) ** 2 + (a - pa) ** 2 + (b - pb) ** 2
        closer = distance < best
        best[closer], nearest[closer] = distance[closer], i
    grey = np.where(light < BLACK_MAX_L, 0, np.where(light > WHITE_MIN_L, 2, 1))
    chroma = np.hypot(a, b)
    return np.where(chroma < CHROMA_MIN, grey, nearest).astype(np.uint8)


def colours_of(image: np.ndarray) -> list[tuple[str, float]]:
    """The product's named colours [(name, share of its pixels)], best first (see the batch)."""
    return colours_of_batch(np.asarray(image)[None])[0]


def colours_of_batch(images: np.ndarray) -> list[list[tuple[str, float]]]:
    """colours_of for a stack of same-sized uint8 images, N×H×W or N×H×W×{1,3,4}.

    1. the product: the background is the median colour of the outermost pixels and its spread
       the 75th percentile of their distance to it (0 on a plain background); the product is
       every pixel farther than spread + FOREGROUND_DELTA from it (largest channel difference),
       as shade_of; an RGBA image with transparent pixels uses its opaque ones (alpha > 0).
       With under 1% product pixels the whole (opaque) image is used;
    2. a grayscale image (one channel, or three equal ones) on a dark border (median < 128) is a
       photographic negative, as Fashion-MNIST's light products on black are: its colours are
       named from 255 - x, the product's real look (components/model/shopper.py product_layers
       does the same); colour photos keep their pixels;
    3. each product pixel is named with the palette (PALETTE's comment: CIELAB, CHROMA_MIN,
       BLACK_MAX_L, WHITE_MIN_L), through a lookup table of 6-bit RGB bins;
    4. the colours with at least COLOUR_SHARE_MIN (15%) of the product's pixels, at most
       MAX_COLOURS (3), sorted by share; the single most common one if none reaches 15%.
       Score = share rounded to 4 places. A fully transparent image has no colours.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3, 4):
        raise ValueError(f"expected N×H×W(×1|3|4) images, got shape {x.shape}")
    out: list[list[tuple[str, float]]] = []
    for start in range(0, len(x), _CHUNK):
        counts = _colour_counts(x[start : start + _CHUNK])
        out += [_top_colours(row) for row in counts]
    return out


def _colour_counts(x: np.ndarray) -> np.ndarray:
    """N×len(PALETTE) pixel counts of each image's product (steps 1-3 of colours_of_batch)."""
    n, h, w, c = x.shape
    px = x.reshape(n, h * w, c)
    opaque = px[..., 3] > 0 if c == 4 else None
    chans = [px[..., j] for j in range(min(c, 3))]  # uint8 N×P each
    ring = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    ring_chans = [ring[..., j] for j in range(len(chans))]  # N×B each
    b = ring.shape[1]
    background = np.stack([np.partition(r, b // 2, axis=1)[:, b // 2] for r in ring_chans], 1)
    background = background.astype(np.int16)  # N×C, the (upper) median of the ring
    q75 = (3 * (b - 1)) // 4
    spread = np.partition(_distance(ring_chans, background), q75, axis=1)[:, q75]
    fg = _distance(chans, background) > (spread + FOREGROUND_DELTA)[:, None]
    cut_out = np.zeros(n, bool) if opaque is None else ~opaque.all(axis=1)
    if opaque is not None:
        fg = np.where(cut_out[:, None], opaque, fg & opaque)
    few = fg.sum(axis=1) < max(1, 0.01 * h * w)
    if few.any():
        fg[few] = True if opaque is None else opaque[few]
    gray = np.ones(n, bool)
    if len(chans) == 3:
        gray = ((chans[0] == chans[1]) & (chans[1] == chans[2])).all(axis=1)
    negative = gray & (background[:, 0] < 128) & ~cut_out
    if negative.any():
        chans = [np.where(negative[:, None], 255 - ch, ch) for ch in chans]
    if len(chans) == 1:
        codes = _grey_table()[chans[0]]
    else:
        r, g, bl = ((ch >> (8 - _LUT_BITS)).astype(np.int32) for ch in chans)
        codes = _colour_table()[(r << (2 * _LUT_BITS)) | (g << _LUT_BITS) | bl]
    k = len(PALETTE)
    keyed = codes.astype(np.intp) + (np.arange(n) * k)[:, None]
    return np.bincount(keyed[fg], minlength=n * k).reshape(n, k)


def _distance(chans: list[np.ndarray], background: np.ndarray) -> np.ndarray:
    """Largest channel difference of each pixel from its image's background colour."""
    far = np.abs(chans[0].astype(np.int16) - background[:, :1])
    for j, ch in enumerate(chans[1:], start=1):
        far = np.maximum(far, np.abs(ch.astype(np.int16) - background[:, j : j + 1]))
    return far


@functools.cache
def _grey_table() -> np.ndarray:
    """_colour_table for the grey levels 0-255 (r = g = b)."""
    q = np.arange(256) >> (8 - _LUT_BITS)
    return _colour_table()[(q << (2 * _LUT_BITS)) | (q << _LUT_BITS) | q]


def _top_colours(counts: np.ndarray) -> list[tuple[str, float]]:
    total = int(counts.sum())
    if total == 0:
        return []
    shares = counts / total
    order = np.argsort(-shares, kind="stable")
    picked = [i for i in order[:MAX_COLOURS] if shares[i] >= COLOUR_SHARE_MIN] or [order[0]]
    return [(COLOURS[i], round(float(shares[i]), 4)) for i in picked]


def colour_pixels(image: Image.Image) -> np.ndarray:
    """A decoded photo as colours_of wants it: uint8 H×W (grayscale), H×W×3 (colour) or H×W×4
    (with transparency), box-reduced to at most COLOUR_MAX_SIDE px a side. The first frame;
    orientation is ignored (it does not change which pixels the product has)."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    mode = image.mode
    if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode.startswith("I") or mode == "F":  # 16/32-bit grayscale, scaled as the model's input
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    elif mode not in ("L", "RGB"):
        image = image.convert("L" if mode == "1" else "RGB")
    factor = -(-max(image.size) // COLOUR_MAX_SIDE)
    if factor > 1:
        image = image.reduce(factor)
    return np.asarray(image)


def photo_colours(image: Image.Image) -> list[tuple[str, float]]:
    """colours_of a decoded upload (POST /tags)."""
    return colours_of(colour_pixels(image))


def catalogue_colours(paths: Iterable) -> list[str]:
    """Each catalogue image's colours as one comma-joined string ("navy,white"), for the index:
    the images are read with colour_pixels and named in batches of equal size."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(colour_pixels(image))
    by_shape: dict[tuple, list[int]] = {}
    for i, arr in enumerate(arrays):
        by_shape.setdefault(arr.shape, []).append(i)
    names = [""] * len(arrays)
    for rows in by_shape.values():
        for i, colours in zip(
            rows, colours_of_batch(np.stack([arrays[i] for i in rows])), strict=True
        ):
            names[i] = ",".join(name for name, _ in colours)
    return names
