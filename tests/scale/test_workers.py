"""Retraining on several hosts: two `vitrine worker`s poll one work pool, each in a working
folder of its own (state, catalogue, params), as two machines would. They share only two URLs:
the tracking server and the Prefect server, both started by `vitrine ui` on a third folder
(the control host).

- The retrain deployment's concurrency limit holds across hosts: of two runs created at once,
  the second waits for a slot while the other host's worker sits idle.
- Either host's worker may take a run; both register through the shared server.
- Each run works in the folder of the host that took it: its own catalogue copy, its own run
  folder; the registry is the shared one.
- A stopped worker claims no run after the signal: a retrain waiting for the slot is left for
  a worker that polls (vitrine/worker.py).
- A host that dies (its worker and flow run killed, nothing reported) has its run marked
  Crashed by `vitrine deploy`'s dead-host automation (flows/dead_hosts.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from components.config import PROJECT_ROOT
from components.data.catalogue import MANIFEST
from tests.conftest import shrunk_params, write_csv_catalogue, write_params
from tests.integration.test_owners import start_ui, stop_ui
from tests.serving.conftest import free_port, wait_for
from vitrine.children import descendants

pytestmark = pytest.mark.scale

VITRINE = str(PROJECT_ROOT / ".venv" / "bin" / "vitrine")
POOL = "vitrine-hosts"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
FLOWS = ("retrain", "monitor", "promote", "refresh")
# the dead-host window (schedules.dead_host_seconds): its least, so runs beat every 30 s
DEAD_HOST_SECONDS = 60
GRACE = 300  # `vitrine worker --grace`: a run of these tests ends within it
SLOT_WAIT = "AwaitingConcurrencySlot"  # a Scheduled run the deployment's limit holds back


@dataclass
class Control:
    """The control host: the URLs and the account every other host needs."""

    env: dict[str, str]
    model_name: str = ""

    def registry(self) -> MlflowClient:
        # the registry URI too: MLflow's process-wide default may be another test's server
        url = self.env["VITRINE_TRACKING_URI"]
        return MlflowClient(tracking_uri=url, registry_uri=url)

    def versions(self) -> list[str]:
        found = self.registry().search_model_versions(f"name = '{self.model_name}'")
        return sorted(v.version for v in found)


@dataclass
class Host:
    name: str
    folder: Path
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None

    def run_folders(self) -> list[Path]:
        runs = self.folder / "state" / "runs"
        return sorted(runs.iterdir()) if runs.exists() else []

    def took(self, run) -> bool:
        """Whether this host's worker started the run. Both workers try every run; the server
        lets one through, whose worker logs that it submitted the run to its infrastructure."""
        text = self.log.read_text() if self.log.exists() else ""
        return f"Flow run '{run.name}' submitted to infrastructure" in text


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    home = tmp_path_factory.mktemp("control-host")
    mlflow_port, prefect_port = free_port(), free_port()
    log = home / "ui.log"
    env = {
        "VITRINE_HOME": str(home / "state"),
        # a run waiting for the retrain slot is proposed again after this many seconds (30)
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    }
    proc = start_ui(env, log, mlflow_port, prefect_port=prefect_port)
    try:
        api = f"http://127.0.0.1:{prefect_port}/api"

        def prefect_up() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(prefect_up, 120, f"the Prefect server of vitrine ui: {log}")
        admin = json.loads((home / "state" / "auth" / "admin.json").read_text())
        env = {
            "VITRINE_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "MLFLOW_TRACKING_USERNAME": admin["username"],
            "MLFLOW_TRACKING_PASSWORD": admin["password"],
            "PREFECT_API_URL": api,
        }
        with pytest.MonkeyPatch.context() as patch, temporary_settings({PREFECT_API_URL: api}):
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                patch.setenv(key, env[key])  # this process reads the registry as the admin
            yield Control(env)
    finally:
        stop_ui(proc)


@pytest.fixture(scope="module")
def hosts(control, tmp_path_factory, fmnist):
    """Two worker hosts: the same shop catalogue source, each its own folder and params."""
    root = tmp_path_factory.mktemp("worker-hosts")
    csv = write_csv_catalogue(root / "shop", fmnist, n_train=600, n_test=200)
    made = []
    for name in ("host-a", "host-b"):
        folder = root / name
        folder.mkdir()
        params = shrunk_params(
            folder / "catalogue",
            data={"source": str(csv)},
            text_search={"enabled": False},
            registry={"variants": []},
            gate={"max_latency_ms": 1e4},  # a shared 2-core box: latency is not under test
            # the runs are created below as a schedule or the monitor creates them
            schedules={
                "work_pool": POOL,
                "dead_host_seconds": DEAD_HOST_SECONDS,
                **{flow: {"cron": "0 4 * * *", "active": False} for flow in FLOWS},
            },
        )
        params["evaluation"]["shopper"]["shifts"] = ["jpeg"]  # the shopper set is tested elsewhere
        params_path = write_params(folder / "params.yaml", params)
        env = {
            **control.env,
            "VITRINE_HOME": str(folder / "state"),
            "VITRINE_PARAMS": str(params_path),
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # how often a worker polls the pool (10)
        }
        made.append(Host(name, folder, env, folder / "worker.log"))
    control.model_name = params["registry"]["model_name"]
    cli(made[0], "deploy")  # from any host: the deployments live on the Prefect server
    try:
        for host in made:
            start_worker(host)
        wait_for(lambda: online_workers() >= {h.name for h in made}, 90, "both workers online")
        yield made
    finally:
        for host in made:
            stop_worker(host)


def cli(host: Host, *args: str) -> str:
    done = subprocess.run(
        [VITRINE, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **host.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def start_worker(host: Host) -> None:
    """`vitrine worker` on the host; its log goes on (a restarted worker appends)."""
    host.proc = subprocess.Popen(
        [VITRINE, "worker", "--name", host.name, "--grace", str(GRACE)],
        cwd=PROJECT_ROOT,
        env={**os.environ, **host.env},
        stdout=host.log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def polling(host: Host) -> bool:
    return host.proc is not None and host.proc.poll() is None


def online_workers() -> set[str]:
    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(POOL)
    return {w.name for w in workers if w.status and w.status.value == "ONLINE"}


def stop_worker(host: Host) -> None:
    if host.proc is not None and host.proc.poll() is None:
        host.proc.send_signal(signal.SIGTERM)
        try:
            host.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(host.proc.pid, signal.SIGKILL)
            host.proc.wait()


def create_run(name: str, parameters: dict | None = None):
    """A run of the deployment `name` (e.g. retrain/vitrine), as a schedule creates one."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        return client.create_flow_run_from_deployment(deployment.id, parameters=parameters)


def create_retrain(cause: str, force: bool = True):
    """A retrain run, as the nightly schedule or the monitor creates one; `force`: a real
    retrain, else a no-op where the host registered a version from the same data and params."""
    return create_run("retrain/vitrine", {"refresh_data": True, "force": force, "cause": cause})


def wait_until_ended(runs: list, seconds: float) -> list[tuple[str, str]]:
    deadline = time.time() + seconds
    while True:
        now = states(*runs)
        if all(kind in TERMINAL for kind, _ in now):
            return now
        assert time.time() < deadline, f"runs not finished: {now}"
        time.sleep(0.5)


def states(*runs) -> list[tuple[str, str]]:
    """(state type, state name) of each run, e.g. ("SCHEDULED", "AwaitingConcurrencySlot")."""
    with get_client(sync_client=True) as client:
        read = [client.read_flow_run(run.id) for run in runs]
    return [(r.state_type.value, r.state_name) for r in read]


def taker(hosts: list[Host], run) -> Host:
    took = [h for h in hosts if h.took(run)]
    assert len(took) == 1, [h.log.read_text()[-2000:] for h in hosts]
    return took[0]


def test_two_worker_hosts_share_the_pool_one_retrain_at_a_time(control, hosts):
    first, second = create_retrain("schedule: nightly"), create_retrain("drift: DRIFT (test)")
    runs = {first.id: first, second.id: second}
    order: list = []  # the runs in the order they started
    waited = False  # the later run seen waiting for the slot while a worker was idle
    deadline = time.time() + 400
    while True:
        now = dict(zip(runs, states(first, second), strict=True))
        running = [rid for rid, (kind, _) in now.items() if kind == "RUNNING"]
        assert len(running) <= 1, f"two retrains at once: {now}"
        order += [rid for rid in running if rid not in order]
        if len(order) == 1 and running:
            idle = next(rid for rid in runs if rid != order[0])
            waited |= now[idle] == ("SCHEDULED", "AwaitingConcurrencySlot")
        if all(kind in TERMINAL for kind, _ in now.values()):
            break
        assert time.time() < deadline, f"runs not finished: {now}"
        time.sleep(0.3)
    assert waited, "the second retrain never waited for the slot"
    assert states(first, second) == [("COMPLETED", "Completed")] * 2
    # version 1 is the run that started first (bootstrapped as champion), version 2 the
    # other, gated against it; each registered through the shared server
    registry = control.registry()
    assert control.versions() == ["1", "2"]
    for version, rid in zip(("1", "2"), order, strict=True):
        tags = registry.get_model_version(control.model_name, version).tags
        assert tags["cause"] == runs[rid].parameters["cause"]
    assert registry.get_model_version_by_alias(control.model_name, "champion").version == "1"
    # each run worked in the folder of the host whose worker took it: its catalogue copy
    # (ingested from the shop's CSV at its first run) and its run folder
    took = [taker(hosts, runs[rid]) for rid in order]
    for host in hosts:
        ran = took.count(host)
        assert len(host.run_folders()) == ran, host.name
        assert (host.folder / "catalogue" / MANIFEST).exists() == (ran > 0), host.name


def test_a_stopped_worker_claims_no_run_after_the_signal(control, hosts):
    """SIGTERM to a worker holding a retrain while a second one waits for the slot: from the
    signal on the worker claims nothing, neither the waiting retrain when its own run ends nor
    a run due after the signal; its own run finishes within the grace. A worker started again
    runs the other two to completion. (Fails on the old `vitrine worker`, a `prefect worker
    start` child: signalled while its run was still Pending, the child exited at once without
    starting it, and left it Pending.)"""
    # a host that registered a version above: its retrains on the same data are quick no-ops
    host = next((h for h in hosts if h.run_folders()), hosts[0])
    for other in hosts:
        if other is not host:
            stop_worker(other)
    if not polling(host):
        start_worker(host)
    runs = [create_retrain("schedule: nightly", force=False), create_retrain("drift", False)]
    deadline = time.time() + 240
    while True:  # the worker took one; the server made the other wait for the slot
        now = list(zip(runs, states(*runs), strict=True))
        taken = [run for run, (kind, _) in now if kind in ("PENDING", "RUNNING")]
        waits = [run for run, state in now if state == ("SCHEDULED", SLOT_WAIT)]
        if taken and waits:
            break
        assert time.time() < deadline, f"{now}: {host.log.read_text()[-3000:]}"
        time.sleep(0.2)
    (own,), (waiting,) = taken, waits
    signalled_at = len(host.log.read_text())  # the worker tried `waiting` before: it waits
    host.proc.send_signal(signal.SIGTERM)
    due = create_run("promote/vitrine")  # due now: any polling worker would take it at once
    assert host.proc.wait(timeout=GRACE + 60) == 0, host.log.read_text()[-3000:]
    assert states(own) == [("COMPLETED", "Completed")]  # finished within the grace
    # not claimed by the stopped worker (no Pending run left behind), still there to be taken
    assert [kind for kind, _ in states(waiting, due)] == ["SCHEDULED", "SCHEDULED"]
    since = host.log.read_text()[signalled_at:]
    for run in (waiting, due):  # Prefect logs this before it proposes Pending (the claim)
        assert f"submitting flow run '{run.id}'" not in since, since[-3000:]
    start_worker(host)
    assert wait_until_ended([waiting, due], 300) == [("COMPLETED", "Completed")] * 2
    assert host.took(waiting) and host.took(due)


def test_a_dead_hosts_run_is_marked_crashed(control, hosts):
    """Power loss on a worker host: its worker and its flow run's processes are killed
    (SIGKILL: nothing reports the run's end). The run's heartbeats stop; `vitrine deploy`'s
    automation marks it Crashed after schedules.dead_host_seconds, which frees the retrain
    slot; the run registered nothing."""
    host = next((h for h in hosts if polling(h)), hosts[0])
    for other in hosts:
        if other is not host:
            stop_worker(other)
    if not polling(host):
        start_worker(host)
    before = control.versions()
    run = create_retrain("drift: a host about to die")  # forced: long enough to be killed
    deadline = time.time() + 240
    while states(run)[0][0] != "RUNNING":
        assert time.time() < deadline, host.log.read_text()[-3000:]
        time.sleep(0.2)
    runs_processes = descendants(host.proc.pid)  # the flow run (a session of its own)
    assert runs_processes, host.log.read_text()[-3000:]
    host.proc.kill()  # the worker first: alive, it would record its run's end
    host.proc.wait()
    for pid in runs_processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + DEAD_HOST_SECONDS + 90
    while states(run)[0][0] == "RUNNING":
        assert time.time() < deadline, "the dead host's run is still Running"
        time.sleep(1)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.type.value == "CRASHED", f"{state.type.value}: {state.message}"
    assert f"no heartbeat for {DEAD_HOST_SECONDS} s" in state.message
    assert control.versions() == before
