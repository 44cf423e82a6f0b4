"""Drift end to end: a small real champion registered WITH its reference, the real `bentoml
serve`, `vitrine simulate` sending real (shifted) held-out images over HTTP, and `vitrine drift`
judging each window from the service's request log: verdicts, exit codes, the report."""

from __future__ import annotations

import hashlib
import html
import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from components.config import PROJECT_ROOT
from components.data.catalogue import read_manifest
from components.model.reference import REFERENCE_ARTIFACT
from monitoring.shifts import encode_png
from monitoring.simulate import send_requests
from tests.serving.conftest import (
    build_champion,
    free_port,
    start_server,
    stop_server,
    wait_for,
)
from vitrine.cli import app

pytestmark = pytest.mark.integration
N = 250  # requests per simulated window (monitoring.min_samples is 200)
N_TEST = 300  # the catalogue's test split: Fashion-MNIST's first 300 test images, the reference


@pytest.fixture(scope="module")
def served(tmp_path_factory, fmnist):
    root = tmp_path_factory.mktemp("drift")
    champion = build_champion(root, fmnist, n_train=400, n_test=N_TEST)
    params_path = Path(champion.env["VITRINE_PARAMS"])
    params = yaml.safe_load(params_path.read_text())
    params["monitoring"]["tsne_points"] = 50  # the report's t-SNE picture only: keep it small
    params_path.write_text(yaml.safe_dump(params))
    env = {**champion.env, "VITRINE_SAMPLE_RATE": "1.0", "VITRINE_POLL_SECONDS": "0"}
    server = start_server(env, root / "serve.log")
    # the CLI runs in this process (one import of Evidently, MLflow and torch); the env is
    # restored after each call
    yield champion, server, {**env, "PREFECT_HOME": str(root / "prefect")}
    stop_server(server.proc)


def vitrine(env: dict, *args: str) -> Result:
    """`vitrine ARGS` through the real Typer app, with its exit code and output."""
    return CliRunner().invoke(app, list(args), env=env)


def simulate_then_drift(served, shift: str, tmp_path, n: int = N) -> tuple[Result, dict]:
    champion, server, env = served
    since = datetime.now(UTC).isoformat()
    sent = vitrine(env, "simulate", "--shift", shift, "--n", str(n), "--url", server.url)
    assert sent.exit_code == 0, sent.output
    assert f"{n} ok, 0 errors" in sent.output
    out = tmp_path / f"{shift}.json"
    judged = vitrine(env, "drift", "--since", since, "--json", str(out))
    return judged, json.loads(out.read_text())


def test_the_reference_is_registered_with_the_version(served):
    champion, _, _ = served
    assert champion.registry.has_artifact(champion.version, REFERENCE_ARTIFACT)
    ref = pd.read_parquet(champion.ctx.work / "evaluate" / "reference" / "reference.parquet")
    assert len(ref) == 300 and {"category", "confidence", "brightness", "aspect"} <= set(ref)


def pixel_digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()


def test_unshifted_traffic_is_no_drift(served, fmnist, tmp_path):
    """Photos from the reference's own distribution that it was never built from: Fashion-MNIST
    test images after the catalogue's, in the reference's mix of true categories (sending the
    reference's own images, as `vitrine simulate` draws them, compared it with itself; a plain
    draw of the next 250 differs in its category mix: 'Ankle boot' predicted 0.14 vs 0.08,
    chi-square p 0.00035, which is a shift of the category mix, not no drift)."""
    champion, server, env = served
    reference = pd.read_parquet(champion.ctx.work / "evaluate" / "reference" / "reference.parquet")
    manifest = read_manifest(champion.ctx.catalogue_dir).set_index("product_id")
    reference_pixels = {
        pixel_digest(np.asarray(Image.open(champion.ctx.catalogue_dir / path)))
        for path in manifest.loc[reference["product_id"], "path"]
    }
    unseen, labels = fmnist["test"][0][N_TEST:], fmnist["test"][1][N_TEST:]
    categories = champion.ctx.params.data.categories
    mix = reference["true_category"].value_counts()
    images = np.concatenate(
        [
            unseen[labels == categories.index(category)][: round(count * N / len(reference))]
            for category, count in mix.items()
        ]
    )
    assert len(reference_pixels) == len(reference) == N_TEST
    assert not {pixel_digest(image) for image in images} & reference_pixels  # disjoint
    since = datetime.now(UTC).isoformat()
    sent = send_requests(server.url, [encode_png(Image.fromarray(image)) for image in images])
    assert sent["ok"] == len(images) >= N - len(mix), sent
    out = tmp_path / "unseen.json"
    judged = vitrine(env, "drift", "--since", since, "--json", str(out))
    data = json.loads(out.read_text())
    assert judged.exit_code == 0, judged.output
    assert judged.stdout.splitlines()[0] == "no drift"
    assert data["drifted"] is False and data["details"]["window"]["requests"] == len(images)
    assert "registered with version" in data["details"]["reference"]["note"]


def test_darkened_photos_drift_in_brightness(served, tmp_path):
    judged, data = simulate_then_drift(served, "darken", tmp_path)
    assert judged.exit_code == 1, judged.output
    headline = judged.stdout.splitlines()[0]
    assert headline.startswith("DRIFT: ") and "brightness (ks p" in headline
    report = Path(data["report_html"])
    page = report.read_text()
    assert html.escape(headline) in page and "Most drifted slice" in page
    assert "data:image/png" in page and (report.parent / "evidently.html").exists()
    assert html.escape(headline) in (report.parent.parent / "index.html").read_text()


def test_a_new_category_drifts(served, tmp_path):
    # A quarter of the window is the unknown category. In a window of 250 the tiny champion's
    # signals sat at the edge and moved with the CPU's training precision (on an AVX512-BF16
    # machine: embeddings MMD 0.0091 < 0.01, category chi-square p 0.011 > 0.001; no drift).
    # 500 requests, as a day of shop traffic would give, make the category shift plain.
    judged, data = simulate_then_drift(served, "new-category", tmp_path, n=2 * N)
    assert judged.exit_code == 1, judged.output
    assert data["drifted"] is True and data["details"]["signals"]


def test_other_versions_are_excluded_and_counted_and_too_few_is_exit_2(served, tmp_path):
    champion, _, env = served
    since = datetime.now(UTC).isoformat()
    time.sleep(0.01)
    log = sorted((champion.ctx.paths.home / "requests").glob("requests-*.jsonl"))[-1]
    record = json.loads(log.read_text().splitlines()[-1])
    with log.open("a") as out:
        for _ in range(3):
            out.write(
                json.dumps(
                    {**record, "timestamp": datetime.now(UTC).isoformat(), "model_version": "999"}
                )
                + "\n"
            )
    judged = vitrine(env, "drift", "--since", since, "--json", str(tmp_path / "few.json"))
    assert judged.exit_code == 2
    assert judged.stdout.startswith("NO VERDICT: too few samples: 0 requests")
    details = json.loads((tmp_path / "few.json").read_text())["details"]
    assert details["window"]["excluded_other_versions"] == {"999": 3}


def test_on_call_sees_every_verdict_over_time_in_evidentlys_ui(served, tmp_path):
    """Each `vitrine drift` run with a verdict (the module's earlier tests made three) added its
    Evidently snapshot to the state folder's workspace; Evidently's own UI, started on it,
    lists them under one project and its dashboard plots each signal's score run after run:
    the very scores of the drift reports."""
    champion, _, _ = served
    reports = [json.loads(p.read_text()) for p in champion.ctx.paths.reports.glob("*/report.json")]
    judged = sorted(
        (r for r in reports if "workspace_snapshot" in r.get("evidently", {})),
        key=lambda r: r["created_at"],
    )
    assert len(judged) == 3, [r.get("evidently") for r in reports]
    port = free_port()
    ui = champion.ctx.paths.evidently_workspace
    log = tmp_path / "evidently.log"
    proc = subprocess.Popen(
        [str(PROJECT_ROOT / ".venv/bin/evidently"), "ui", "--workspace", str(ui)]
        + ["--port", str(port)],
        env={**os.environ, "DO_NOT_TRACK": "true"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: answers(f"{api}/version"), 60, f"evidently ui: {log}")
        projects = httpx.get(f"{api}/projects", timeout=10).json()
        assert [p["name"] for p in projects] == ["vitrine drift"]
        project = projects[0]["id"]
        snapshots = httpx.get(f"{api}/projects/{project}/snapshots", timeout=10).json()
        assert sorted(s["id"] for s in snapshots) == sorted(
            r["evidently"]["workspace_snapshot"] for r in judged
        )
        assert {s["metadata"]["model_version"] for s in snapshots} == {champion.version}
        dashboard = httpx.get(f"{api}/v2/dashboards/{project}", timeout=10).json()
        plotted = {
            value["metric_labels"].get("column") or "embeddings": value
            for panel in dashboard["panels"]
            if panel["plot_params"]["plot_type"] == "line"
            for value in panel["values"]
        }
        signals = [s["name"] for s in judged[0]["signals"]]
        assert set(plotted) == set(signals)
        batch = {
            "series_filter": [
                {
                    "tags": [],
                    "metadata": {},
                    "metric": v["metric"],
                    "metric_labels": v["metric_labels"],
                }
                for v in plotted.values()
            ]
        }
        data = httpx.post(
            f"{api}/v2/snapshots/{project}/data_series_batch", json=batch, timeout=30
        ).json()
        assert len(data["sources"]) == 3  # one point per drift run, oldest first
        for series in data["series"]:
            name = list(plotted)[series["filter_index"]]
            scores = [next(s["score"] for s in r["signals"] if s["name"] == name) for r in judged]
            assert series["values"] == pytest.approx(scores, rel=1e-6), name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
