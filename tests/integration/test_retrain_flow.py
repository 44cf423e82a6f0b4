"""The retrain flow end to end under a real (test) Prefect API, with a real MLflow store,
on a small real slice of Fashion-MNIST ingested as a shop catalogue CSV with bad rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from components.config import PROJECT_ROOT, load_params, state_paths
from components.release.registry import open_registry
from components.stages import ingest
from components.stages.context import RunContext, data_version
from tests.conftest import BAD_ROWS, shrunk_params, write_csv_catalogue, write_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory, fmnist, prefect_api):
    """A data repo with an ingested (DVC-tracked) catalogue, a state folder and params."""
    root = tmp_path_factory.mktemp("world")
    repo = root / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    csv = write_csv_catalogue(root / "shop", fmnist, n_train=1500, n_test=400, with_bad_rows=True)
    # the gate in this world: floors only, so that a second version passes (this module tests
    # the approval path, not the gate's rules: tests/unit/test_gate.py). Its tiny models are
    # noisy: 4 epochs scored accuracy 0.65, macro F1 -0.10 and McNemar p < 0.05 against
    # 3 epochs' 0.72, a failure under the default tolerances of 0.005
    gate = {"max_regression": dict.fromkeys(("accuracy", "macro_f1", "recall_at_1"), 0.5)}
    gate["significance_alpha"] = 1e-9
    params = shrunk_params(repo / "data" / "catalogue", data={"source": str(csv)}, gate=gate)
    params_path = write_params(root / "params.yaml", params)
    env = {"VITRINE_HOME": str(root / "state"), "VITRINE_PARAMS": str(params_path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ctx = RunContext(load_params(params_path), state_paths(), work=root / "ingest", repo=repo)
    ingested = ingest.run(ctx)
    yield {"root": root, "repo": repo, "ctx": ctx, "ingested": ingested, "params": params}
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_ingest_tracks_the_catalogue_with_dvc(world):
    repo = world["repo"]
    assert world["ingested"]["ingested"] == 1900 + len(BAD_ROWS)
    assert (repo / "data.dvc").exists()
    assert len(world["ingested"]["data_version"]) == 32
    remote = world["ctx"].paths.dvc_remote
    assert sum(1 for p in remote.rglob("*") if p.is_file()) > 1900  # pushed


def test_a_catalogue_outside_the_repositorys_data_folder_is_not_dvc_added(tmp_path, fmnist):
    """A worker host's own catalogue folder: versioned by its manifest; DVC must not add the
    repository's data/ (which does not hold it) nor touch the repository's DVC config."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    csv = write_csv_catalogue(tmp_path / "shop", fmnist, n_train=30, n_test=10)
    params = shrunk_params(tmp_path / "host" / "catalogue", data={"source": str(csv)})
    params_path = write_params(tmp_path / "params.yaml", params)
    paths = state_paths(tmp_path / "state")
    ctx = RunContext(load_params(params_path), paths, work=tmp_path / "ingest", repo=repo)
    ingested = ingest.run(ctx)
    assert ingested["ingested"] == 40
    assert ingested["data_version"] == data_version(ctx)
    assert ingested["data_version"].startswith("manifest-")
    assert not (repo / "data.dvc").exists() and not (repo / ".dvc").exists()


def test_retrain_approve_promote_rollback(world):
    from flows.retrain import retrain

    first = retrain()
    assert first["ingested"] == first["accepted"] + first["quarantined"]
    for reason in set(BAD_ROWS.values()):
        assert first["quarantined_by_reason"].get(reason, 0) >= 1, reason
    assert first["gate"]["passed"], first["gate"]["reasons"]
    assert first["promoted"] and first["version"] == "1"
    registry = open_registry(world["ctx"].paths, world["ctx"].params)
    assert registry.alias_version("champion") == "1"

    second = retrain(epochs=4)  # other params than the first run (3 epochs): a new version
    assert second["version"] == "2" and not second["promoted"]
    # trained from scratch (its params differ, so the first run's checkpoint does not match):
    # other weights than version 1's, not the same model compared with itself
    assert second["resumed_from_epoch"] is None
    first_weights = registry.load_model("1").state_dict()
    second_weights = registry.load_model("2").state_dict()
    assert first_weights.keys() == second_weights.keys()
    assert (
        max(
            float((first_weights[k].float() - second_weights[k].float()).abs().max())
            for k in first_weights
        )
        > 1e-3
    )
    assert second["gate"]["passed"], second["gate"]["reasons"]  # floors only (world above)
    status = registry.status()
    assert status["champion"]["version"] == "1"
    assert status["challenger"]["version"] == "2"
    assert status["challenger"]["approval"] == "pending"
    assert registry.promote() is None  # no approval yet: nothing moves
    assert registry.alias_version("champion") == "1"
    registry.approve("2", by="owner")
    record = registry.promote()
    assert record["to"] == "2" and record["approved_by"] == "owner"
    assert registry.alias_version("champion") == "2"
    assert registry.alias_version("previous_champion") == "1"
    back = registry.rollback()
    assert back["to"] == "1" and registry.alias_version("champion") == "1"
    audit = [json.loads(line) for line in world["ctx"].paths.audit_log.read_text().splitlines()]
    assert audit[0]["action"] == "promote" and audit[0]["to"] == "1"


def test_a_rerun_on_unchanged_data_and_params_registers_nothing(world, tmp_path):
    """`vitrine run` with version 2's data and params (epochs 4, above) is a no-op."""
    registry = open_registry(world["ctx"].paths, world["ctx"].params)
    versions_before = registry.list_versions()
    runs_before = sorted(world["ctx"].paths.runs.iterdir())
    out = tmp_path / "rerun.json"
    done = subprocess.run(
        [sys.executable, "-m", "vitrine.cli", "run", "--epochs", "4", "--json", str(out)],
        cwd=PROJECT_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unchanged since version 2" in done.stdout and "vitrine run --force" in done.stdout
    summary = json.loads(out.read_text())
    assert summary["unchanged_since"] == "2"
    tags = versions_before[0]["tags"]
    assert summary["metrics"]["accuracy"] == float(tags["accuracy"])
    assert summary["gate"]["passed"] == (tags["gate_passed"] == "true")
    assert registry.list_versions() == versions_before  # nothing registered or re-tagged
    assert sorted(world["ctx"].paths.runs.iterdir()) == runs_before  # no stage ran


def test_label_issues_and_reports_are_written(world):
    runs = sorted(world["ctx"].paths.runs.iterdir())
    work = runs[-1]
    issues = pd.read_parquet(work / "labels" / "label_issues.parquet")
    assert {"product_id", "given_label", "suggested_label", "label_quality"} <= set(issues.columns)
    quarantine = pd.read_parquet(work / "validate" / "quarantine.parquet")
    by_id = dict(zip(quarantine["product_id"], quarantine["reason"], strict=False))
    for product_id, reason in BAD_ROWS.items():
        if product_id != "p-train-00000":
            assert by_id[product_id] == reason
    assert (work / "evaluate" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (work / "evaluate" / "index" / "embeddings.npy").exists()


def test_unreachable_tracking_store_leaves_aliases_unchanged(world, monkeypatch):
    from flows.retrain import retrain

    registry = open_registry(world["ctx"].paths, world["ctx"].params)
    champion_before = registry.alias_version("champion")
    monkeypatch.setenv("VITRINE_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(Exception, match="127.0.0.1:9"):
        retrain(epochs=1)
    monkeypatch.delenv("VITRINE_TRACKING_URI")
    assert (
        open_registry(world["ctx"].paths, world["ctx"].params).alias_version("champion")
        == champion_before
    )


def test_too_many_quarantined_stops_before_training(world, tmp_path, monkeypatch):
    from flows.retrain import retrain

    params = dict(world["params"])
    params["validation"] = {**params["validation"], "max_quarantine_share": 0.001}
    monkeypatch.setenv("VITRINE_PARAMS", str(write_params(tmp_path / "p.yaml", params)))
    versions_before = len(open_registry(world["ctx"].paths, world["ctx"].params).list_versions())
    with pytest.raises(Exception, match="quarantine"):
        retrain()
    assert (
        len(open_registry(world["ctx"].paths, world["ctx"].params).list_versions())
        == versions_before
    )


def test_cli_refuses_csv_without_required_columns(world, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sku,picture\n1,a.png\n")
    manifest = world["ctx"].catalogue_dir / "manifest.parquet"
    before = manifest.read_bytes()
    env = {**os.environ, "VITRINE_HOME": str(tmp_path / "state")}
    done = subprocess.run(
        [sys.executable, "-m", "vitrine.cli", "ingest", "--source", str(bad)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "product_id" in done.stderr and "label" in done.stderr and "image" in done.stderr
    assert not (tmp_path / "state" / "mlflow.db").exists()
    assert manifest.read_bytes() == before  # the current catalogue is kept, not wiped


def test_killed_training_leaves_registry_and_resumes(world):
    """Kill `vitrine run` during training: nothing registered; the re-run resumes."""
    from flows.retrain import retrain

    state = world["ctx"].paths
    versions_before = len(open_registry(world["ctx"].paths, world["ctx"].params).list_versions())
    checkpoints = state.home / "checkpoints"
    for old in checkpoints.glob("*"):
        old.unlink()
    log = world["root"] / "killed-run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vitrine.cli", "run", "--epochs", "6"],
            cwd=PROJECT_ROOT,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + 300
    while not (checkpoints / "last.pt").exists() and time.time() < deadline:
        tail = log.read_text()[-3000:]
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{tail}"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (
        len(open_registry(world["ctx"].paths, world["ctx"].params).list_versions())
        == versions_before
    )
    summary = retrain(epochs=6)
    assert summary["resumed_from_epoch"] is not None
    assert int(summary["version"]) == versions_before + 1


def test_cli_status_json_names_champion_and_challenger(world):
    done = subprocess.run(
        [sys.executable, "-m", "vitrine.cli", "status", "--json"],
        cwd=PROJECT_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert set(status) >= {"champion", "challenger", "previous_champion", "data_version"}
    assert status["champion"]["version"] == open_registry(
        world["ctx"].paths, world["ctx"].params
    ).alias_version("champion")
    assert {"accuracy", "macro_f1", "recall_at_1"} <= set(status["champion"]["metrics"])
    assert status["data_version"].startswith("manifest-")
    challenger = status["challenger"]  # the killed-and-resumed run's version, registered last
    registry = open_registry(world["ctx"].paths, world["ctx"].params)
    assert challenger["version"] == registry.alias_version("challenger")
    assert challenger["version"] == registry.list_versions()[0]["version"]  # newest first
    assert set(challenger) >= {"version", "metrics", "gate", "approval"}
    assert challenger["approval"] in ("pending", "approved", None)
