"""train_model on a small real Fashion-MNIST slice: learning, determinism, class weights,
early stopping, and checkpoint resume after a real (SIGKILL) interruption."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from components.config import TrainParams
from components.data.catalogue import load_fashion_mnist
from components.model import training
from components.model.device import DeviceError, resolve_device
from components.model.models import build_model
from components.model.training import (
    CHECKPOINT,
    compute_class_weights,
    epoch_size,
    predict_batches,
    split_validation,
    train_model,
)
from tests.conftest import FMNIST_DIR

FASHION_MNIST = FMNIST_DIR
REPO = Path(__file__).resolve().parents[2]
SMALL = TrainParams(cnn_widths=[8, 16, 32], epochs=2, batch_size=32, lr=0.02, val_fraction=0.1)
TINY = TrainParams(cnn_widths=[8, 16, 32], epochs=3, batch_size=32, lr=0.02, val_fraction=0.1)


@pytest.fixture(scope="module")
def fmnist() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist(FASHION_MNIST)["train"]
    return images[:2000, ..., None], labels[:2000].astype(np.int64)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_beats_chance(fmnist, tmp_path: Path) -> None:
    images, labels = fmnist
    result = train_model(images, labels, SMALL, 10, tmp_path, progress=False)
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert set(result.history[0]) == {
        "epoch",
        "size",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "seconds",
        "lr",
    }
    best = max(h["val_accuracy"] for h in result.history)
    assert best > 0.6  # chance is 0.1
    assert result.history[result.best_epoch]["val_accuracy"] == best
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert not result.model.training and result.resumed_from_epoch is None
    assert result.class_weights is None  # Fashion-MNIST is balanced
    probs, _ = predict_batches(result.model, images[result.val_indices])
    assert (probs.argmax(1) == labels[result.val_indices]).mean() == pytest.approx(best)


def test_training_threads_apply_inside_the_run_only(fmnist, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    during = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels = fmnist
        params = SMALL.model_copy(update={"epochs": 1, "max_batches_per_epoch": 2})
        train_model(
            images,
            labels,
            params,
            10,
            tmp_path,
            progress=False,
            on_epoch_end=lambda _: during.append(torch.get_num_threads()),
        )
        assert during == [2] and torch.get_num_threads() == 1

        def crash(_: dict) -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):  # restored after a crash too
            train_model(
                images,
                labels,
                params.model_copy(update={"seed": 1}),
                10,
                tmp_path / "crash",
                progress=False,
                on_epoch_end=crash,
            )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_same_seed_same_weights_other_seed_other_weights(fmnist, tmp_path: Path) -> None:
    images, labels = fmnist[0][:600], fmnist[1][:600]
    quick = TINY.model_copy(update={"epochs": 1, "max_batches_per_epoch": 3})
    a = train_model(images, labels, quick, 10, tmp_path / "a", progress=False)
    b = train_model(images, labels, quick, 10, tmp_path / "b", progress=False)
    c = train_model(
        images, labels, quick.model_copy(update={"seed": 1}), 10, tmp_path / "c", progress=False
    )
    assert same_weights(a.model, b.model) and a.history[0]["val_loss"] == b.history[0]["val_loss"]
    assert not same_weights(a.model, c.model)
    assert not np.array_equal(a.val_indices, c.val_indices)


def test_validation_split_is_stratified(fmnist) -> None:
    _, labels = fmnist
    val = split_validation(labels, 0.1, seed=0)
    assert len(np.unique(val)) == len(val)
    expected = np.round(np.bincount(labels, minlength=10) * 0.1)
    assert np.array_equal(np.bincount(labels[val], minlength=10), expected)
    assert not np.array_equal(val, split_validation(labels, 0.1, seed=1))


def test_class_weights_only_for_imbalanced_labels() -> None:
    params = TrainParams(imbalance_ratio=1.5)
    balanced = np.repeat(np.arange(4), [100, 90, 110, 80])  # ratio 1.375
    assert compute_class_weights(balanced, 4, params) is None
    skewed = np.repeat(np.arange(4), [100, 100, 100, 10])
    weights = compute_class_weights(skewed, 4, params)
    assert weights is not None and weights.mean() == pytest.approx(1.0)
    assert weights[3] == pytest.approx(10 * weights[0])
    off = params.model_copy(update={"class_weights": "none"})
    assert compute_class_weights(skewed, 4, off) is None
    missing = compute_class_weights(np.repeat([0, 1], [100, 10]), 3, params)
    assert missing is not None and missing[2] == 0 and missing[:2].mean() == pytest.approx(1.0)


def test_imbalanced_training_uses_class_weights(fmnist, tmp_path: Path) -> None:
    images, labels = fmnist
    keep = np.flatnonzero((labels != 0) | (np.arange(len(labels)) % 5 == 0))  # class 0 at 1/5
    quick = TINY.model_copy(update={"epochs": 1, "max_batches_per_epoch": 1})
    result = train_model(images[keep], labels[keep], quick, 10, tmp_path, progress=False)
    assert result.class_weights is not None
    assert result.class_weights[0] == max(result.class_weights)


def test_early_stopping_keeps_best_epoch(fmnist, tmp_path: Path) -> None:
    images, labels = fmnist
    stalled = TINY.model_copy(
        update={"epochs": 6, "patience": 1, "lr": 1e-9, "max_batches_per_epoch": 1}
    )
    result = train_model(images[:600], labels[:600], stalled, 10, tmp_path, progress=False)
    assert result.stopped_early and len(result.history) < 6
    accuracies = [h["val_accuracy"] for h in result.history]
    assert accuracies[-1] <= accuracies[result.best_epoch] == max(accuracies)


def test_progressive_phases_split_the_epochs_with_the_longest_last() -> None:
    params = TrainParams(image_size=28, epochs=10, progressive_sizes=[20, 24])
    assert [epoch_size(params, e) for e in range(10)] == [20] * 3 + [24] * 3 + [28] * 4
    two = params.model_copy(update={"epochs": 2})
    assert [epoch_size(two, e) for e in range(2)] == [24, 28]  # too few epochs for every size
    assert {epoch_size(TrainParams(epochs=5), e) for e in range(5)} == {TrainParams().image_size}
    with pytest.raises(ValidationError, match="at least 8"):
        TrainParams(progressive_sizes=[20, 4])


def test_progressive_resizing_feeds_small_batches_first_and_validates_at_full_size(
    fmnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bool, int]] = []  # (training mode, side) of every batch the trunk got

    def recording_model(params, num_classes, pretrained=True):
        model = build_model(params, num_classes, pretrained)
        model.trunk.register_forward_pre_hook(
            lambda module, args: seen.append((module.training, args[0].shape[-1]))
        )
        return model

    monkeypatch.setattr(training, "build_model", recording_model)
    params = TINY.model_copy(update={"progressive_sizes": [16, 20], "max_batches_per_epoch": 2})
    result = train_model(fmnist[0][:600], fmnist[1][:600], params, 10, tmp_path, progress=False)
    assert [h["size"] for h in result.history] == [16, 20, 28]
    assert [side for is_training, side in seen if is_training] == [16, 16, 20, 20, 28, 28]
    assert {side for is_training, side in seen if not is_training} == {28}
    assert result.model.image_size == 28  # the model takes and resizes to the full size again


def test_early_stopping_waits_for_the_full_size_phase(fmnist, tmp_path: Path) -> None:
    stalled = TINY.model_copy(
        update={
            "epochs": 6,
            "patience": 1,
            "lr": 1e-9,
            "max_batches_per_epoch": 1,
            "progressive_sizes": [16, 20],
        }
    )
    result = train_model(fmnist[0][:600], fmnist[1][:600], stalled, 10, tmp_path, progress=False)
    # without progressive resizing this run stops after epoch 1 (the test above)
    assert result.stopped_early
    assert [h["size"] for h in result.history] == [16, 16, 20, 20, 28]


def test_train_benchmark_plans_epochs_from_each_sizes_probed_cost() -> None:
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cost = {20: 1.0, 24: 2.0, 28: 4.0}
    progressive = TrainParams(image_size=28, progressive_sizes=[20, 24])
    # 6 epochs: 2 per size = 14 s; 7: 20,20,24,24,28,28,28 = 18 s; 8: 20 s
    assert bench.plan_epochs(18.0, cost, progressive) == 7
    assert bench.plan_epochs(17.9, cost, progressive) == 6
    assert bench.plan_epochs(0.5, cost, progressive) == 1
    assert bench.plan_epochs(18.0, cost, TrainParams(image_size=28)) == 4


def test_predict_batches_shapes_and_batch_independence(fmnist) -> None:
    images, _ = fmnist
    torch.manual_seed(0)
    model = build_model(TINY, 10).train()
    probs, emb = predict_batches(model, images[:50], batch_size=512)
    probs_small, emb_small = predict_batches(model, images[:50], batch_size=7)
    assert model.training  # mode restored
    assert probs.shape == (50, 10) and emb.shape == (50, TINY.embedding_dim)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.allclose(probs, probs_small, atol=1e-5) and np.allclose(emb, emb_small, atol=1e-5)


CHILD = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np
from pathlib import Path
from components.data.catalogue import load_fashion_mnist
from components.config import TrainParams
from components.model.training import train_model
images, labels = load_fashion_mnist(Path({data!r}))["train"]
params = TrainParams.model_validate_json({params!r})
train_model(images[:600, ..., None], labels[:600].astype(np.int64), params, 10,
            Path({ckpt!r}), progress=False)
"""


def kill_after_first_checkpoint(ckpt: Path, timeout: float = 120.0) -> None:
    """Run train_model in a child process and SIGKILL it as soon as last.pt appears."""
    code = CHILD.format(
        repo=str(REPO), data=str(FASHION_MNIST), params=TINY.model_dump_json(), ckpt=str(ckpt)
    )
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not (ckpt / CHECKPOINT).exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"child ended without a checkpoint: {child.stderr.read().decode()[-2000:]}")
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()


def test_resume_after_kill_matches_uninterrupted_run(fmnist, tmp_path: Path) -> None:
    images, labels = fmnist[0][:600], fmnist[1][:600]
    whole = train_model(images, labels, TINY, 10, tmp_path / "whole", progress=False)
    kill_after_first_checkpoint(tmp_path / "crashed")
    saved = torch.load(tmp_path / "crashed" / CHECKPOINT, weights_only=True)
    assert saved["run"]["epoch"] < TINY.epochs - 1  # really interrupted mid-run
    resumed = train_model(images, labels, TINY, 10, tmp_path / "crashed", progress=False)
    assert resumed.resumed_from_epoch == saved["run"]["epoch"]
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.best_epoch == whole.best_epoch
    assert same_weights(resumed.model, whole.model)
    again = train_model(images, labels, TINY, 10, tmp_path / "crashed", progress=False)
    assert again.resumed_from_epoch == TINY.epochs - 1 and same_weights(again.model, whole.model)


def test_other_fingerprint_or_damaged_checkpoint_starts_fresh(fmnist, tmp_path: Path) -> None:
    images, labels = fmnist[0][:600], fmnist[1][:600]
    quick = TINY.model_copy(update={"epochs": 2, "max_batches_per_epoch": 2})
    other = quick.model_copy(update={"seed": 1})
    train_model(images, labels, quick, 10, tmp_path / "shared", progress=False)
    reused = train_model(images, labels, other, 10, tmp_path / "shared", progress=False)
    fresh = train_model(images, labels, other, 10, tmp_path / "fresh", progress=False)
    assert reused.resumed_from_epoch is None and len(reused.history) == 2
    assert same_weights(reused.model, fresh.model)
    changed = train_model(
        images[:599], labels[:599], other, 10, tmp_path / "shared", progress=False
    )
    assert changed.resumed_from_epoch is None
    forced = train_model(
        images, labels, other, 10, tmp_path / "shared", progress=False, resume=False
    )  # `vitrine run --force`: the finished checkpoint above is not resumed
    assert forced.resumed_from_epoch is None and len(forced.history) == 2
    (tmp_path / "fresh" / CHECKPOINT).write_bytes(b"not a checkpoint")
    damaged = train_model(images, labels, other, 10, tmp_path / "fresh", progress=False)
    assert damaged.resumed_from_epoch is None and same_weights(damaged.model, fresh.model)


def test_augment_shifts_and_flips_each_image_on_its_own():
    import torch.nn.functional as F

    from components.model.transforms import MEAN, SCALE, augment

    x = torch.randn(64, 1, 28, 28)
    out = augment(x, torch.Generator().manual_seed(0), max_shift=2)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    padded = F.pad(torch.cat([x, x.flip(3)], 1), (2,) * 4, value=-MEAN / SCALE)
    shifts = []
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            for flip in range(2)
            if torch.equal(out[i, 0], padded[i, flip, dy : dy + 28, dx : dx + 28])
        ]
        assert found, f"image {i} is not a shifted / flipped copy of its input"
        shifts.append(found[0])
    assert len(set(shifts)) > 5  # drawn per image, not one shift for the batch


def test_cutout_blacks_out_one_square_per_image():
    from components.model.transforms import MEAN, SCALE, augment

    x = torch.full((64, 1, 28, 28), 0.5)
    out = augment(x, torch.Generator().manual_seed(0), max_shift=0, cutout=8)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    black = out[:, 0] == -MEAN / SCALE
    assert torch.all(out[:, 0][~black] == 0.5)  # nothing else changes
    for hole in black:
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8  # clipped at the border
        assert hole.sum() == len(rows) * len(cols)  # one solid rectangle
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
    assert (black.sum((1, 2)) == 64).float().mean() > 0.3  # most squares lie inside
    centres = {
        (int(h.nonzero()[:, 0].float().mean()), int(h.nonzero()[:, 1].float().mean()))
        for h in black
    }
    assert len(centres) > 20  # drawn per image
    off = augment(x, torch.Generator().manual_seed(0), max_shift=0)
    assert not torch.any(off == -MEAN / SCALE)


def test_a_pretrained_trunk_fine_tunes_at_a_smaller_learning_rate():
    effnet = TrainParams(backbone="efficientnet_lite0", image_size=32, lr=0.004)
    model = build_model(effnet, 10, pretrained=False)
    optimizer, scheduler, _ = training.build_optimisation(model, effnet, steps=10, weights=None)
    trunk, heads = optimizer.param_groups
    assert len(trunk["params"]) == len(list(model.trunk.parameters()))
    assert len(trunk["params"]) + len(heads["params"]) == len(list(model.parameters()))
    assert trunk["max_lr"] == pytest.approx(0.0004) and heads["max_lr"] == pytest.approx(0.004)
    cnn = TrainParams(lr=0.004)
    optimizer, _, _ = training.build_optimisation(build_model(cnn, 10), cnn, 10, None)
    assert [g["max_lr"] for g in optimizer.param_groups] == [pytest.approx(0.004)]


@pytest.mark.parametrize(
    ("setting", "cuda", "expected"),
    [("auto", False, "cpu"), ("auto", True, "cuda"), ("cpu", True, "cpu"), ("cuda", True, "cuda")],
)
def test_the_device_follows_the_setting_and_the_machine(setting, cuda, expected):
    assert resolve_device(setting, cuda_available=cuda).type == expected
    assert resolve_device(setting, cuda, key="serving.device").type == expected


def test_a_cuda_setting_without_cuda_names_its_key():
    with pytest.raises(DeviceError, match="^serving.device is cuda, but torch sees no CUDA"):
        resolve_device("cuda", cuda_available=False, key="serving.device")


def test_a_cuda_device_on_a_machine_without_one_fails_before_any_work(fmnist, tmp_path):
    with pytest.raises(DeviceError, match="train.device is cuda"):
        resolve_device("cuda", cuda_available=False)
    if torch.cuda.is_available():
        return  # the rest is about a machine without a GPU
    images, labels = fmnist
    with pytest.raises(DeviceError, match="use auto or cpu"):
        train_model(images, labels, SMALL.model_copy(update={"device": "cuda"}), 10, tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()


@pytest.mark.parametrize(
    ("device", "precision", "cuda_bf16", "dtype", "scaler"),
    [
        ("cuda", "auto", True, torch.bfloat16, False),  # Ampere and later
        ("cuda", "auto", False, torch.float16, True),  # older GPUs: fp16 needs a scaler
        ("cuda", "fp32", True, None, False),
        ("cuda", "bf16", False, torch.bfloat16, False),
        ("cpu", "fp32", True, None, False),
        ("cpu", "bf16", False, torch.bfloat16, False),
    ],
)
def test_training_precision_per_device(device, precision, cuda_bf16, dtype, scaler):
    params = SMALL.model_copy(update={"precision": precision})
    chosen = training.precision_for(params, torch.device(device), cuda_bf16=cuda_bf16)
    assert chosen == training.Precision(dtype, grad_scaler=scaler)


def test_the_fp16_gradient_scaler_path_trains(fmnist):
    """The branch a GPU without bf16 takes (fp16 autocast + GradScaler), run on the CPU:
    the loss is finite, the scaler steps, the weights move."""
    images, labels = fmnist
    params = SMALL.model_copy(update={"precision": "fp32"})
    model = build_model(params, 10, pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = training.build_optimisation(model, params, steps=4, weights=None)
    runtime = training.Runtime(
        torch.device("cpu"), training.Precision(torch.float16, True), torch.amp.GradScaler("cpu")
    )
    generator = torch.Generator().manual_seed(0)
    with training.tqdm(total=4, disable=True) as bar:
        loss = training.train_one_epoch(
            model,
            images[:128],
            torch.from_numpy(labels[:128]),
            params,
            4,
            opt,
            generator,
            bar,
            28,
            runtime=runtime,
        )
    assert np.isfinite(loss) and runtime.scaler.get_scale() > 0
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
