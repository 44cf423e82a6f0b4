"""The learned busy-background segmenter (components/model/segmenter.py): a few seconds of
training beat busy_mask on busy rendered photos (grey and recoloured products), it survives
save / load, the train stage trains it on training rows only, and a model carries it to every
consumer of canonical preprocessing (model_input, a pickled bundle, a compressed variant)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.config import Params, TrainParams, state_paths
from components.model import compress, segmenter_training, shopper
from components.model import segmenter as segmenting
from components.model.models import CompiledNet, MkldnnTrunk, build_model
from components.model.transforms import busy_mask, image_to_uint8, model_input
from components.stages import train as train_stage
from components.stages.context import RunContext
from components.threads import limited_threads

# ~10 s of one thread. Seed 0, 12 busy test photos, median IoU (measured): learned 0.75 vs
# busy_mask 0.58 (product as it is), 0.79 vs 0.43 (tinted); max_steps ends it, not the clock
TINY = {"views": 600, "side": 32, "max_steps": 200}


@pytest.fixture(scope="module")
def trained(fmnist):
    with limited_threads(1):
        return segmenter_training.train_segmenter(fmnist["train"][0][:100], 600, seed=0, **TINY)


def busy_photos(fmnist, look: str, n: int = 12) -> list[tuple[Image.Image, np.ndarray]]:
    """Busy-background photos of TEST products (the segmenter learned from train ones)."""
    images, shift = fmnist["test"][0], "busy_background"
    return [
        shopper.render_with_mask(
            Image.fromarray(images[i]), shift, shopper.shift_rng(0, shift, i), look
        )
        for i in range(n)
    ]


def iou(mask: np.ndarray | None, truth: np.ndarray) -> float:
    return 0.0 if mask is None else float((mask & truth).sum() / (mask | truth).sum())


def small_model(segmenter=None, preprocess: str = "canonical"):
    params = TrainParams(preprocess=preprocess, cnn_widths=[8, 16], cnn_depths=[1, 1])
    model = build_model(params.model_copy(update={"embedding_dim": 8}), num_classes=10).eval()
    model.segmenter = segmenter
    return model


@pytest.mark.parametrize("look", shopper.LOOKS)
def test_seconds_of_training_beat_busy_mask_also_on_coloured_products(trained, fmnist, look):
    segmenter, summary = trained
    assert summary["steps"] == TINY["max_steps"] and summary["digest"] == segmenter.digest
    learned, heuristic = [], []
    for photo, truth in busy_photos(fmnist, look):
        rgb = np.asarray(photo).astype(np.float32)
        learned.append(iou(segmenter(rgb), truth))
        heuristic.append(iou(busy_mask(rgb), truth))
    assert np.median(learned) > np.median(heuristic) + 0.05, (learned, heuristic)


def test_save_and_load_give_the_same_masks(trained, fmnist, tmp_path):
    segmenter, _ = trained
    loaded = segmenting.Segmenter.load(segmenter.save(tmp_path / "segmenter.pt"))
    assert (loaded.digest, loaded.side) == (segmenter.digest, TINY["side"])
    for photo, _ in busy_photos(fmnist, "tinted", 4):
        rgb = np.asarray(photo).astype(np.float32)
        np.testing.assert_array_equal(loaded(rgb), segmenter(rgb))


def test_model_input_uses_the_models_segmenter_and_only_with_canonical(trained, fmnist):
    segmenter, _ = trained
    calls = []

    def spy(rgb):
        calls.append(rgb.shape)
        return segmenter(rgb)

    with_one, without = small_model(spy), small_model()
    differs = 0
    for photo, _ in busy_photos(fmnist, "as_is", 6):
        seen = model_input(photo, with_one)
        assert np.array_equal(seen, image_to_uint8(photo, 28, 1, True, segmenter))
        assert np.array_equal(model_input(photo, without), image_to_uint8(photo, 28, 1, True))
        differs += not np.array_equal(seen, model_input(photo, without))
    assert calls and differs  # the busy path ran the segmenter, and its mask changed the input
    calls.clear()
    model_input(busy_photos(fmnist, "as_is", 1)[0][0], small_model(spy, "plain"))
    assert not calls


def test_a_pickled_model_and_its_compressed_variants_keep_the_segmenter(trained, fmnist, tmp_path):
    segmenter, _ = trained
    model = small_model(segmenter)
    folder = tmp_path / "compressed"
    compress.build_variant(model, "onnx", folder, np.zeros((0, 28, 28, 1), np.uint8))
    compress.write_meta(folder, model, {"onnx": {"passed": True, "reason": "accepted: test"}})
    variant = compress.load_variant(folder, "onnx")
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    carriers = [variant, again]
    if torch.backends.mkldnn.is_available():
        carriers.append(CompiledNet(model, MkldnnTrunk(model.trunk)))
    photo = busy_photos(fmnist, "tinted", 1)[0][0]
    for carrier in carriers:
        assert carrier.segmenter.digest == segmenter.digest
        assert np.array_equal(model_input(photo, carrier), model_input(photo, model))


def test_a_model_without_a_segmenter_has_none_in_its_variants(tmp_path):
    model = small_model()
    folder = tmp_path / "compressed"
    compress.build_variant(model, "onnx", folder, np.zeros((0, 28, 28, 1), np.uint8))
    compress.write_meta(folder, model, {"onnx": {"passed": True, "reason": "accepted: test"}})
    assert json.loads((folder / compress.META_FILE).read_text())["segmenter"] is None
    assert not (folder / segmenting.FILE).exists()
    assert compress.load_variant(folder, "onnx").segmenter is None


def stage_context(tmp_path, fmnist, **segmenter) -> tuple[RunContext, pd.DataFrame]:
    catalogue = tmp_path / "catalogue"
    catalogue.mkdir(exist_ok=True)
    rows = []
    for i in range(20):
        Image.fromarray(fmnist["train"][0][i]).save(catalogue / f"{i}.png")
        rows.append({"path": f"{i}.png", "sha256": f"{i:064x}", "label": 0})
    values = Params().model_dump()
    values["data"]["catalogue_dir"] = str(catalogue)
    values["train"].update(preprocess="canonical", seed=0)
    values["train"]["segmenter"].update(segmenter)
    ctx = RunContext(Params(**values), state_paths(tmp_path / "state"), tmp_path, tmp_path)
    return ctx, pd.DataFrame(rows)


def test_the_train_stage_trains_it_only_when_on_and_canonical_and_resumes_it(tmp_path, fmnist):
    ctx, rows = stage_context(tmp_path, fmnist, enabled=False)
    assert train_stage.train_segmenter(ctx, rows) == (None, None)
    tiny = {"enabled": True, "views": 40, "side": 32, "max_steps": 3}
    ctx, rows = stage_context(tmp_path, fmnist, **tiny)
    segmenter, summary = train_stage.train_segmenter(ctx, rows)
    assert summary["steps"] == 3 and summary["views"] == 40 and segmenter.side == 32
    again, resumed = train_stage.train_segmenter(ctx, rows)  # a re-run: the same segmenter
    assert again.digest == segmenter.digest and "resumed_from" in resumed
    plain = ctx.params.model_copy(deep=True)
    plain.train.preprocess = "plain"
    skipped = train_stage.train_segmenter(RunContext(plain, ctx.paths, tmp_path), rows)
    assert skipped[0] is None and "plain" in skipped[1]["skipped"]
