"""Shared fixtures. Tests shrink the REAL config (params.yaml) and use real Fashion-MNIST
images; telemetry of every tool is off before anything is imported."""

from __future__ import annotations

import os

from components.config import TELEMETRY_OFF

for _key, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from components.config import DEFAULT_PARAMS, load_params, state_paths  # noqa: E402
from components.data.catalogue import load_fashion_mnist  # noqa: E402
from components.data.sources import fashion_mnist_dir  # noqa: E402

# wherever `make dataset` put it: Debian's folder (params data.fashion_mnist_dir), or without
# root the copy it unpacks into the state folder ($VITRINE_HOME or .vitrine/debian/...); the
# lookup the ingest stage itself uses
FMNIST_DIR = fashion_mnist_dir(load_params().data, state_paths())


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server (and its API) for the flows of one test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def fmnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return load_fashion_mnist(FMNIST_DIR)


def shrunk_params(catalogue_dir: Path, **overrides: dict) -> dict:
    """The real params.yaml with a tiny training budget, for tests."""
    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    params["data"]["catalogue_dir"] = str(catalogue_dir)
    params["train"].update(
        epochs=3, cnn_widths=[8, 16, 32], embedding_dim=32, batch_size=32, lr=0.02, patience=5
    )
    # the seconds-long MLP cleaner: the early CNN (the default, 25 epochs on a small
    # catalogue) is run by tests/unit/test_labels.py and the colour catalogue's loop
    params["labels"].update(model="mlp", folds=3, pca_components=16)
    # uniform shopper views: busy_background x4 (the default) is measured for full training
    # (docs/shopper.md); the 40-batch drift champion trained with it embedded the unknown
    # category too close to the catalogue (MMD 0.0095, threshold 0.01; 0.0169 with uniform views)
    params["train"]["shopper_weights"] = {}
    params["evaluation"]["latency_images"] = 16
    params["evaluation"]["shopper"]["images"] = 60  # each under every shift
    params["gate"].update(min_accuracy=0.5, min_recall_at_1=0.5)
    # a tiny model on 60 shopper photos: floors off, regressions only when large
    params["gate"]["shopper"] = {
        "min_accuracy": 0.0,
        "min_recall_at_1": 0.0,
        "max_regression": {"accuracy": 0.5, "recall_at_1": 0.5},
    }
    # no detector unless a test asks for one (TEST_DETECTOR): each loop would train one
    params["detect"].update(enabled=False, eval_scenes=10)
    params["gate"]["detect"] = {"min_map50": 0.0, "max_regression": 1.0}
    # the names tests approve with (`registry.approve(v, by=...)`) are model owners
    params["promotion"]["owners"] = ["owner", "test"]
    for section, values in overrides.items():
        params[section].update(values)
    return params


# A detector small and quick enough for tests that need one to find products (the serving
# tier, the bundle test): plain-background scenes of a few large products it finds after a
# few seconds of training (docs/detection.md); not what it scores on the held-out scenes.
TEST_DETECTOR = {
    "enabled": True,
    "max_steps": 150,
    "scenes": 300,
    "side": 128,
    "widths": [8, 16, 32],
    "eval_scenes": 10,
}


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params))
    return path


CATEGORIES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
BAD_ROWS = {  # product_id -> the reason validation must give it
    "bad-missing": "missing_file",
    "bad-empty": "empty_file",
    "bad-truncated": "truncated",
    "bad-notimage": "not_an_image",
    "bad-blank": "blank",
    "bad-dup-image": "exact_duplicate",
    "bad-label": "unknown_label",
    "p-train-00000": "duplicate_product_id",  # a second row with an existing id
}


def write_csv_catalogue(
    folder: Path, fmnist: dict, n_train: int, n_test: int, with_bad_rows: bool = False
) -> Path:
    """A shop-style catalogue (CSV + PNG files) from real Fashion-MNIST images."""
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fmnist[split]
        for i in range(n):
            name = f"img/{split}-{i:05d}.png"
            Image.fromarray(images[i]).save(folder / name)
            cat = CATEGORIES[int(labels[i])]
            rows.append(f"p-{split}-{i:05d},{name},{cat},{cat} item {i},{split}")
    if with_bad_rows:
        good = (folder / "img/train-00001.png").read_bytes()
        (folder / "img/empty.png").write_bytes(b"")
        (folder / "img/truncated.png").write_bytes(good[: len(good) // 2])
        (folder / "img/notimage.png").write_text("this is not an image")
        Image.new("L", (28, 28), 200).save(folder / "img/blank.png")
        (folder / "img/dup.png").write_bytes(good)
        rows += [
            "bad-missing,img/nowhere.png,Bag,,train",
            "bad-empty,img/empty.png,Bag,,train",
            "bad-truncated,img/truncated.png,Bag,,train",
            "bad-notimage,img/notimage.png,Bag,,train",
            "bad-blank,img/blank.png,Bag,,train",
            "bad-dup-image,img/dup.png,Bag,,train",
            "bad-label,img/train-00002.png,Spaceship,,train",
            "p-train-00000,img/train-00003.png,Bag,,train",
        ]
    csv = folder / "catalogue.csv"
    csv.write_text("product_id,image,label,title,split\n" + "\n".join(rows) + "\n")
    return csv


COLOURS = {  # a shop's product colours (RGB), named as /tags names them
    "red": (200, 30, 40),
    "navy": (20, 30, 110),
    "green": (30, 140, 60),
    "yellow": (230, 200, 40),
    "pink": (240, 140, 180),
    "brown": (120, 70, 30),
    "black": (25, 25, 25),
    "grey": (128, 128, 128),
}
COLOUR_FORMATS = ("jpeg", "webp", "rgba_png", "cmyk_jpeg")


def write_colour_catalogue(folder: Path, fmnist: dict, n_train: int, n_test: int) -> Path:
    """A shop's own colour catalogue (CSV + image files) built from real Fashion-MNIST
    products: each product dyed one of COLOURS (its shading kept) on a white studio background,
    80-220 px and not square, saved in turn as JPEG, WebP, RGBA PNG (transparent around the
    product) and CMYK JPEG, with a title naming its colour and category."""
    from PIL import Image

    from components.model.shopper import product_layers

    rng = np.random.default_rng(7)
    names = list(COLOURS)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fmnist[split]
        for i in range(n):
            appearance, alpha = product_layers(Image.fromarray(images[i]))
            colour_name = names[int(rng.integers(len(names)))]
            dyed = np.array(COLOURS[colour_name], np.float32) * (0.45 + 0.55 * appearance / 255)
            w, h = int(rng.integers(80, 221)), int(rng.integers(80, 221))
            side = int(min(w, h) * rng.uniform(0.7, 0.9))
            look = Image.fromarray(np.clip(dyed, 0, 255).astype(np.uint8)).resize((side, side))
            mask = Image.fromarray((alpha * 255).astype(np.uint8)).resize((side, side))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            kind = COLOUR_FORMATS[i % len(COLOUR_FORMATS)]
            stem = f"img/{split}-{i:05d}"
            if kind == "rgba_png":
                photo = Image.new("RGBA", (w, h), (255, 255, 255, 0))
                photo.paste(look.convert("RGBA"), (x, y), mask)
                name = f"{stem}.png"
                photo.save(folder / name)
            else:
                photo = Image.new("RGB", (w, h), (250, 250, 248))
                photo.paste(look, (x, y), mask)
                if kind == "webp":
                    name = f"{stem}.webp"
                    photo.save(folder / name, quality=90)
                else:
                    name = f"{stem}.jpg"
                    photo = photo.convert("CMYK") if kind == "cmyk_jpeg" else photo
                    photo.save(folder / name, quality=90)
            category = CATEGORIES[int(labels[i])]
            rows.append(f"c-{split}-{i:05d},{name},{category},{colour_name} {category} {i},{split}")
    csv = folder / "catalogue.csv"
    csv.write_text("product_id,image,label,title,split\n" + "\n".join(rows) + "\n")
    return csv


def headless_chromium(window: str = "1280,2000", performance_log: bool = False):
    """Debian's Chromium driven by selenium + chromedriver (`make browser`), headless, with no
    network but loopback: every host except 127.0.0.1 resolves to nothing."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver_path, "install Debian's chromium and chromium-driver (make browser)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    if performance_log:  # the DevTools network events, e.g. to read a request's status
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={window}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=options)
