"""Shopper-style renderings (components/model/shopper.py) and the canonical preprocessing that
brings them back to the catalogue's look (components/model/transforms.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from components.config import SHOPPER_SHIFTS
from components.model import shopper, transforms
from components.model.evaluation import pick_shopper_rows
from components.model.transforms import image_to_uint8, input_frame


@pytest.fixture(scope="module")
def products(fmnist) -> list[Image.Image]:
    images, _ = fmnist["test"]
    return [Image.fromarray(images[i]) for i in range(12)]


def catalogue_view(image: Image.Image) -> np.ndarray:
    return image_to_uint8(image, 28, 1, canonical=True)[..., 0].astype(np.float64)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("shift", SHOPPER_SHIFTS)
def test_each_shift_is_seeded_and_renders_an_rgb_photo(products, shift):
    first = shopper.render(products[0], shift, shopper.shift_rng(0, shift, 7))
    again = shopper.render(products[0], shift, shopper.shift_rng(0, shift, 7))
    other = shopper.render(products[0], shift, shopper.shift_rng(1, shift, 7))
    assert first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    assert not np.array_equal(np.asarray(first.convert("L").resize((28, 28))), products[0])


def test_the_setting_shifts_show_the_real_look_on_a_light_background(products):
    """Fashion-MNIST is a negative: on white, the product is darker than the background."""
    for shift in ("white_background", "light_background", "colour_tint", "phone"):
        photo = np.asarray(shopper.render(products[1], shift, shopper.shift_rng(0, shift, 1)))
        lum = photo.astype(float).mean(axis=2)
        border = np.concatenate([lum[0], lum[-1], lum[:, 0], lum[:, -1]])
        assert np.median(border) > 150, shift
        assert lum.min() < np.median(border) - 60, shift


def test_phone_frames_are_large_not_square_and_the_product_is_small(products):
    for i in range(6):
        photo = shopper.render(products[i], "phone", shopper.shift_rng(0, "phone", i))
        w, h = photo.size
        assert min(w, h) >= 200 and w != h
        _, alpha = shopper.product_layers(products[i])
        assert alpha.sum() < 0.5 * w * h


@pytest.mark.parametrize("shift", shopper.SETTINGS)
def test_render_with_mask_gives_the_same_photo_and_where_the_product_is(products, shift):
    photo, mask = shopper.render_with_mask(products[3], shift, shopper.shift_rng(0, shift, 5))
    same = shopper.render(products[3], shift, shopper.shift_rng(0, shift, 5))
    assert np.array_equal(np.asarray(photo), np.asarray(same))
    assert mask.dtype == bool and mask.shape == (photo.size[1], photo.size[0])
    assert 0.02 < mask.mean() < 0.8  # the product, not the frame and not nothing
    if shift == "white_background":  # a plain setting: the mask is what differs from it
        lum = np.asarray(photo.convert("L"), np.float64)
        differs = np.abs(lum - np.median(lum[0])) > 30
        assert (differs & mask).sum() / differs.sum() > 0.95


@pytest.mark.parametrize("look", ["tinted", "colour_mapped"])
def test_render_with_mask_recolours_the_product_on_request(products, look):
    """A grey catalogue product in colour on clutter: a segmenter cannot learn "grey = product"."""
    rng = shopper.shift_rng(0, "busy_background", 4)
    photo, mask = shopper.render_with_mask(products[4], "busy_background", rng, look)
    rgb = np.asarray(photo).astype(np.float64)[mask]
    assert np.median(rgb.max(axis=1) - rgb.min(axis=1)) > 10  # the product's own pixels: colour
    grey, grey_mask = shopper.render_with_mask(products[4], "busy_background", rng)
    rgb = np.asarray(grey).astype(np.float64)[grey_mask]
    assert np.median(rgb.max(axis=1) - rgb.min(axis=1)) < 5
    with pytest.raises(ValueError, match="unknown look"):
        shopper.render_with_mask(products[4], "busy_background", rng, "sepia")


def test_render_with_mask_refuses_a_degradation(products):
    with pytest.raises(ValueError, match="no placement"):
        shopper.render_with_mask(products[0], "jpeg", shopper.shift_rng(0, "jpeg", 0))


def test_colour_shifts_are_in_colour(products):
    for shift in ("colour_tint", "colour_photo"):
        photo = np.asarray(shopper.render(products[2], shift, shopper.shift_rng(0, shift, 2)))
        chroma = photo.max(axis=2).astype(int) - photo.min(axis=2)
        assert (chroma > 40).mean() > 0.03, shift  # a thin product covers ~10% of the frame


@pytest.mark.parametrize("shift", ["white_background", "light_background", "phone"])
def test_canonical_preprocessing_brings_a_shoppers_photo_back_to_the_catalogue_look(
    products, shift
):
    """The same product, photographed dark on a light background (small and off-centre in a
    phone frame), reaches the model close to its catalogue image; plain padding does not."""
    canonical, plain = [], []
    for i, product in enumerate(products):
        photo = shopper.render(product, shift, shopper.shift_rng(0, shift, i))
        target = catalogue_view(product)
        canonical.append(similarity(catalogue_view(photo), target))
        plain.append(similarity(image_to_uint8(photo, 28, 1)[..., 0].astype(float), target))
    assert np.median(canonical) > 0.85, canonical
    assert np.median(plain) < 0.2, plain


def test_on_a_busy_background_the_product_is_told_apart_by_colour(products, monkeypatch):
    """Clutter of many colours behind the product: locating it by the ring's colours brings
    the photo much closer to the catalogue image than the plain background rule does."""

    def median_similarity() -> float:
        return float(
            np.median(
                [
                    similarity(
                        catalogue_view(
                            shopper.render(p, "busy_background", shopper.shift_rng(0, "busy", i))
                        ),
                        catalogue_view(p),
                    )
                    for i, p in enumerate(products)
                ]
            )
        )

    by_colour = median_similarity()
    monkeypatch.setattr(transforms, "BUSY_SPREAD", float("inf"))  # the plain rule only
    by_level = median_similarity()
    assert by_colour > 0.35 and by_colour > by_level + 0.2, (by_colour, by_level)


def test_busy_mask_keeps_the_product_and_drops_the_clutter():
    photo = np.zeros((120, 120, 3), np.uint8)
    photo[:, :60], photo[:, 60:] = (230, 200, 60), (60, 160, 230)  # two walls
    photo[:30, 20:100] = (200, 60, 160)  # a shelf touching the top edge
    photo[40:100, 35:85] = (90, 90, 90)  # the product
    mask = transforms.busy_mask(photo.astype(np.float32))
    assert mask[45:95, 40:80].all()
    assert mask.sum() < 1.1 * 60 * 50


def test_canonical_preprocessing_keeps_a_catalogue_image(products):
    """Only re-centred (Fashion-MNIST centres the centre of mass, canonicalise the box)."""
    for product in products:
        view, original = catalogue_view(product), np.asarray(product, float)
        best = max(
            similarity(np.roll(view, (dy, dx), axis=(0, 1)), original)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
        assert best > 0.95


def test_canonical_rgb_keeps_colours_and_crops_to_the_product():
    photo = np.full((300, 400, 3), 250, np.uint8)
    photo[200:260, 40:100] = (200, 20, 20)  # a small red square, low left
    out = image_to_uint8(Image.fromarray(photo), 32, 3, canonical=True)
    assert out.shape == (32, 32, 3)
    assert (out[..., 0] > 150).mean() > 0.9 and (out[..., 1] < 60).mean() > 0.9


def test_a_photo_without_a_product_keeps_its_frame():
    blank = Image.new("L", (40, 30), 200)
    out = image_to_uint8(blank, 28, 1, canonical=True)
    assert out.shape == (28, 28, 1) and out.max() == 0


def test_input_frame_maps_the_model_input_back_to_the_photo():
    class Canonical:
        preprocess, in_channels, image_size = "canonical", 1, 28

    photo = np.full((300, 400), 255, np.uint8)
    photo[100:200, 250:300] = 0  # a dark product, 100 tall and 50 wide
    x, y, side = input_frame(Image.fromarray(photo), Canonical())
    assert side == pytest.approx(100, abs=2)
    assert y == pytest.approx(100, abs=2) and x == pytest.approx(225, abs=2)


def test_training_views_are_seeded_and_cover_many_shifts(fmnist):
    images, _ = fmnist["train"]
    sources = list(images[:40, ..., None])
    views = shopper.render_views(sources, seed=0, size=28, channels=1, canonical=True, processes=1)
    again = shopper.render_views(sources, seed=0, size=28, channels=1, canonical=True, processes=2)
    assert views.shape == (40, 28, 28, 1) and np.array_equal(views, again)
    odds = shopper.training_shift_odds(None)
    drawn = {shopper.training_shift(0, i, odds)[0] for i in range(40)}
    assert len(drawn) >= 8


def test_training_view_weights_set_how_often_each_shift_is_drawn(fmnist):
    only_two = {shift: 0.0 for shift in SHOPPER_SHIFTS} | {"busy_background": 3, "jpeg": 1}
    odds = shopper.training_shift_odds(only_two)
    drawn = [shopper.training_shift(0, i, odds)[0] for i in range(400)]
    assert set(drawn) == {"busy_background", "jpeg"}
    assert 0.68 < drawn.count("busy_background") / 400 < 0.82  # 3:1, sampling error ±0.07
    heavier = shopper.training_shift_odds({"busy_background": 4})
    assert heavier[SHOPPER_SHIFTS.index("busy_background")] == pytest.approx(4 / 14)
    # the views follow the odds: with only busy backgrounds every view is a busy rendering
    images, _ = fmnist["train"]
    busy_only = {shift: 0.0 for shift in SHOPPER_SHIFTS} | {"busy_background": 1}
    views = shopper.render_views(list(images[:6, ..., None]), 0, 28, 1, True, 1, False, busy_only)
    for i in range(6):
        shift, rng = shopper.training_shift(0, i, shopper.training_shift_odds(busy_only))
        photo = shopper.render(Image.fromarray(images[i]), shift, rng)
        assert np.array_equal(views[i], image_to_uint8(photo, 28, 1, canonical=True))


def test_training_view_weights_are_validated():
    from pydantic import ValidationError

    from components.config import TrainParams

    with pytest.raises(ValidationError, match="must be >= 0"):
        TrainParams(shopper_weights={"busy_background": -1})
    with pytest.raises(ValidationError, match="at least one shift"):
        TrainParams(shopper_weights={shift: 0 for shift in SHOPPER_SHIFTS})
    with pytest.raises(ValidationError):
        TrainParams(shopper_weights={"fog": 2})


def test_shopper_rows_are_a_seeded_stratified_sample():
    labels = np.repeat(np.arange(10), [100, 50, 100, 100, 100, 100, 100, 100, 100, 150])
    rows = pick_shopper_rows(labels, 100, seed=0)
    assert np.array_equal(rows, pick_shopper_rows(labels, 100, seed=0))
    assert not np.array_equal(rows, pick_shopper_rows(labels, 100, seed=1))
    counts = np.bincount(labels[rows], minlength=10)
    assert counts[1] == 5 and counts[9] == 15 and counts[0] == 10
    assert len(pick_shopper_rows(labels, 5000, seed=0)) == len(labels)


def test_shopper_inputs_are_cached_per_preprocessing(fmnist, tmp_path, capsys):
    """The gate's champion reuses the challenger's shopper-style inputs when it preprocesses
    alike (same results as rendering afresh), and never another preprocessing's."""
    import torch

    from components.config import TrainParams
    from components.model.evaluation import evaluate_shopper
    from components.model.models import build_model

    torch.manual_seed(0)
    params = TrainParams(cnn_widths=[4, 4], cnn_depths=[1, 1], embedding_dim=8)
    canonical = build_model(params.model_copy(update={"preprocess": "canonical"}), 10, False)
    plain = build_model(params, 10, False)
    images, labels = fmnist["test"]
    sources = [Image.fromarray(images[i]) for i in range(12)]
    catalogue = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    args = (sources, labels[:12], [f"p{i}" for i in range(12)], catalogue, np.arange(20) % 10)
    args += ([str(c) for c in range(10)], ["busy_background", "jpeg"], 0)
    in_domain = {"accuracy": 0.5, "recall_at_1": 0.5}
    cache = tmp_path / "cache"
    fresh = evaluate_shopper(canonical.eval(), *args, in_domain, tmp_path)
    assert "shopper-style photos" not in capsys.readouterr().err
    first = evaluate_shopper(canonical.eval(), *args, in_domain, tmp_path, cache, progress=True)
    bar = capsys.readouterr().err  # the evaluate stage's progress: shifts done, the current one
    assert "shopper-style photos" in bar and "2/2" in bar and "jpeg" in bar
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all("-canonical-" in name for name in files)
    again = evaluate_shopper(canonical.eval(), *args, in_domain, tmp_path, cache)
    assert sorted(p.name for p in cache.iterdir()) == files  # read, not written again
    assert fresh.metrics == first.metrics == again.metrics
    evaluate_shopper(plain.eval(), *args, in_domain, tmp_path, cache)
    assert len(list(cache.iterdir())) == 4  # the plain model has inputs of its own
