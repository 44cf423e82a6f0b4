"""Compressed variants: ONNX export and static int8 answer like the torch model (same shapes,
same numbers up to quantization), run through the loop's own evaluation, and the gate's rule
for refusing a variant that loses accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from components.config import EvaluationParams, GatePolicy, ServingParams, TrainParams
from components.model import compress, evaluation
from components.model.models import build_model
from components.model.training import predict_batches
from components.release.gate import check_compression
from tests.conftest import CATEGORIES


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # the default width: big enough that int8 weights, not graph overhead, set the file size
    return build_model(TrainParams(embedding_dim=16), num_classes=10).eval()


@pytest.fixture(scope="module")
def images(fmnist) -> np.ndarray:
    return fmnist["test"][0][:256, ..., None]  # real uint8 N×28×28×1


@pytest.fixture(scope="module")
def variants(model, fmnist, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compressed")
    calibration = fmnist["train"][0][:128, ..., None]
    for variant in compress.COMPRESSED:
        compress.build_variant(model, variant, folder, calibration)
    verdicts = {v: {"passed": True, "reason": "accepted: test"} for v in compress.COMPRESSED}
    compress.write_meta(folder, model, verdicts)
    return folder


def test_onnx_answers_exactly_like_torch(model, images, variants):
    onnx_model = compress.load_variant(variants, "onnx")
    ref_probs, ref_emb = predict_batches(model, images)
    probs, emb = predict_batches(onnx_model, images, batch_size=100)  # 100 + 100 + 56: dynamic
    assert probs.shape == ref_probs.shape and emb.shape == ref_emb.shape
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
    assert (onnx_model.image_size, onnx_model.in_channels, onnx_model.embedding_dim) == (28, 1, 16)


def test_int8_is_smaller_and_close_to_fp32(model, images, variants):
    int8 = compress.load_variant(variants, "int8")
    ref_probs, ref_emb = predict_batches(model, images)
    probs, emb = predict_batches(int8, images)
    assert probs.shape == ref_probs.shape and emb.shape == ref_emb.shape
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # still L2-normalised
    cosine = np.sum(emb * ref_emb, axis=1)
    assert cosine.min() > 0.98, cosine.min()
    assert np.abs(probs - ref_probs).max() < 0.05
    int8_size = (variants / compress.FILES["int8"]).stat().st_size
    assert int8_size < 0.4 * (variants / compress.FILES["onnx"]).stat().st_size


def test_a_variant_runs_through_the_loop_evaluation(model, images, variants, fmnist, tmp_path):
    labels = fmnist["test"][1][:256]
    catalogue = fmnist["train"][0][:300, ..., None]
    _, cat_emb = predict_batches(model, catalogue)
    params = EvaluationParams(retrieval_k=[1, 5], latency_images=8)
    ids = [f"t{i:04d}" for i in range(len(labels))]
    results = {}
    for name, candidate in [("fp32", model), ("onnx", compress.load_variant(variants, "onnx"))]:
        results[name] = evaluation.evaluate_model(
            candidate,
            images,
            labels,
            ids,
            cat_emb,
            fmnist["train"][1][:300],
            CATEGORIES,
            params,
            tmp_path / name,
        ).metrics
    for metric in ("accuracy", "macro_f1"):
        assert results["onnx"][metric] == pytest.approx(results["fp32"][metric], abs=1e-9)
    for metric in ("recall_at_1", "recall_at_5"):  # an untrained model's near-tied neighbours
        assert results["onnx"][metric] == pytest.approx(results["fp32"][metric], abs=2 / 256)
    assert results["onnx"]["latency_ms"] > 0 and results["onnx"]["latency_ms_batch"] > 0


def test_a_refused_or_missing_variant_cannot_be_loaded(model, variants, tmp_path):
    with pytest.raises(compress.VariantUnavailable, match="no variants.json"):
        compress.load_variant(tmp_path, "int8")
    refused = tmp_path / "refused"
    refused.mkdir()
    (refused / compress.FILES["int8"]).write_bytes((variants / compress.FILES["int8"]).read_bytes())
    reason = "refused: int8 accuracy 0.80 vs fp32 0.90"
    compress.write_meta(refused, model, {"int8": {"passed": False, "reason": reason}})
    with pytest.raises(compress.VariantUnavailable, match="int8 accuracy 0.80"):
        compress.load_variant(refused, "int8")
    with pytest.raises(ValueError, match="unknown compressed variant"):
        compress.load_variant(variants, "int4")
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((variants / compress.META_FILE).read_text())
    (broken / compress.META_FILE).write_text(json.dumps(meta))  # says accepted, file missing
    with pytest.raises(compress.VariantUnavailable, match="does not exist"):
        compress.load_variant(broken, "onnx")


@pytest.mark.parametrize(
    ("fp32", "variant", "tolerance", "passed"),
    [
        ({"accuracy": 0.90}, {"accuracy": 0.90}, 0.005, True),
        ({"accuracy": 0.90}, {"accuracy": 0.896}, 0.005, True),
        ({"accuracy": 0.90}, {"accuracy": 0.895}, 0.005, True),  # exactly the tolerance
        ({"accuracy": 0.90}, {"accuracy": 0.894}, 0.005, False),
        ({"accuracy": 0.90}, {"accuracy": 0.91}, 0.0, True),  # a gain is never refused
        ({"accuracy": 0.90}, {"accuracy": 0.8999}, 0.0, False),
        ({"accuracy": 0.90}, {}, 0.005, False),  # unmeasured: refused
    ],
)
def test_gate_refuses_a_variant_losing_more_than_the_tolerance(fp32, variant, tolerance, passed):
    ok, reason = check_compression("int8", fp32, variant, tolerance)
    assert ok is passed
    assert reason.startswith("accepted" if passed else "refused")
    assert "int8" in reason


def test_params_validate_the_variant_and_tolerance():
    assert ServingParams().variant == "fp32"
    assert ServingParams(variant="int8").variant == "int8"
    with pytest.raises(ValidationError):
        ServingParams(variant="int4")
    with pytest.raises(ValidationError):
        GatePolicy(max_compression_loss=-0.01)
