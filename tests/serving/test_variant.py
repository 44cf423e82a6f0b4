"""Compressed variants end to end: registration builds them from the version's own weights,
measures them on the frozen test split and stores the accepted ones with the version; the
service serves the variant params ask for, with answers shaped like the fp32 model's; a
variant the gate refused is neither stored nor served (fp32 answers, /readyz says why)."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from components.model import compress
from components.model.transforms import model_input, to_tensor
from tests.serving.conftest import ADMIN_TOKEN, Champion, build_champion, start_server, stop_server

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def champion(tmp_path_factory, fmnist) -> Champion:
    """A champion of this module's own: its tests register and promote versions."""
    return build_champion(tmp_path_factory.mktemp("variant"), fmnist)


def register(champion, *, tolerance: float, fake_fp32_accuracy: float | None = None) -> str:
    """A new version of the same trained run, gate-passed and approved. With
    fake_fp32_accuracy the evaluation's fp32 accuracy is overstated for this registration only,
    so every variant measures as a large loss (the refusal path on real measurements)."""
    from tests.serving.conftest import register_approved

    champion.ctx.params.gate.max_compression_loss = tolerance
    champion.ctx.params.serving.variant = "int8"
    metrics_path = champion.ctx.work / "evaluate" / "metrics.json"
    original = metrics_path.read_text()
    try:
        if fake_fp32_accuracy is not None:
            metrics = json.loads(original)
            metrics_path.write_text(json.dumps({**metrics, "accuracy": fake_fp32_accuracy}))
        return register_approved(champion)
    finally:
        metrics_path.write_text(original)


@pytest.fixture(scope="module")
def versions(champion) -> dict[str, str]:
    accepted = register(champion, tolerance=0.05)
    refused = register(champion, tolerance=0.05, fake_fp32_accuracy=1.0)
    return {"accepted": accepted, "refused": refused}


def test_registration_stores_only_accepted_variants_and_tags_every_verdict(
    champion, versions, tmp_path
):
    registry = champion.registry
    tags = registry.version_info(versions["accepted"])["tags"]
    assert tags["variant_int8"].startswith("accepted: int8 accuracy")
    folder = registry.download_artifacts(
        versions["accepted"], compress.ARTIFACT_DIR, tmp_path / "a"
    )
    assert (folder / compress.FILES["int8"]).is_file()
    int8 = compress.load_variant(folder, "int8")
    assert int8.embedding_dim == registry.load_model(versions["accepted"]).embedding_dim
    metrics = registry.version_info(versions["accepted"])["metrics"]
    assert metrics["int8_size_bytes"] > 0 and "int8_accuracy" in metrics

    refused = registry.version_info(versions["refused"])["tags"]
    for variant in ("onnx", "int8"):
        assert refused[f"variant_{variant}"].startswith(f"refused: {variant} accuracy")
        assert "vs fp32 1.0000" in refused[f"variant_{variant}"]
    with pytest.raises(MlflowException, match="Failed to download"):  # nothing was stored
        registry.download_artifacts(versions["refused"], compress.ARTIFACT_DIR, tmp_path / "r")


def test_service_serves_the_accepted_int8_variant_and_falls_back_when_refused(
    champion, versions, tmp_path
):
    registry = champion.registry
    categories = champion.ctx.params.data.categories
    registry.promote(versions["accepted"])
    env = {
        **champion.env,
        "VITRINE_VARIANT": "int8",
        "VITRINE_ADMIN_TOKEN": ADMIN_TOKEN,
        "VITRINE_POLL_SECONDS": "0",
    }
    server = start_server(env, tmp_path / "serve.log")
    try:
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["model_version"] == versions["accepted"]
        assert (ready["variant"], ready["variant_note"]) == ("int8", None)
        photo = sorted((champion.ctx.catalogue_dir / "images").rglob("*.png"))[0].read_bytes()
        fp32 = registry.load_model(versions["accepted"])
        answers = check_answers(server.url, photo, fp32, categories, served_fp32=False)
        assert answers["model_version"] == versions["accepted"]

        registry.promote(versions["refused"])
        reloaded = httpx.post(f"{server.url}/admin/reload", headers={"x-admin-token": ADMIN_TOKEN})
        assert reloaded.status_code == 200, reloaded.text
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["model_version"] == versions["refused"] and ready["variant"] == "fp32"
        assert "refused" in ready["variant_note"] and ready["variant_requested"] == "int8"
        fp32 = registry.load_model(versions["refused"])
        answers = check_answers(server.url, photo, fp32, categories, served_fp32=True)
        assert answers["model_version"] == versions["refused"]
    finally:
        stop_server(server.proc)


def check_answers(
    url: str, photo: bytes, fp32_model, categories: list[str], *, served_fp32: bool
) -> dict:
    """/classify, /embed and /explain answer in the fp32 model's shapes: three distinct
    categories, best first, the first being the answer; served fp32, its very numbers."""
    classify = httpx.post(f"{url}/classify", files={"image": photo}).json()
    top = classify["top"]
    probabilities = [t["probability"] for t in top]
    assert len({t["category"] for t in top}) == 3
    assert probabilities == sorted(probabilities, reverse=True)
    assert top[0]["category"] == classify["category"]
    assert top[0]["probability"] == pytest.approx(classify["confidence"], abs=1e-6)
    pixels = model_input(Image.open(io.BytesIO(photo)), fp32_model)
    with torch.inference_mode():
        logits, own = fp32_model(to_tensor(pixels[None].copy()))
    probs = torch.softmax(logits, 1)[0].numpy()
    best = np.argsort(-probs)[:3]
    embed = httpx.post(f"{url}/embed", files={"image": photo}).json()
    vector = np.asarray(embed["embedding"])
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-3
    assert embed["dim"] == fp32_model.embedding_dim
    if served_fp32:
        assert [t["category"] for t in top] == [categories[i] for i in best]
        assert probabilities == pytest.approx(probs[best].tolist(), abs=1e-5)
        assert np.allclose(vector, own[0].numpy(), atol=1e-5)
    explain = httpx.post(f"{url}/explain", files={"image": photo})
    assert explain.status_code == 200, explain.text  # gradients come from the fp32 weights
    return classify
