"""Faults the service survives, each caused for real: weights damaged on disk after their
registration, `bentoml serve` killed with SIGKILL (an OOM kill) and restarted, the tracking
store unreachable when the service starts. On a champion of their own: these tests register
and promote versions."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from components.config import PROJECT_ROOT
from tests.serving.conftest import (
    ADMIN_TOKEN,
    POLL_SECONDS,
    build_champion,
    every_worker_ready,
    free_port,
    readyz,
    register_and_promote,
    register_approved,
    start_server,
    stop_server,
    wait_for,
)
from tests.serving.test_processes import a_photo, answers
from vitrine.children import alive, descendants

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def champion(tmp_path_factory, fmnist):
    return build_champion(tmp_path_factory.mktemp("faults"), fmnist)


def service_env(champion, **extra: str) -> dict[str, str]:
    return {
        **champion.env,
        "VITRINE_ADMIN_TOKEN": ADMIN_TOKEN,
        "VITRINE_POLL_SECONDS": str(POLL_SECONDS),
        **extra,
    }


def classify(url: str, champion) -> httpx.Response:
    return httpx.post(f"{url}/classify", files={"image": a_photo(champion)}, timeout=60)


def failed_reloads(url: str) -> float:
    """vitrine_reloads_total{outcome="failed"}, summed over the workers."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vitrine_reloads_total" and sample.labels["outcome"] == "failed"
    )


def stored_weights(champion) -> set[Path]:
    return set(champion.ctx.paths.artifacts.rglob("*.pth"))


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """One `bentoml serve` (about 30 s to start on two cores) for the first two tests: the
    first has it refuse damaged weights, the second kills it with SIGKILL."""
    running = start_server(service_env(champion), tmp_path_factory.mktemp("faults") / "serve.log")
    yield running
    stop_server(running.proc)


def test_a_champion_whose_weights_were_damaged_on_disk_is_refused(champion, server):
    serving = readyz(server.url).json()["model_version"]
    before = stored_weights(champion)
    damaged = register_approved(champion)
    added = stored_weights(champion) - before  # the new version's weights on disk
    assert added
    for weights in added:  # one flipped byte in the tensor data: torch still loads it
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    champion.registry.promote(damaged)
    reload = httpx.post(
        f"{server.url}/admin/reload", headers={"x-admin-token": ADMIN_TOKEN}, timeout=120
    )
    assert reload.status_code == 500
    ready = readyz(server.url).json()
    assert ready["model_version"] == serving != damaged
    assert f"version {damaged}: artifact model/" in ready["last_reload_error"]
    assert "is corrupted" in ready["last_reload_error"]
    answer = classify(server.url, champion)
    assert answer.status_code == 200 and answer.json()["model_version"] == serving
    champion.registry.rollback(serving)  # the next test starts from a loadable champion


def test_a_server_killed_with_sigkill_restarts_on_the_audited_champion(champion, server, tmp_path):
    env = service_env(champion)
    first = server  # the module's server, up since the first test
    port = int(first.url.rsplit(":", 1)[1])
    promoted = register_and_promote(champion)
    httpx.post(f"{first.url}/admin/reload", headers={"x-admin-token": ADMIN_TOKEN}, timeout=120)
    assert readyz(first.url).json()["model_version"] == promoted
    workers = descendants(first.proc.pid)  # in sessions of their own (BentoML's choice)
    assert len(workers) >= 2
    os.kill(first.proc.pid, signal.SIGKILL)  # the arbiter only, as an OOM kill would
    first.proc.wait()
    # its orphaned workers notice and stop (components/serving/runtime.py exit_with_parent)
    wait_for(lambda: not alive(workers) and not answers(port), 15, "the orphans stopped")
    # while it is down, somebody moves the alias to a version that failed the gate
    failed = register_approved(champion)
    champion.registry.record_verdict(failed, {"passed": False, "reasons": ["FAIL: test"]})
    champion.registry.client.set_registered_model_alias("vitrine-product", "champion", failed)
    second = start_server(env, tmp_path / "second.log")
    try:
        ready = readyz(second.url).json()
        assert ready["model_version"] == promoted != failed
        assert f"moved to version {failed} outside vitrine" in ready["champion_alias_refused"]
        answer = classify(second.url, champion)
        assert answer.status_code == 200 and answer.json()["model_version"] == promoted
        metrics = httpx.get(f"{second.url}/metrics", timeout=10).text  # stale files of the dead
        assert f'vitrine_champion_alias_refused{{version="{failed}"}} 1.0' in metrics
    finally:
        stop_server(second.proc)
    assert champion.registry.promote()["action"] == "repair"  # the alias is put back


def test_an_unreachable_tracking_store_at_start_is_a_clear_503_then_recovers(champion, tmp_path):
    store_port = free_port()
    store = f"http://127.0.0.1:{store_port}"
    poll = 1  # seconds: the failed polls below, and the recovery, wait for the next poll
    env = service_env(champion, VITRINE_TRACKING_URI=store, VITRINE_POLL_SECONDS=str(poll))
    log = tmp_path / "serve.log"
    port = free_port()
    proc = subprocess.Popen(
        [str(PROJECT_ROOT / ".venv/bin/bentoml"), "serve", "bentos.service:Vitrine"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env, "BENTOML_HOME": str(tmp_path / "bentoml")},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    mlflow = None
    try:

        def not_ready():
            try:
                response = readyz(url)
            except httpx.HTTPError:
                assert proc.poll() is None, log.read_text()[-3000:]
                return None
            return response if response.status_code == 503 else None

        body = wait_for(not_ready, 120, "a 503 from /readyz").json()
        assert body["ready"] is False and body["model_version"] is None
        assert f"MLflow tracking store {store} is unavailable" in body["last_reload_error"]
        workers = descendants(proc.pid)
        # several failed polls later (three of each worker's, counted): the same processes
        failed = failed_reloads(url)
        wait_for(lambda: failed_reloads(url) >= failed + 3 * len(workers), 60, "failed polls")
        assert proc.poll() is None and alive(workers) == workers
        assert readyz(url).status_code == 503
        health = httpx.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 200
        # the store comes back: the next poll loads the audited champion
        paths = champion.ctx.paths
        mlflow = subprocess.Popen(
            [str(PROJECT_ROOT / ".venv/bin/mlflow"), "server"]
            + ["--backend-store-uri", paths.embedded_tracking_uri]
            + ["--default-artifact-root", paths.artifacts.as_uri()]
            + ["--host", "127.0.0.1", "--port", str(store_port), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as vitrine ui
            stdout=(tmp_path / "mlflow.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        expected = champion.registry.served_champion()[0]
        ready = wait_for(lambda: every_worker_ready(url), 180, "recovery of every worker")
        assert {response.json()["model_version"] for response in ready} == {expected}
        assert classify(url, champion).json()["model_version"] == expected
    finally:
        stop_server(proc)
        if mlflow is not None:
            stop_server(mlflow)
