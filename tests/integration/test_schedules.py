"""Schedules and the online update on a real (temporary) Prefect server: `vitrine deploy`
creates the configured deployments; a monitor run that sees drift in a real request log starts
a `retrain` run; a monitor run while that retrain executes (for real, as a worker would run it)
starts no second one; the drift-triggered retrain is gated and waits for approval."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from components.config import PROJECT_ROOT, load_params, state_paths
from components.data.catalogue import read_manifest
from components.model import reference
from components.release.registry import open_registry
from components.serving.logs import RequestLog
from components.stages import ingest
from components.stages.context import RunContext
from tests.conftest import shrunk_params, write_csv_catalogue, write_params

pytestmark = pytest.mark.integration

CRONS = {
    "retrain": "30 3 * * *",
    "monitor": "7 * * * *",
    "promote": "*/10 * * * *",
    "refresh": "45 * * * *",
}
DEAD_HOST_SECONDS = 600


@pytest.fixture(scope="module")
def api():
    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def world(tmp_path_factory, fmnist, api):
    """A CSV catalogue (real Fashion-MNIST images), a bootstrap champion, configured schedules."""
    from flows.retrain import retrain

    root = tmp_path_factory.mktemp("schedules")
    repo = root / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    csv = write_csv_catalogue(root / "shop", fmnist, n_train=800, n_test=300)
    schedules = {
        "work_pool": "vitrine-test",
        "timezone": "UTC",
        # a deployment run is executed below by `prefect flow-run execute`, which beats at
        # Prefect's default (every 180 s), not the deployments' rate: a dead-host window above
        "dead_host_seconds": DEAD_HOST_SECONDS,
        **{name: {"cron": cron} for name, cron in CRONS.items()},
    }
    params = shrunk_params(
        repo / "data" / "catalogue",
        data={"source": str(csv)},
        text_search={"enabled": False},
        registry={"variants": []},
        schedules=schedules,
        gate={"max_latency_ms": 1e4},  # a shared 2-core box: latency is not under test here
        monitoring={
            "min_samples": 100,
            "reference_rows": 300,
            "max_current_rows": 300,
            "tsne_points": 50,
            "sample_images": 2,
        },
    )
    params["train"]["epochs"] = 8  # enough for the bootstrap floors on 800 images
    params_path = write_params(root / "params.yaml", params)
    env = {"VITRINE_HOME": str(root / "state"), "VITRINE_PARAMS": str(params_path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ctx = RunContext(load_params(params_path), state_paths(), work=root / "ingest", repo=repo)
    ingest.run(ctx)
    first = retrain()
    assert first["promoted"] and first["version"] == "1", first["gate"]
    yield {"root": root, "ctx": ctx, "params": params, "api": api}
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def invoke(args: list[str], api: str):
    from vitrine.cli import app

    result = CliRunner().invoke(app, args, env={"PREFECT_API_URL": api})
    assert result.exit_code == 0, result.output
    return result


def retrain_runs() -> list:
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/vitrine")
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        )


def log_requests(ctx: RunContext, shift: str, n: int) -> None:
    """Real requests in the service's request log: held-out test images (shifted), described
    by the champion exactly as bentos/service.py describes a request."""
    from monitoring.shifts import apply_shift

    model = open_registry(ctx.paths, ctx.params).load_model("1").eval()
    manifest = read_manifest(ctx.catalogue_dir)
    test = manifest[manifest["split"] == "test"].head(n)
    rng = np.random.default_rng(0)
    images = []
    for rel in test["path"]:
        with Image.open(ctx.catalogue_dir / rel) as image:
            images.append(apply_shift(image.convert("L"), shift, rng))
    rows, emb = reference.describe_images(model, images, ctx.params.data.categories)
    log = RequestLog(ctx.paths.home / "requests")
    for record, vector in zip(rows.to_dict("records"), emb, strict=True):
        stats = {k: record[k] for k in reference.STAT_COLUMNS}
        log.write("/classify", "1", vector, record["category"], record["confidence"], stats)


def test_deploy_with_the_server_down_names_the_command_that_starts_it(tmp_path):
    from vitrine.cli import app

    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "VITRINE_HOME": str(tmp_path / "state")}
    done = subprocess.run(
        [sys.executable, "-m", "vitrine.cli", "deploy"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "vitrine ui" in done.stderr and url in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    cli_env = {"PREFECT_API_URL": url, "VITRINE_HOME": env["VITRINE_HOME"]}
    listed = CliRunner().invoke(app, ["deploy", "--list"], env=cli_env)
    assert listed.exit_code != 0 and "vitrine ui" in listed.output


def test_deploy_creates_the_configured_schedules(world):
    invoke(["deploy"], world["api"])
    invoke(["deploy"], world["api"])  # idempotent: updates, never duplicates
    with get_client(sync_client=True) as client:
        for name, cron in CRONS.items():
            dep = client.read_deployment_by_name(f"{name}/vitrine")
            assert [s.schedule.cron for s in dep.schedules] == [cron]
            assert dep.schedules[0].schedule.timezone == "UTC" and dep.schedules[0].active
            assert dep.work_pool_name == "vitrine-test" and not dep.paused
            assert dep.entrypoint == f"flows.{name}.{name}"
            assert dep.global_concurrency_limit.limit == 1
        retrain_dep = client.read_deployment_by_name("retrain/vitrine")
        assert retrain_dep.parameters == {"refresh_data": True}
        assert client.read_work_pool("vitrine-test").type == "process"
        deployments = [d for d in client.read_deployments() if d.name == "vitrine"]
        assert len(deployments) == 4
        # every run beats (any worker of the pool applies the deployment's environment) ...
        for dep in deployments:
            env = dep.job_variables["env"]
            assert env == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(DEAD_HOST_SECONDS // 3)}
        # ... and one automation crashes a run of these deployments that stops beating
        (automation,) = client.read_automations_by_name("vitrine: crash runs of a dead host")
    trigger = automation.trigger
    assert automation.enabled and trigger.posture.value == "Proactive"
    assert trigger.within.total_seconds() == DEAD_HOST_SECONDS
    assert trigger.after == {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed"} <= trigger.expect
    watched = trigger.match_related.root["prefect.resource.id"]  # the four deployments' runs
    assert sorted(watched) == sorted(f"prefect.deployment.{d.id}" for d in deployments)
    assert [action.state.value for action in automation.actions] == ["CRASHED"]
    listed = json.loads(invoke(["deploy", "--list", "--json"], world["api"]).output)
    assert listed["dead_host"]["exists"]
    assert listed["dead_host"]["dead_host_seconds"] == DEAD_HOST_SECONDS
    rows = {row["name"]: row for row in listed["deployments"]}
    now = datetime.now(UTC)
    for name, cron in CRONS.items():
        row = rows[f"{name}/vitrine"]
        assert row["schedules"][0]["cron"] == cron
        times = [datetime.fromisoformat(t) for t in row["next_runs"]]
        assert len(times) >= 3 and all(t > now for t in times) and times == sorted(times)
        minute = cron.split()[0]
        if minute.isdigit():
            assert {t.minute for t in times} == {int(minute)}
    text = invoke(["deploy", "--list"], world["api"]).output
    assert "retrain/vitrine" in text and "30 3 * * *" in text and "vitrine worker" in text
    assert f"dead hosts: a run silent for {DEAD_HOST_SECONDS} s" in text


def test_monitor_without_a_verdict_starts_no_retrain(world):
    from flows.monitor import monitor

    outcome = monitor()  # no request logged yet: too few samples
    assert outcome["drift"]["drifted"] is None and outcome["drift"]["exit_code"] == 2
    assert outcome["retrain_run"] is None and retrain_runs() == []


def test_drift_triggers_a_tagged_retrain_run(world):
    from flows.monitor import monitor

    log_requests(world["ctx"], "darken", 300)
    outcome = monitor()
    drift = outcome["drift"]
    assert drift["drifted"] is True and drift["exit_code"] == 1, drift
    assert outcome["retrain_run"] is not None, outcome["decision"]
    runs = retrain_runs()
    assert len(runs) == 1
    run = runs[0]
    assert "trigger:drift" in run.tags and run.state_type.value == "SCHEDULED"
    assert run.parameters["refresh_data"] is True
    assert run.parameters["cause"].startswith("drift: DRIFT")
    assert drift["report"] and drift["report"] in run.parameters["cause"]
    world["drift_run"] = run


def test_monitor_while_the_retrain_runs_starts_no_second(world):
    """Execute the triggered run as a worker would (`prefect flow-run execute`, loading the
    deployment's entrypoint) and run the monitor while it is Running."""
    from flows.monitor import monitor

    run = world["drift_run"]
    slower = shrunk_params(
        world["ctx"].catalogue_dir,
        **{
            k: world["params"][k]
            for k in ("data", "text_search", "registry", "schedules", "monitoring", "gate")
        },
    )
    slower["train"].update(epochs=2)  # another fingerprint: a fresh run, not a resume of v1's
    env = {
        **os.environ,
        "PREFECT_API_URL": world["api"],
        "VITRINE_PARAMS": str(write_params(world["root"] / "slower.yaml", slower)),
    }
    log = world["root"] / "retrain-run.log"
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [prefect, "flow-run", "execute", str(run.id)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 240
        while state_of(run.id) != "RUNNING":
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the retrain run never started"
            time.sleep(0.5)
        outcome = monitor()
        assert outcome["drift"]["drifted"] is True
        assert outcome["retrain_run"] is None
        assert f"already in flight: {run.name} (Running)" in outcome["decision"]
        assert len(retrain_runs()) == 1
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert state_of(run.id) == "COMPLETED"


def task_running(run_id, prefix: str) -> bool:
    """Whether a task run of the flow run, named `prefix`…, is Running."""
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    return any(t.name.startswith(prefix) and t.state_type.value == "RUNNING" for t in tasks)


def state_of(run_id) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state_type.value


def test_the_drift_triggered_retrain_waits_for_approval(world):
    from flows.monitor import monitor

    registry = open_registry(world["ctx"].paths, world["ctx"].params)
    status = registry.status()
    assert registry.alias_version("champion") == "1"  # never promoted by itself
    challenger = status["challenger"]
    assert challenger["version"] == "2"
    tags = {v["version"]: v for v in registry.list_versions()}["2"]["tags"]
    assert tags["cause"].startswith("drift: DRIFT")
    assert tags["gate_passed"] in ("true", "false")  # gated against v1
    assert challenger["approval"] == "pending" and "approved_by" not in tags
    # drift persists (v1 still serves): the cooldown keeps the next monitor from retraining
    outcome = monitor()
    assert outcome["drift"]["drifted"] is True and outcome["retrain_run"] is None
    assert "triggered by drift" in outcome["decision"] and "cooldown" in outcome["decision"]
    assert len(retrain_runs()) == 1


def test_refresh_reingests_only_when_the_source_changed(world):
    """'Recent data': the DVC-tracked catalogue, re-ingested only when its source changed."""
    from components.data.sources import SOURCES_FILE

    ctx = world["ctx"]
    same = ingest.refresh(ctx)
    assert not same["reingested"] and "unchanged" in same["reason"]
    csv = Path(world["params"]["data"]["source"])
    lines = csv.read_text().splitlines()
    fields = lines[1].split(",")
    fields[3] = "Relabelled tee"  # the shop edits a product's title
    lines[1] = ",".join(fields)
    csv.write_text("\n".join(lines) + "\n")
    changed = ingest.refresh(ctx)
    assert changed["reingested"] and "changed" in changed["reason"]
    assert changed["data_version"] != same["data_version"]  # a new DVC version of data/
    titles = set(read_manifest(ctx.catalogue_dir)["title"])
    assert "Relabelled tee" in titles
    assert not ingest.refresh(ctx)["reingested"]
    (ctx.paths.home / SOURCES_FILE).unlink()  # ingested before sources were recorded
    adopted = ingest.refresh(ctx)
    assert not adopted["reingested"] and (ctx.paths.home / SOURCES_FILE).exists()


def test_sigterm_to_vitrine_worker_stops_it_and_crashes_its_running_flow_run(world):
    """What systemd or a container runtime sends: the worker takes no new run, the running one
    gets --grace seconds, then it is stopped and marked Crashed; nothing is left running and
    the registry is as it was."""
    from vitrine.children import alive, descendants

    registry = open_registry(world["ctx"].paths, world["ctx"].params)
    before = registry.list_versions()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/vitrine")
        run = client.create_flow_run_from_deployment(  # force: a real retrain, not a no-op
            deployment.id, parameters={"refresh_data": True, "force": True}, tags=["test:stop"]
        )
    log = world["root"] / "worker.log"
    proc = subprocess.Popen(
        [str(PROJECT_ROOT / ".venv/bin/vitrine"), "worker", "--grace", "3"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PREFECT_API_URL": world["api"]},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the signal reaches vitrine only, as systemd's would
    )
    try:
        deadline = time.time() + 240
        # in training: past the stages' first imports. A SIGTERM that lands inside an import
        # (in a class body's __set_name__) reaches the flow as a RuntimeError, and Prefect then
        # records the run Failed instead of Crashed (seen once, in torch._dynamo's import)
        while not task_running(run.id, "train-"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"the run never trained: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        tree = descendants(proc.pid)  # the flow run's process (the worker is vitrine's own)
        assert tree, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 15
    while alive(tree) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(tree), "processes left running"
    deadline = time.time() + 60
    while state_of(run.id) in ("RUNNING", "PENDING") and time.time() < deadline:
        time.sleep(0.5)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.type.value == "CRASHED", f"{state.type.value}: {state.message}"
    assert registry.list_versions() == before
