"""Owners, authenticated: `vitrine ui` runs MLflow with its authentication app over a temporary
state folder, and only an owner's account can make a version promotable.

Real processes and accounts, no mocks: `vitrine ui` (MLflow basic-auth + Prefect), `vitrine
users add`, MLflow's client as each account over HTTP, `vitrine promote` against the same
store, and the MLflow UI itself in Debian's headless Chromium. Mechanism under test: every
account may read (default_permission READ); an owner's account holds EDIT on the registered
model, which setting a version tag needs, so a non-owner's `approved_by` gets a 403.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.config import PROJECT_ROOT, load_params, state_paths
from components.release.registry import Registry, open_registry
from tests.conftest import headless_chromium, shrunk_params, write_params
from tests.serving.conftest import free_port

pytestmark = pytest.mark.integration
VITRINE = str(PROJECT_ROOT / ".venv/bin/vitrine")
MODEL = "vitrine-product"
OWNER, OWNER_PASSWORD = "alice", "alice-password-1"
OTHER, OTHER_PASSWORD = "bob", "bob-password-12"
PASS = {"passed": True, "reasons": ["accuracy 0.93 >= floor 0.85"]}


@dataclass
class World:
    root: Path
    env: dict[str, str]  # VITRINE_HOME, VITRINE_PARAMS
    registry: Registry
    url: str
    proc: subprocess.Popen
    log: Path


def vitrine(world: World, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VITRINE, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **world.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def register(registry: Registry, seed: int) -> str:
    """A small real model version (a linear layer), gate-passed, waiting for approval."""
    torch.manual_seed(seed)
    with registry.start_run(f"train-{seed}"):
        version = registry.log_and_register_model(
            torch.nn.Linear(4, 2), np.zeros((2, 4), np.float32), {}, {"data_version": "d1"}
        )
    registry.record_verdict(version, PASS)
    return version


def start_ui(
    env: dict[str, str], log: Path, mlflow_port: int, *extra: str, prefect_port: int = 0
) -> subprocess.Popen:
    """`vitrine ui` until MLflow answers (Prefect, on prefect_port or a free one, may still be
    starting)."""
    prefect_port = prefect_port or free_port()
    args = ["ui", "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port)]
    args += ["--evidently-port", str(free_port()), *extra]
    proc = subprocess.Popen(
        [VITRINE, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:  # /health needs no login; the API behind it does
            if httpx.get(f"http://127.0.0.1:{mlflow_port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"vitrine ui not ready: {log.read_text()[-3000:]}")


def stop_ui(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)  # vitrine stops its servers
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("owners")
    params = shrunk_params(root / "catalogue", promotion={"owners": [OWNER, "carol"]})
    params_path = write_params(root / "params.yaml", params)
    paths = state_paths(root / "state")
    registry = open_registry(paths, load_params(params_path))
    champion = register(registry, 1)
    registry.promote(champion, bootstrap_without_approval=True, floors_passed=True)  # no login
    for seed in (2, 3, 4):
        register(registry, seed)
    env = {"VITRINE_HOME": str(paths.home), "VITRINE_PARAMS": str(params_path)}
    port = free_port()
    log = root / "ui.log"
    proc = start_ui(env, log, port)
    world = World(root, env, registry, f"http://127.0.0.1:{port}", proc, log)
    yield world
    stop_ui(world.proc)


def as_account(world: World, name: str, password: str) -> MlflowClient:
    """MLflow's client logged in as `name` (HTTP Basic from the environment, read per call)."""
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = name, password
    return MlflowClient(world.url, registry_uri=world.url)


@pytest.fixture(autouse=True)
def _no_login_leaks():
    yield
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(key, None)


def champion_of(world: World) -> str | None:
    return world.registry.alias_version("champion")


def admin_file(world: World) -> Path:
    return Path(world.env["VITRINE_HOME"]) / "auth" / "admin.json"


def test_the_first_start_creates_the_admin_credentials_0600_and_says_where(world):
    path = admin_file(world)
    assert f"credentials in {path} (mode 0600)" in world.log.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    admin = json.loads(path.read_text())
    assert admin["username"] == "admin" and len(admin["password"]) >= 24


def test_anonymous_calls_and_wrong_passwords_get_401(world):
    api = f"{world.url}/api/2.0/mlflow/registered-models/get"
    assert httpx.get(api, params={"name": MODEL}, timeout=60).status_code == 401
    assert httpx.get(f"{world.url}/", timeout=60).status_code == 401  # the UI too
    wrong = httpx.get(api, params={"name": MODEL}, auth=("admin", "wrong-password"), timeout=60)
    assert wrong.status_code == 401
    admin = json.loads(admin_file(world).read_text())
    assert httpx.get(
        api, params={"name": MODEL}, auth=(admin["username"], admin["password"]), timeout=60
    ).is_success


def test_users_add_creates_an_owner_and_a_non_owner(world):
    owner = vitrine(world, "users", "add", OWNER, "--owner", "--password", OWNER_PASSWORD)
    assert owner.returncode == 0, owner.stderr
    assert f"'{OWNER}' is an owner" in owner.stdout
    other = vitrine(world, "users", "add", OTHER, "--password", OTHER_PASSWORD)
    assert other.returncode == 0, other.stderr
    assert "may look, not approve" in other.stdout
    # an owner's account only for a name params.yaml lists, and never the loop's
    refused = vitrine(world, "users", "add", OTHER, "--owner")
    assert (
        refused.returncode == 2 and "not listed in params.yaml promotion.owners" in refused.stderr
    )
    loop = vitrine(world, "users", "add", "vitrine", "--owner")
    assert loop.returncode == 2 and "the loop's own account" in loop.stderr
    # each can read the registry with their own login
    for name, password in ((OWNER, OWNER_PASSWORD), (OTHER, OTHER_PASSWORD)):
        assert as_account(world, name, password).get_registered_model(MODEL).name == MODEL
    nowhere = vitrine(world, "users", "add", "dan", "--url", f"http://127.0.0.1:{free_port()}")
    assert nowhere.returncode == 1 and "no MLflow server answers" in nowhere.stderr


def test_a_non_owner_account_cannot_make_a_version_promotable(world):
    bob = as_account(world, OTHER, OTHER_PASSWORD)
    for key, value in (("approved_by", OTHER), ("approved_by", OWNER)):  # not even in her name
        with pytest.raises(MlflowException) as denied:
            bob.set_model_version_tag(MODEL, "2", key, value)
        assert denied.value.get_http_status_code() == 403
    with pytest.raises(MlflowException) as denied:  # nor move the alias past the gate
        bob.set_registered_model_alias(MODEL, "champion", "2")
    assert denied.value.get_http_status_code() == 403
    assert "approved_by" not in world.registry.version_info("2")["tags"]
    # vitrine's own approve through the server, logged in as bob
    server = {"VITRINE_TRACKING_URI": world.url, "MLFLOW_TRACKING_USERNAME": OTHER}
    server["MLFLOW_TRACKING_PASSWORD"] = OTHER_PASSWORD
    as_owner = vitrine(world, "approve", "2", "--by", OWNER, env=server)
    assert as_owner.returncode == 1 and "logged in to MLflow as 'bob'" in as_owner.stderr
    as_bob = vitrine(world, "approve", "2", env=server)
    assert as_bob.returncode == 1 and "'bob' is not an owner" in as_bob.stderr
    # listed in params.yaml but without an owner's account: MLflow itself refuses the tag
    assert vitrine(world, "users", "add", "carol", "--password", "carol-password").returncode == 0
    server.update(MLFLOW_TRACKING_USERNAME="carol", MLFLOW_TRACKING_PASSWORD="carol-password")
    as_carol = vitrine(world, "approve", "2", env=server)
    assert as_carol.returncode == 1
    assert "refused account 'carol': permission denied" in as_carol.stderr
    promote = vitrine(world, "promote")
    assert promote.returncode == 0 and "nothing to promote" in promote.stdout
    assert champion_of(world) == "1"


def test_an_owner_approves_through_the_api_then_promote_names_her(world):
    alice = as_account(world, OWNER, OWNER_PASSWORD)
    alice.set_model_version_tag(MODEL, "2", "approved_by", OWNER)
    promote = vitrine(world, "promote")
    assert promote.returncode == 0, promote.stderr
    assert f"champion: 1 → 2 (approved by {OWNER})" in promote.stdout
    assert champion_of(world) == "2"
    audit = [json.loads(line) for line in world.registry.audit_log.read_text().splitlines()]
    assert audit[-1]["to"] == "2" and audit[-1]["approved_by"] == OWNER
    tags = world.registry.version_info("2")["tags"]
    assert [json.loads(v)["approved_by"] for k, v in tags.items() if k.startswith("audit_")] == [
        OWNER
    ]


def test_an_approved_by_naming_a_non_owner_is_refused_with_a_reason(world):
    alice = as_account(world, OWNER, OWNER_PASSWORD)
    alice.set_model_version_tag(MODEL, "4", "approved_by", "mallory")  # an owner's typo
    refused = vitrine(world, "promote", "4")
    assert refused.returncode == 1
    assert "approved_by 'mallory' is not an owner (params.yaml promotion.owners: alice, carol)" in (
        refused.stderr
    )
    status = json.loads(vitrine(world, "status", "--json").stdout)
    assert status["champion"]["version"] == "2"


# ---------------------------------------------------------------- the MLflow UI in Chromium


@pytest.fixture
def browser():
    driver = headless_chromium(window="1280,1600", performance_log=True)
    yield driver
    driver.quit()


def log_in(driver, name: str, password: str) -> None:
    """HTTP Basic, as the browser's login prompt would send it, on every request of the page."""
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
    )


def set_tag_statuses(driver) -> list[int]:
    """HTTP statuses of the page's set-tag calls since the last look (Chrome's network log)."""
    statuses = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived":
            response = message["params"]["response"]
            if response["url"].endswith("/model-versions/set-tag"):
                statuses.append(response["status"])
    return statuses


def add_tag_in_the_ui(driver, world: World, version: str, key: str, value: str) -> list[int]:
    """Open the version page, fill the tag form (name, value, Add); the set-tag statuses."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 180)
    driver.get("about:blank")  # a fresh page: nothing typed before survives in the form
    driver.get(f"{world.url}/#/models/{MODEL}/versions/{version}")
    css = {n: f'[data-testid="{n}"]' for n in ("tags-form-input-name", "tags-form-input-value")}
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, css["tags-form-input-name"]))
    for field, text in ((css["tags-form-input-name"], key), (css["tags-form-input-value"], value)):
        box = driver.find_element(By.CSS_SELECTOR, field)
        assert box.get_attribute("value") == ""
        box.send_keys(text)
    driver.get_log("performance")  # only the Add click's calls from here on
    driver.find_element(By.CSS_SELECTOR, '[data-testid="add-tag-button"]').click()
    statuses: list[int] = []
    wait.until(lambda d: statuses.extend(set_tag_statuses(d)) or statuses)
    return statuses


def test_in_the_mlflow_ui_a_non_owner_cannot_approve_and_an_owner_can(world, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    champion = champion_of(world)
    log_in(browser, OTHER, OTHER_PASSWORD)
    assert add_tag_in_the_ui(browser, world, "3", "approved_by", OTHER) == [403]
    assert "approved_by" not in world.registry.version_info("3")["tags"]
    promote = vitrine(world, "promote")
    assert promote.returncode == 0 and "nothing to promote" in promote.stdout
    assert champion_of(world) == champion

    log_in(browser, OWNER, OWNER_PASSWORD)
    assert add_tag_in_the_ui(browser, world, "3", "approved_by", OWNER) == [200]
    tags = '[data-testid="tags-section"]'  # its table scrolls: read the text of every row
    WebDriverWait(browser, 180).until(  # the page shows the new tag
        lambda d: (
            f"approved_by{OWNER}"
            in d.find_element(By.CSS_SELECTOR, tags).get_attribute("textContent")
        )
    )
    assert world.registry.version_info("3")["tags"]["approved_by"] == OWNER
    promote = vitrine(world, "promote")
    assert promote.returncode == 0, promote.stderr
    assert f"champion: {champion} → 3 (approved by {OWNER})" in promote.stdout
    assert champion_of(world) == "3"


def test_a_later_start_reuses_the_admin_credentials_and_the_accounts(world):
    before = admin_file(world).read_text()
    stop_ui(world.proc)
    port = free_port()
    world.log = world.root / "ui-again.log"
    world.proc = start_ui(world.env, world.log, port)
    world.url = f"http://127.0.0.1:{port}"
    assert admin_file(world).read_text() == before
    assert "created the MLflow admin account" not in world.log.read_text()
    assert f"admin credentials: {admin_file(world)}" in world.log.read_text()
    api = f"{world.url}/api/2.0/mlflow/registered-models/get"
    assert httpx.get(
        api, params={"name": MODEL}, auth=(OWNER, OWNER_PASSWORD), timeout=60
    ).is_success
    assert httpx.get(api, params={"name": MODEL}, timeout=60).status_code == 401
