"""Upload decoding and checks (formats, sizes, colour modes), request parsing, image statistics."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # PIL's JPEG plugin also opens phones' MPO files
IMAGE_TYPES = {
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/bmp",
    "image/x-bmp",
    "image/x-ms-bmp",
}
SNIFFED_TYPES = {"", "application/octet-stream"}  # no declared type: the bytes decide


class BadImage(ValueError):
    """An upload the service refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 36_000_000  # e.g. 6000×6000; more is refused before decoding


def decode_upload(data: bytes, content_type: str | None, limits: UploadLimits) -> Image.Image:
    """Decoded first frame of an uploaded JPEG / PNG / WebP / GIF / BMP, or BadImage.

    Refuses: empty (400), over max_bytes (413), a declared non-image content type (415), bytes
    that are not one of the formats (415), over max_pixels or a decompression bomb (413), a
    truncated or corrupt file (400). Colour modes are left to transforms.image_to_uint8.
    """
    if not data:
        raise BadImage("empty upload: send an image file")
    if len(data) > limits.max_bytes:
        raise BadImage(
            f"upload of {len(data)} bytes exceeds the {limits.max_bytes}-byte limit", 413
        )
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in IMAGE_TYPES | SNIFFED_TYPES:
        raise BadImage(
            f"unsupported content type {declared!r}: send an image (JPEG, PNG, WebP, GIF or BMP)",
            415,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImage(f"too many pixels: {error}", 413) from error
        except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
            raise BadImage("not a decodable JPEG, PNG, WebP, GIF or BMP image", 415) from error
        width, height = image.size
        if width * height > limits.max_pixels:
            raise BadImage(f"too many pixels: {width}×{height} exceeds {limits.max_pixels}", 413)
        if width < 1 or height < 1:
            raise BadImage(f"image has no pixels ({width}×{height})")
        try:
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImage(f"too many pixels: {error}", 413) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise BadImage(f"truncated or corrupt {image.format} image: {error}") from error
    return image


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compute_image_stats(image: Image.Image, pixels: np.ndarray | None = None) -> dict[str, float]:
    """Original size and aspect (width / height) plus brightness and contrast (mean and std of
    the photo's own grey levels, 0..1, on a copy reduced to at most 64 px). Measured on the
    photo, not on the model's input: canonical preprocessing stretches contrast, which would
    hide a darkened camera from monitoring. The drift reference of every model version is
    computed with this same function (components/model/reference.py), so served and reference
    statistics agree. (`pixels` is accepted for older callers and ignored.)"""
    small = image
    factor = max(1, max(image.size) // 64)
    if factor > 1:
        small = image.reduce(factor) if image.mode in ("L", "RGB", "RGBA", "LA") else image
    if small.mode in ("RGBA", "LA", "PA", "P"):
        small = small.convert("RGBA")
        black = Image.new("RGBA", small.size, (0, 0, 0, 255))
        small = Image.alpha_composite(black, small)
    try:
        grey = np.asarray(small.convert("L"), dtype=np.float64)
    except (ValueError, OSError):  # modes PIL cannot turn into L directly (e.g. I;16)
        grey = np.asarray(pixels if pixels is not None else small, dtype=np.float64)
        grey = grey.mean(axis=-1) if grey.ndim == 3 else grey
    return {
        "width": int(image.size[0]),
        "height": int(image.size[1]),
        "aspect": round(image.size[0] / image.size[1], 4),
        "brightness": round(float(grey.mean() / 255.0), 4),
        "contrast": round(float(grey.std() / 255.0), 4),
    }


def parse_k(value: Any, low: int = 1, high: int = 100) -> int:
    """An integer k in [low, high] from a form / query / JSON value, else ValueError."""
    try:
        k = int(str(value).strip())
    except ValueError:
        raise ValueError(f"k must be an integer in {low}..{high}, got {value!r}") from None
    if not low <= k <= high:
        raise ValueError(f"k must be an integer in {low}..{high}, got {k}")
    return k
