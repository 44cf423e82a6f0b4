"""Colour tags: colours_of on synthetic products, the index's colour filter and text preference,
and the service's mapping of an unknown colour to a 422."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.retrieval.colours import (
    COLOURS,
    UnknownColour,
    catalogue_colours,
    colour_name,
    colour_pixels,
    colours_of,
    colours_of_batch,
    photo_colours,
    split_colour_query,
)
from components.retrieval.index import CatalogueIndex
from components.retrieval.tags import tag_answer

ACHROMATIC = {"black", "grey", "white"}


def on_background(product: np.ndarray, background=(255, 255, 255), size: int = 64) -> np.ndarray:
    """The product (h×w×3) centred on a size×size plain background."""
    img = np.empty((size, size, 3), np.uint8)
    img[...] = background
    h, w = product.shape[:2]
    y, x = (size - h) // 2, (size - w) // 2
    img[y : y + h, x : x + w] = product
    return img


def plain(colour, h: int = 30, w: int = 24) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


def test_a_red_product_on_white_is_red_never_the_white_background():
    colours = colours_of(on_background(plain((200, 20, 25))))
    assert colours[0] == ("red", 1.0)
    assert "white" not in dict(colours)


def test_a_navy_and_white_striped_product_gives_both():
    stripes = plain((20, 30, 80), 32, 32)
    stripes[::4] = stripes[1::4] = (250, 250, 250)
    colours = dict(colours_of(on_background(stripes, background=(150, 150, 150))))
    assert set(colours) == {"navy", "white"}
    assert colours["navy"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((30, 120, 40), "green"),
        ((240, 215, 40), "yellow"),
        ((245, 130, 20), "orange"),
        ((240, 150, 190), "pink"),
        ((110, 40, 150), "purple"),
        ((220, 195, 150), "beige"),
        ((110, 65, 35), "brown"),
        ((40, 100, 220), "blue"),
        ((15, 15, 15), "black"),
    ],
)
def test_plain_products_are_named_by_the_nearest_palette_colour(rgb, name):
    assert colours_of(on_background(plain(rgb), background=(128, 128, 128)))[0][0] == name


def fashion_mnist_like(rng: np.random.Generator) -> np.ndarray:
    """A light product of varying greys on a black background, 28×28."""
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 7:21] = rng.integers(40, 256, (20, 14))
    img[8:12, 9:19] = 255
    return img


def test_grayscale_negatives_give_only_black_grey_white_from_their_real_look():
    rng = np.random.default_rng(0)
    images = np.stack([fashion_mnist_like(rng) for _ in range(50)])
    for colours in colours_of_batch(images):
        assert colours and {name for name, _ in colours} <= ACHROMATIC
    # light-on-black is named from 255 - x: a fully white stored product is a black one
    white_on_black = np.zeros((28, 28), np.uint8)
    white_on_black[6:22, 6:22] = 255
    assert colours_of(white_on_black) == [("black", 1.0)]
    assert colours_of(255 - white_on_black) == [("black", 1.0)]  # dark on white: as it is
    # one, three equal or an extra channel: the same answer
    rgb = np.repeat(images[0][..., None], 3, axis=2)
    assert colours_of(images[0]) == colours_of(images[0][..., None]) == colours_of(rgb)


def test_shares_threshold_order_and_transparency():
    product = plain((200, 20, 25), 40, 40)
    product[:6] = (40, 100, 220)  # 15% blue
    product[6:8] = (30, 120, 40)  # 5% green: under the threshold
    colours = colours_of(on_background(product))
    assert [name for name, _ in colours] == ["red", "blue"]
    assert [s for _, s in colours] == sorted((s for _, s in colours), reverse=True)
    assert all(round(s, 4) == s for _, s in colours)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (0, 0, 0, 255)  # a black cut-out on transparent black: alpha locates it
    assert colours_of(rgba) == [("black", 1.0)]
    assert colours_of(np.zeros((8, 8, 4), np.uint8)) == []


def test_photo_colours_of_decoded_uploads_reduce_large_photos():
    big = Image.fromarray(on_background(plain((200, 20, 25), 600, 500), size=1000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    assert max(colour_pixels(decoded).shape[:2]) <= 64
    assert photo_colours(decoded)[0][0] == "red"
    sixteen = Image.fromarray(fashion_mnist_like(np.random.default_rng(1)).astype(np.uint16) * 257)
    assert {name for name, _ in photo_colours(sixteen)} <= ACHROMATIC
    answer = tag_answer(
        "Dress", 0.9, np.array([0.9, 0.1]), ["Dress", "Bag"], np.zeros((28, 28)), []
    )
    assert answer["colours"] == []
    answer = tag_answer(
        "Dress", 0.9, np.array([1.0]), ["Dress"], np.zeros((2, 2)), [], [("red", 1)]
    )
    assert answer["colours"] == [{"value": "red", "score": 1}]


def test_catalogue_colours_are_comma_joined_per_image(tmp_path):
    negative = np.zeros((28, 28), np.uint8)
    negative[4:24, 4:24] = 255  # Fashion-MNIST style: a black product, stored white on black
    stripes = plain((20, 30, 80), 32, 32)
    stripes[::3] = (250, 250, 250)  # a third white: navy first
    images = [on_background(plain((20, 30, 80))), negative, on_background(stripes, (150,) * 3)]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    assert catalogue_colours(paths) == ["navy", "black", "navy,white"]


def test_colour_names_and_query_words():
    assert colour_name(" Gray ") == "grey" and colour_name("NAVY") == "navy"
    with pytest.raises(UnknownColour, match="valid:.*'red'") as raised:
        colour_name("chartreuse")
    assert isinstance(raised.value, ValueError)
    assert split_colour_query("red dress") == ("red", "dress")
    assert split_colour_query("a Dress in gray, long") == ("grey", "a Dress in , long")
    assert split_colour_query("leather handbag") == (None, "leather handbag")
    assert split_colour_query("reddish bag") == (None, "reddish bag")  # whole words only


DIM = 8


@pytest.fixture(scope="module")
def coloured_index():
    rng = np.random.default_rng(0)
    n = 300
    emb = rng.standard_normal((n, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    colours = ["red", "navy,white", "black", "", "white,red"] * (n // 5)
    products = pd.DataFrame(
        {
            "product_id": [f"p{i:04d}" for i in range(n)],
            "category": ["Dress", "Bag", "Shirt"] * (n // 3),
            "title": "",
            "path": "",
            "colours": colours,
        }
    )
    return CatalogueIndex.build(emb, products), emb, products


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_colour_filter_returns_only_products_of_that_colour(coloured_index, kind):
    _, emb, products = coloured_index
    index = CatalogueIndex.build(emb, products, exact_max=len(emb) if kind == "exact" else 0)
    query = emb[7]
    hits = index.search(query, 20, colour="red")
    assert len(hits) == 20 and all("red" in h.colours for h in hits)
    has_red = products["colours"].str.contains("red").to_numpy()
    best = np.argsort(-np.where(has_red, emb @ query, -np.inf))[:20]
    assert [h.product_id for h in hits] == products["product_id"].iloc[best].tolist()
    navy_bags = index.search(query, 100, colour="Navy", category="Bag")
    assert navy_bags and all(set(h.colours) == {"navy", "white"} for h in navy_bags)
    assert all(h.category == "Bag" for h in navy_bags)
    assert index.search(query, 5, colour="green") == []
    assert index.colour_count("red") == has_red.sum() and index.colour_count("green") == 0
    with pytest.raises(UnknownColour, match="valid"):
        index.search(query, 5, colour="chartreuse")


def test_text_colour_preference_ranks_that_colour_first_then_fills(coloured_index):
    index, emb, products = coloured_index
    space, query = emb, emb[3]
    assert index.colour_preference("red dress") == ("red", "dress")
    assert index.colour_preference("green dress") == (None, "green dress")  # nobody is green
    assert index.colour_preference("red") == ("red", "red")
    hits = index.search_space(space, query, 10, prefer_colour="red")
    assert len(hits) == 10 and all("red" in h.colours for h in hits)
    few = index.search_space(space, query, 10, category="Bag", colour="green", prefer_colour="red")
    assert few == []  # no green product: an explicit colour filter stays a filter
    black = index.search_space(space, query, 70, prefer_colour="black")
    n_black = index.colour_count("black")
    assert len(black) == 70 and all("black" in h.colours for h in black[:n_black])
    assert not any("black" in h.colours for h in black[n_black:])
    assert len({h.product_id for h in black}) == 70


def test_an_index_without_colours_loads_and_matches_no_colour(coloured_index, tmp_path):
    _, emb, products = coloured_index
    old = CatalogueIndex.build(emb, products.drop(columns="colours"))
    old.save(tmp_path)
    loaded = CatalogueIndex.load(tmp_path)
    assert len(loaded) == len(products) and loaded.search(emb[0], 3)[0].colours == ()
    assert loaded.search(emb[0], 5, colour="black") == []
    assert loaded.colour_preference("black dress") == (None, "black dress")


def test_an_unknown_colour_is_a_422_listing_the_palette():
    from bentos.http import ApiError, parse_colour_or_422
    from bentos.schemas import TextQuery

    assert parse_colour_or_422("Gray") == "grey" and parse_colour_or_422("") is None
    with pytest.raises(ApiError) as raised:
        parse_colour_or_422("chartreuse")
    assert raised.value.status == 422 and all(c in raised.value.message for c in COLOURS)
    assert TextQuery(query="dress", colour="RED").colour == "red"
    with pytest.raises(ValueError, match="unknown colour"):
        TextQuery(query="dress", colour="chartreuse")
