"""The web page end to end in Debian's headless Chromium (selenium + chromedriver), against
the real service: drop a photo → category, tags, similar products as images and the model
version; type a query → products; a non-image file → a readable error. No network besides
loopback: every host but 127.0.0.1 resolves to nothing."""

from __future__ import annotations

import httpx
import pandas as pd
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

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
