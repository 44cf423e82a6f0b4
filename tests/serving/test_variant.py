"""Compressed variants end to end: registration builds them from the version's own weights,
measures them on the frozen test split and stores the accepted ones with the version; the
service serves the variant params ask for, with answers shaped like the fp32 model's; a
variant the gate refused is neither stored nor served (fp32 answers, /readyz says why)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from components.model import compress
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
        answers = check_answers(server.url, photo, registry.load_model(versions["accepted"]))
        assert answers["model_version"] == versions["accepted"]

        registry.promote(versions["refused"])
        reloaded = httpx.post(f"{server.url}/admin/reload", headers={"x-admin-token": ADMIN_TOKEN})
        assert reloaded.status_code == 200, reloaded.text
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["model_version"] == versions["refused"] and ready["variant"] == "fp32"
        assert "refused" in ready["variant_note"] and ready["variant_requested"] == "int8"
        assert check_answers(server.url, photo, None)["model_version"] == versions["refused"]
    finally:
        stop_server(server.proc)


def check_answers(url: str, photo: bytes, fp32_model) -> dict:
    """/classify, /embed and /explain answer in the fp32 model's shapes."""
    classify = httpx.post(f"{url}/classify", files={"image": photo}).json()
    assert len(classify["top"]) == 3
    assert sum(t["probability"] for t in classify["top"]) <= 1.0 + 1e-6
    embed = httpx.post(f"{url}/embed", files={"image": photo}).json()
    vector = np.asarray(embed["embedding"])
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-3
    if fp32_model is not None:
        assert embed["dim"] == fp32_model.embedding_dim
    explain = httpx.post(f"{url}/explain", files={"image": photo})
    assert explain.status_code == 200, explain.text  # gradients come from the fp32 weights
    return classify
