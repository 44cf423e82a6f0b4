"""The loop on a shared tracking server backed by PostgreSQL, as three hosts would run it.

- the tracking host: `vitrine ui --backend-store-uri postgresql://… --artifacts-destination …`
  (MLflow with its login and proxied artifacts) in a state folder of its own, on a
  PostgreSQL cluster the test starts (tests/scale/conftest.py);
- the loop's host: another state folder, which knows only the server's URL and an account
  (VITRINE_TRACKING_URI, MLFLOW_TRACKING_USERNAME / PASSWORD): it trains, evaluates, registers,
  gates, promotes with the `vitrine` CLI and rolls back;
- the serving host: a third state folder, `bentoml serve` following the champion through
  the same URL and hot-swapping to each promotion.

Registered versions, aliases and tags are rows in PostgreSQL; the artifacts travel through the
server into its destination, and the loop's host keeps none."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from components.config import PROJECT_ROOT
from components.stages import gate
from components.stages.context import RunContext
from tests.integration.test_owners import start_ui, stop_ui
from tests.scale.conftest import postgres_cluster, query
from tests.serving.conftest import (
    POLL_SECONDS,
    Champion,
    assert_serves_own_index,
    build_champion,
    every_worker_ready,
    free_port,
    register_distinct,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = pytest.mark.scale

VITRINE = str(PROJECT_ROOT / ".venv" / "bin" / "vitrine")
NO_FLOORS = {"min_accuracy": 0.0, "min_recall_at_1": 0.0}


@dataclass
class Tracking:
    url: str
    store: str  # the PostgreSQL URL behind it
    artifacts: Path  # --artifacts-destination, on the tracking host
    env: dict[str, str]  # what another host needs: the URL and an account


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> Tracking:
    with postgres_cluster() as store:
        home = tmp_path_factory.mktemp("tracking-host")
        artifacts = home / "artifacts"
        port = free_port()
        extra = ["--backend-store-uri", store, "--artifacts-destination", str(artifacts)]
        proc = start_ui({"VITRINE_HOME": str(home / "state")}, home / "ui.log", port, *extra)
        try:
            admin = json.loads((home / "state" / "auth" / "admin.json").read_text())
            url = f"http://127.0.0.1:{port}"
            env = {
                "VITRINE_TRACKING_URI": url,
                "MLFLOW_TRACKING_USERNAME": admin["username"],
                "MLFLOW_TRACKING_PASSWORD": admin["password"],
            }
            yield Tracking(url, store, artifacts, env)
        finally:
            stop_ui(proc)


@pytest.fixture(scope="module")
def champion(tracking, tmp_path_factory, fmnist) -> Champion:
    """Version 1, trained on the loop's host and registered and promoted through the server."""
    with pytest.MonkeyPatch.context() as patch:  # this process is the loop's host
        for key, value in tracking.env.items():
            patch.setenv(key, value)
        # no compressed variants: ONNX and int8 builds are tested elsewhere, and cost here
        lean = {"registry": {"variants": []}}
        yield build_champion(tmp_path_factory.mktemp("loop-host"), fmnist, **lean)


def vitrine(champion: Champion, tracking: Tracking, *args: str) -> str:
    done = subprocess.run(
        [VITRINE, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **champion.env, **tracking.env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_for_version(url: str, version: str) -> None:
    """Until a dozen /readyz calls in a row (any worker) name `version`."""

    def serving() -> bool:
        answers = every_worker_ready(url)
        return bool(answers) and all(a.json()["model_version"] == version for a in answers)

    wait_for(serving, 90, f"every worker serving version {version}")


def test_the_loop_runs_against_a_tracking_server_on_postgresql(tracking, champion, tmp_path):
    store, model = tracking.store, champion.ctx.params.registry.model_name
    rows = query(store, f"SELECT version FROM model_versions WHERE name = '{model}'")
    assert rows == [("1",)]
    stored = {p.name for p in tracking.artifacts.rglob("*") if p.is_file()}
    assert "MLmodel" in stored and "embeddings.npy" in stored  # the model and its index
    assert not any(p.is_file() for p in champion.ctx.paths.artifacts.rglob("*"))

    serving_host = tmp_path / "serving-host"
    env = {
        **champion.env,
        **tracking.env,
        "VITRINE_HOME": str(serving_host / "state"),
        "VITRINE_POLL_SECONDS": str(POLL_SECONDS),
    }
    server = start_server(env, tmp_path / "serve.log")
    try:
        wait_for_version(server.url, "1")
        # version 2: weights of its own, registered, then gated against version 1 re-measured
        # through the server
        work = champion.ctx.work.with_name(f"{champion.ctx.work.name}-2")
        assert register_distinct(champion) == "2"
        # floors off: a 40-batch model scores about 0.3 (this test is the path through the
        # server; the gate's rules are tests/unit/test_gate.py)
        params = champion.ctx.params
        params = params.model_copy(update={"gate": params.gate.model_copy(update=NO_FLOORS)})
        ctx = RunContext(params, champion.ctx.paths, work=work, repo=champion.ctx.repo)
        verdict = gate.run(ctx, champion.registry)
        assert verdict["version"] == "2" and verdict["champion"] == "1"
        assert verdict["passed"], verdict["reasons"]
        assert champion.registry.status()["challenger"]["approval"] == "pending"
        champion.registry.approve("2", by="owner")

        said = vitrine(champion, tracking, "promote")
        assert "1 → 2" in said and "owner" in said
        wait_for_version(server.url, "2")
        assert_serves_own_index(server.url, champion, "2", "1")

        back = champion.registry.rollback()  # the CLI's own path, in-process: 20 s less
        assert back["to"] == "1"
        wait_for_version(server.url, "1")
        assert_serves_own_index(server.url, champion, "1", "2")
    finally:
        stop_server(server.proc)

    aliases = dict(
        query(store, f"SELECT alias, version FROM registered_model_aliases WHERE name = '{model}'")
    )
    assert aliases["champion"] == "1" and aliases["previous_champion"] == "2"
    sql = f"SELECT key, value FROM model_version_tags WHERE name = '{model}' AND version = 2"
    tags = dict(query(store, sql))
    assert tags["gate_passed"] == "true" and tags["approved_by"] == "owner"
    assert not (serving_host / "state" / "mlflow.db").exists()  # no SQLite store anywhere
    assert not (Path(champion.env["VITRINE_HOME"]) / "mlflow.db").exists()
