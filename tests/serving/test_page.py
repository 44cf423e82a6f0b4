"""The web page end to end in Debian's headless Chromium (selenium + chromedriver), against
the real service: drop a photo → category, tags, similar products as images and the model
version; type a query → products; a non-image file → a readable error. No network besides
loopback: every host but 127.0.0.1 resolves to nothing."""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from components.model.scenes import compose_scene
from tests.conftest import headless_chromium

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium()
    yield driver
    driver.quit()


def by_testid(driver, name: str) -> list:
    return driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def loaded_result_images(driver) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll('[data-testid=result] img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )


def test_drop_a_photo_then_type_a_query(server, champion, browser, tmp_path):
    products = pd.read_parquet(champion.ctx.work / "evaluate" / "index" / "products.parquet")
    row = products[products["split"] == "test"].iloc[0]
    photo = champion.ctx.catalogue_dir / row["path"]
    expected = httpx.post(f"{server.url}/classify", files={"image": photo.read_bytes()}).json()
    wait = WebDriverWait(browser, 60)

    browser.get(f"{server.url}/")
    by_testid(browser, "file-input")[0].send_keys(str(photo))
    wait.until(lambda d: len(by_testid(d, "result")) == 12 and by_testid(d, "category-name"))
    assert by_testid(browser, "model-version")[0].text == expected["model_version"]
    assert by_testid(browser, "category-name")[0].text == expected["category"]
    tags = [t.text for t in by_testid(browser, "tag")]
    assert len(tags) == 4 and any(expected["category"] in t for t in tags)
    first = by_testid(browser, "result")[0]
    assert first.get_attribute("data-product-id") == row["product_id"]  # itself, from the index
    wait.until(lambda d: loaded_result_images(d) >= 4)  # the similar products shown as images

    box = by_testid(browser, "query-input")[0]
    box.clear()
    box.send_keys("ankle boots")
    by_testid(browser, "query-submit")[0].click()
    # a text search clears the photo's category and fills the results again
    wait.until(
        lambda d: not by_testid(d, "category-name") and by_testid(d, "status")[0].text == "Done."
    )
    assert len(by_testid(browser, "result")) == 12
    assert not by_testid(browser, "error")[0].is_displayed()

    junk = tmp_path / "notes.txt"
    junk.write_text("not a photo")
    by_testid(browser, "file-input")[0].send_keys(str(junk))
    wait.until(lambda d: by_testid(d, "error")[0].is_displayed())
    message = by_testid(browser, "error")[0].text
    assert "415" in message and "image" in message.lower()
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_the_page_draws_the_detected_products_and_shows_each_on_a_click(
    server, champion, browser, tmp_path
):
    products = pd.read_parquet(champion.ctx.work / "evaluate" / "index" / "products.parquet")
    rows = products[products["split"] == "test"].iloc[12:15]
    images = [Image.open(champion.ctx.catalogue_dir / p) for p in rows["path"]]
    scene = compose_scene(
        images,
        rows["label"].tolist(),
        np.random.default_rng(4),
        min_visible=0.99,
        scale=(0.3, 0.45),
        backgrounds=("plain_light",),
    )
    path = tmp_path / "outfit.png"
    scene.photo.save(path)
    answer = httpx.post(
        f"{server.url}/detect", files={"image": path.read_bytes()}, data={"k": "12"}, timeout=30
    ).json()
    assert answer["items"], "the test detector finds nothing in the scene"
    wait = WebDriverWait(browser, 60)

    browser.get(f"{server.url}/")
    by_testid(browser, "file-input")[0].send_keys(str(path))
    wait.until(lambda d: len(by_testid(d, "detect-box")) == len(answer["items"]))
    assert by_testid(browser, "scene")[0].is_displayed()
    whole = by_testid(browser, "category-name")[0].text
    boxes = by_testid(browser, "detect-box")
    for box, item in zip(boxes, answer["items"], strict=True):
        assert box.get_attribute("data-category") == item["category"]
        # drawn where the item is: the box's place over the photo, in the photo's proportions
        image = by_testid(browser, "scene")[0].find_element(By.TAG_NAME, "img")
        scale = image.size["width"] / answer["width"]
        left = box.location["x"] - image.location["x"]
        assert abs(left - item["box"][0] * scale) <= 3, (left, item["box"][0] * scale)
        assert abs(box.size["width"] - (item["box"][2] - item["box"][0]) * scale) <= 5
    last = answer["items"][-1]
    boxes[-1].click()
    wait.until(lambda d: by_testid(d, "category-name")[0].text == last["category"])
    assert boxes[-1].get_attribute("aria-pressed") == "true"
    shown = [r.get_attribute("data-product-id") for r in by_testid(browser, "result")]
    assert shown == [r["product_id"] for r in last["results"]]
    tags = [t.text for t in by_testid(browser, "tag")]
    assert any(last["category"] in t for t in tags)
    by_testid(browser, "whole-photo")[0].click()
    wait.until(lambda d: by_testid(d, "category-name")[0].text == whole)
    assert boxes[-1].get_attribute("aria-pressed") == "false"
