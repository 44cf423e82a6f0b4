"""POST /explain on the real service: a Grad-CAM heatmap PNG of the photo's own size, the
region that drove the prediction inside the photo, saliency that sits on the product rather
than on the empty background, bad input refused like everywhere else, and the page's panel."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from tests.conftest import CATEGORIES, headless_chromium

pytestmark = pytest.mark.serving


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def test_rows(champion) -> pd.DataFrame:
    products = pd.read_parquet(champion.ctx.work / "evaluate" / "index" / "products.parquet")
    return products[products["split"] == "test"].head(20)


def read_pixels(champion, row) -> np.ndarray:
    with Image.open(champion.ctx.catalogue_dir / row["path"]) as image:
        return np.asarray(image.convert("L"))


def test_explain_returns_a_heatmap_of_the_photo_size_and_a_region_inside_it(
    server, champion, test_rows
):
    pixels = read_pixels(champion, test_rows.iloc[0])
    wide = np.zeros((60, 90), np.uint8)  # a non-square photo: padding must be undone
    wide[:, 15:75] = np.asarray(Image.fromarray(pixels).resize((60, 60)))
    reply = httpx.post(f"{server.url}/explain", files={"image": ("p.png", png_bytes(wide))})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model_version"] == champion.version
    assert body["method"] == "grad-cam" and body["category"] in CATEGORIES
    classified = httpx.post(f"{server.url}/classify", files={"image": png_bytes(wide)}).json()
    assert body["category"] == classified["category"]  # the explanation is of the answer given
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heatmap.format == "PNG" and heatmap.size == (90, 60)
    heatmap.load()  # decodes fully: a valid, untruncated PNG
    assert body["heatmap_size"] == {"width": 90, "height": 60}
    r = body["region"]
    assert 0 <= r["x0"] < r["x1"] <= 90 and 0 <= r["y0"] < r["y1"] <= 60
    saliency = np.asarray(body["saliency"])
    assert saliency.shape == (28, 28) and saliency.min() >= 0 and saliency.max() == 1.0


def test_explain_as_png_with_the_region_in_headers(server, champion, test_rows):
    pixels = read_pixels(champion, test_rows.iloc[1])
    big = np.asarray(Image.fromarray(pixels).resize((300, 300)).convert("RGB"))
    reply = httpx.post(f"{server.url}/explain?format=png", files={"image": png_bytes(big)})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png"
    assert reply.headers["x-model-version"] == champion.version
    heatmap = Image.open(io.BytesIO(reply.content))
    assert heatmap.size == (300, 300) and heatmap.mode == "RGB"
    x0, y0, x1, y1 = map(int, reply.headers["x-region"].split(","))
    assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 300


def test_saliency_sits_on_the_product_not_on_the_empty_background(server, champion, test_rows):
    """Pooled over 20 real test photos: the mean saliency on the product's pixels must exceed
    the mean on background pixels at least 2 px away from it. A model (or a mapping bug) that
    explains by the empty background fails this; a region box in the wrong place would too."""
    on_product, on_blank, peak_on_product = [], [], 0
    for _, row in test_rows.iterrows():
        pixels = read_pixels(champion, row)
        body = httpx.post(f"{server.url}/explain", files={"image": png_bytes(pixels)}).json()
        saliency = np.asarray(body["saliency"])  # 28×28 = this square photo's own grid
        product = pixels > 30
        blank = ~ndimage.binary_dilation(pixels > 0, iterations=2)
        if blank.sum() < 10:
            continue
        on_product.append(saliency[product].mean())
        on_blank.append(saliency[blank].mean())
        r = body["region"]
        peak_on_product += bool(product[r["y0"] : r["y1"], r["x0"] : r["x1"]].any())
    assert len(on_product) >= 15
    assert np.mean(on_product) > np.mean(on_blank), (np.mean(on_product), np.mean(on_blank))
    assert peak_on_product == len(on_product)  # every region box covers some of the product


@pytest.mark.parametrize(
    ("files", "url_suffix", "status"),
    [
        ({"image": ("empty.png", b"", "image/png")}, "", 400),
        ({"image": ("notes.txt", b"not a photo", "text/plain")}, "", 415),
        ({"image": ("junk.png", b"\x89PNG\r\n\x1a\n-truncated", "image/png")}, "", 415),
        ({"other": ("x.png", b"", "image/png")}, "", 400),
        (
            {"image": ("p.png", png_bytes(np.zeros((28, 28), np.uint8)), "image/png")},
            "?format=gif",
            400,
        ),
    ],
)
def test_explain_refuses_bad_input_with_a_json_error(server, files, url_suffix, status):
    reply = httpx.post(f"{server.url}/explain{url_suffix}", files=files)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_the_page_shows_the_heatmap_after_a_photo_is_dropped(server, champion, test_rows):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium()
    try:
        driver.get(f"{server.url}/")
        photo = champion.ctx.catalogue_dir / test_rows.iloc[0]["path"]
        driver.find_element(By.CSS_SELECTOR, '[data-testid="file-input"]').send_keys(str(photo))
        shown = (
            "const i = document.querySelector('[data-testid=heatmap]');"
            "return !!i && i.complete && i.naturalWidth > 0;"
        )
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(shown))
        region = driver.find_element(By.CSS_SELECTOR, '[data-testid="explain-region"]').text
        category = driver.find_element(By.CSS_SELECTOR, '[data-testid="category-name"]').text
        assert category in region and "x " in region
    finally:
        driver.quit()
