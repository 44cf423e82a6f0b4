"""schemathesis hooks for the API contract run (tests/serving/test_contract.py, docs/serving.md):
the uploaded photos it generates are real images.

The contract declares each photo as `{type: string, format: binary}` (multipart field `image`,
or the raw body) and says in words which bytes are valid: a JPEG, PNG, WebP, GIF or BMP image.
JSON Schema has no keyword for "decodes as an image", so schemathesis' own `binary` generator
draws any bytes (a few 1-pixel files mixed with random ones, PDFs and ZIPs); the service rightly
answers those with 415, and the positive-data check counts each as a valid request refused.
This hook gives the `binary` format a generator of real images (every format, colour mode and
a range of sizes) so that schema-valid cases are valid requests. It narrows nothing else:
negative cases (a missing or repeated `image`, a text part, an empty body, wrong types of the
other fields, unsupported content types) are generated as before and must still be refused.

Loaded with SCHEMATHESIS_HOOKS=tests/serving/schemathesis_hooks.py (a path: no import path
needed)."""

from __future__ import annotations

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image, ImageDraw

# PIL format -> the colour modes it saves
MODES = {
    "PNG": ("L", "RGB", "RGBA", "P"),
    "JPEG": ("L", "RGB", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
    "GIF": ("L", "P"),
    "BMP": ("L", "RGB", "P"),
}
colours = st.tuples(*[st.integers(0, 255)] * 3)


@st.composite
def photos(draw: st.DrawFn) -> bytes:
    """A product-like photo: a background and a box of another colour, saved in a format and
    colour mode the service accepts (1 to 160 px a side)."""
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    width, height = draw(st.integers(1, 160)), draw(st.integers(1, 160))
    image = Image.new("RGB", (width, height), draw(colours))
    x0, y0 = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
    x1, y1 = draw(st.integers(x0, width - 1)), draw(st.integers(y0, height - 1))
    ImageDraw.Draw(image).rectangle((x0, y0, x1, y1), fill=draw(colours))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


schemathesis.openapi.format("binary", photos())
