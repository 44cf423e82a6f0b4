"""The registry against a real MLflow sqlite store (no mocks).

Creating an MLflow database runs its migrations (~10 s), so one template store with two
registered versions is built per module and each test works on its own copy of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from components.config import PROJECT_ROOT
from components.release.registry import (
    ArtifactCorrupt,
    PromotionBusy,
    PromotionRefused,
    Registry,
    RegistryUnavailable,
    file_digests,
)

MODEL = "vitrine-product"
OWNERS = ("alice", "bob", "owner")
PASS = {"passed": True, "reasons": ["accuracy 0.93 >= floor 0.85"]}
FAIL = {"passed": False, "reasons": ["FAIL: accuracy 0.5 < floor 0.85"]}


def make_registry(home: Path, artifacts: Path | None = None) -> Registry:
    return Registry(
        f"sqlite:///{home / 'mlflow.db'}",
        artifacts or home / "artifacts",
        MODEL,
        home / "audit.jsonl",
        owners=OWNERS,
    )


def register_version(registry: Registry, tmp: Path, accuracy: float, data_version: str) -> str:
    torch.manual_seed(int(accuracy * 100))
    index = tmp / f"index-{accuracy}"
    index.mkdir()
    np.save(index / "embeddings.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    with registry.start_run("train", tags={"stage": "train"}):
        registry.log_params({"lr": 0.003, "backbone": "linear"})
        registry.log_metrics({"accuracy": accuracy, "recall_at_1": accuracy - 0.05})
        registry.log_dict({"classes": ["a", "b"]}, "labels.json")
        return registry.log_and_register_model(
            torch.nn.Linear(4, 2),
            np.zeros((2, 4), np.float32),
            {"index": index},
            {"data_version": data_version},
        )


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("template")
    registry = make_registry(home)
    assert register_version(registry, home, 0.90, "data-v1") == "1"
    assert register_version(registry, home, 0.92, "data-v2") == "2"
    return home


@pytest.fixture
def registry(template: Path, tmp_path: Path) -> Registry:
    shutil.copy(template / "mlflow.db", tmp_path / "mlflow.db")
    return make_registry(tmp_path, template / "artifacts")


def audit_lines(registry: Registry) -> list[dict]:
    return [json.loads(line) for line in registry.audit_log.read_text().splitlines()]


def test_register_sets_challenger_tags_and_run(registry: Registry):
    assert registry.alias_version("challenger") == "2"
    assert registry.alias_version("champion") is None
    info = registry.version_info("1")
    assert info["tags"]["data_version"] == "data-v1"
    assert info["metrics"]["accuracy"] == pytest.approx(0.90)
    assert info["run_id"] and info["aliases"] == []
    run = MlflowClient(registry.tracking_uri).get_run(info["run_id"])
    assert run.data.params["backbone"] == "linear" and run.data.tags["stage"] == "train"


def test_artifacts_live_under_artifact_root(registry: Registry, template: Path, tmp_path: Path):
    index = registry.download_artifacts("1", "index", tmp_path / "dl")
    assert np.load(index / "embeddings.npy").shape == (2, 3)
    labels = registry.download_artifacts("1", "labels.json", tmp_path / "dl2")
    assert json.loads(labels.read_text()) == {"classes": ["a", "b"]}
    assert any((template / "artifacts").rglob("embeddings.npy"))
    assert not Path("mlruns").exists()


def test_load_model_returns_working_module(registry: Registry):
    model = registry.load_model("2")
    assert isinstance(model, torch.nn.Linear)
    assert model(torch.ones(3, 4)).shape == (3, 2)


def test_record_verdict_tags(registry: Registry):
    registry.record_verdict("1", FAIL)
    registry.record_verdict("2", PASS)
    fail, ok = registry.version_info("1")["tags"], registry.version_info("2")["tags"]
    assert fail["gate_passed"] == "false" and "approval" not in fail
    assert json.loads(fail["gate_reasons"]) == FAIL["reasons"]
    assert ok["gate_passed"] == "true" and ok["approval"] == "pending"


def test_promote_refused_without_approval_and_for_failed_gate(registry: Registry):
    registry.record_verdict("1", PASS)
    registry.record_verdict("2", FAIL)
    with pytest.raises(PromotionRefused, match="not approved"):
        registry.promote("1")
    with pytest.raises(PromotionRefused, match="failed the gate"):
        registry.promote("2", bootstrap_without_approval=True, floors_passed=True)
    with pytest.raises(PromotionRefused, match="failed the gate"):
        registry.approve("2", by="alice")
    assert registry.promote() is None
    assert registry.alias_version("champion") is None


def test_bootstrap_promotes_without_approval_only_when_no_champion(registry: Registry):
    registry.record_verdict("1", PASS)
    record = registry.promote("1", bootstrap_without_approval=True, floors_passed=True)
    assert record["to"] == "1" and record["from"] is None and record["approved_by"] is None
    assert registry.alias_version("champion") == "1"
    registry.record_verdict("2", PASS)
    with pytest.raises(PromotionRefused, match="not approved"):
        registry.promote("2", bootstrap_without_approval=True, floors_passed=True)


def test_approve_then_promote_moves_champion_and_audits(registry: Registry):
    registry.record_verdict("1", PASS)
    registry.promote("1", bootstrap_without_approval=True, floors_passed=True)
    registry.record_verdict("2", PASS)
    registry.approve("2", by="alice")
    record = registry.promote()  # picks the newest approved version
    assert record["action"] == "promote" and (record["from"], record["to"]) == ("1", "2")
    assert record["approved_by"] == "alice" and record["verdict"] == PASS
    assert registry.alias_version("champion") == "2"
    assert registry.alias_version("previous_champion") == "1"
    assert registry.alias_version("challenger") is None  # it pointed to the promoted version
    assert registry.version_info("1")["tags"]["previous_champion"] == "true"
    tags = registry.version_info("2")["tags"]
    assert tags["approval"] == "approved" and tags["approved_at"]
    audit_tags = [json.loads(v) for k, v in tags.items() if k.startswith("audit_")]
    assert audit_tags == [record]
    assert [line["to"] for line in audit_lines(registry)] == ["1", "2"]
    assert audit_lines(registry)[-1] == record
    assert registry.promote() is None  # nothing newer is eligible


def test_ui_approval_is_honoured(registry: Registry):
    registry.record_verdict("1", PASS)
    registry.promote("1", bootstrap_without_approval=True, floors_passed=True)
    registry.record_verdict("2", PASS)
    ui = MlflowClient(registry.tracking_uri, registry_uri=registry.tracking_uri)
    ui.set_model_version_tag(MODEL, "2", "approved_by", "bob")
    assert registry.status()["challenger"]["approval"] == "approved"
    record = registry.promote()
    assert record["to"] == "2" and record["approved_by"] == "bob"


def test_only_an_owners_approval_counts(registry: Registry):
    registry.record_verdict("1", PASS)
    registry.promote("1", bootstrap_without_approval=True, floors_passed=True)
    registry.record_verdict("2", PASS)
    for name, reason in (("mallory", "'mallory' is not an owner"), ("vitrine", "loop's own")):
        with pytest.raises(PromotionRefused, match=reason):
            registry.approve("2", by=name)
    assert "approved_by" not in registry.version_info("2")["tags"]
    ui = MlflowClient(registry.tracking_uri, registry_uri=registry.tracking_uri)
    ui.set_model_version_tag(MODEL, "2", "approved_by", "mallory")  # typed into the UI
    assert registry.status()["challenger"]["approval"].startswith(
        "refused: approved_by 'mallory' is not an owner (params.yaml promotion.owners: alice"
    )
    assert registry.promote() is None  # nothing an owner approved
    with pytest.raises(PromotionRefused, match="not approved by an owner: approved_by 'mallory'"):
        registry.promote("2")
    assert registry.alias_version("champion") == "1"


def test_a_bootstrap_records_no_approver_even_with_a_non_owner_tag(registry: Registry):
    registry.record_verdict("1", PASS)
    MlflowClient(registry.tracking_uri, registry_uri=registry.tracking_uri).set_model_version_tag(
        MODEL, "1", "approved_by", "mallory"
    )
    record = registry.promote("1", bootstrap_without_approval=True, floors_passed=True)
    assert record["to"] == "1" and record["approved_by"] is None


def test_rollback(registry: Registry):
    with pytest.raises(PromotionRefused, match="nothing to roll back"):
        registry.rollback()
    registry.record_verdict("1", PASS)
    registry.promote("1", bootstrap_without_approval=True, floors_passed=True)
    registry.record_verdict("2", PASS)
    registry.approve("2", by="alice")
    registry.promote("2")
    record = registry.rollback()
    assert record["action"] == "rollback" and (record["from"], record["to"]) == ("2", "1")
    assert registry.alias_version("champion") == "1"
    assert registry.alias_version("previous_champion") == "2"
    assert "previous_champion" not in registry.version_info("1")["tags"]
    assert audit_lines(registry)[-1] == record
    assert registry.promote() is None  # the rolled-back version is not re-promoted by the poll
    with pytest.raises(PromotionRefused, match="already the champion"):
        registry.rollback(to="1")


def test_status_shape(registry: Registry):
    empty = registry.status()
    assert empty["champion"] is None and empty["previous_champion"] is None
    assert empty["challenger"]["version"] == "2" and empty["data_version"] == "data-v2"
    registry.record_verdict("1", PASS)
    registry.promote("1", bootstrap_without_approval=True, floors_passed=True)
    registry.record_verdict("2", FAIL)
    status = registry.status()
    assert status["champion"]["version"] == "1"
    assert status["champion"]["metrics"]["accuracy"] == pytest.approx(0.90)
    assert status["data_version"] == "data-v1"
    assert status["challenger"] == {
        "version": "2",
        "metrics": pytest.approx({"accuracy": 0.92, "recall_at_1": 0.87}),
        "gate": FAIL,
        "approval": "pending",
    }


def test_second_registry_on_same_store_reuses_experiment(registry: Registry, tmp_path: Path):
    again = make_registry(tmp_path, registry.artifact_root)
    assert again.experiment_id == registry.experiment_id
    assert again.alias_version("challenger") == "2"


# "Quickly" without a clock: MLflow retries a store it cannot reach with growing sleeps (an
# sqlite file it cannot create: 0.1 s doubling to 51 s; HTTP: 4 s doubling to 120 s), so a
# refusal with no sleep at all is a refusal on the first attempt. benchmarks/outage.py
# measures the seconds.
def test_unreachable_sqlite_store_raises_at_the_first_attempt(tmp_path: Path, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    with pytest.raises(RegistryUnavailable, match="/proc/nope/mlflow.db"):
        Registry("sqlite:////proc/nope/mlflow.db", tmp_path / "a", MODEL, tmp_path / "audit")
    assert waits == []


def test_unreachable_http_store_raises_at_the_first_attempt(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    with pytest.raises(RegistryUnavailable, match="http://127.0.0.1:9"):
        Registry("http://127.0.0.1:9", tmp_path / "a", MODEL, tmp_path / "audit")
    assert waits == []


def test_store_lost_after_start_raises_unavailable(registry: Registry, tmp_path: Path):
    registry.client = MlflowClient("http://127.0.0.1:9", registry_uri="http://127.0.0.1:9")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(RegistryUnavailable, match="tracking store"):
            registry.status()


def test_logging_outside_a_run_is_refused(registry: Registry):
    with pytest.raises(RuntimeError, match="no active run"):
        registry.log_metrics({"accuracy": 0.9})
    with pytest.raises(PromotionRefused, match="no gate verdict"):
        registry.approve("1", by="alice")


def test_registered_model_has_an_explicit_signature(registry: Registry):
    from mlflow.models import get_model_info

    registry.load_model("2")  # points MLflow's globals at this store
    info = get_model_info(f"models:/{registry.model_name}/2")
    inputs, outputs = info.signature.inputs.to_dict(), info.signature.outputs.to_dict()
    assert inputs[0]["name"] == "pixels" and inputs[0]["tensor-spec"]["dtype"] == "float32"
    assert list(outputs[0]["tensor-spec"]["shape"]) == [-1, 2]


PROMOTE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from components.release.registry import PromotionRefused, Registry

    uri, artifacts, audit = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    registry = Registry(uri, artifacts, "vitrine-product", audit, owners=["owner"])
    print("ready", flush=True)
    sys.stdin.readline()  # "go": both processes promote at the same moment
    try:
        print(json.dumps({"record": registry.promote()}))
    except PromotionRefused as error:
        print(json.dumps({"refused": str(error)}))
    """
)


def test_two_promotions_at_once_move_the_alias_once(registry: Registry):
    registry.record_verdict("2", PASS)
    registry.approve("2", "owner")
    args = [registry.tracking_uri, str(registry.artifact_root), str(registry.audit_log)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROMOTE, *args],
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outcomes = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    moved = [o["record"] for o in outcomes if o.get("record")]
    assert len(moved) == 1 and moved[0]["to"] == "2" and moved[0]["from"] is None, outcomes
    other = next(o for o in outcomes if not o.get("record"))
    assert other == {"record": None} or "another promotion" in other["refused"], outcomes
    assert len(audit_lines(registry)) == 1 and registry.alias_version("champion") == "2"
    assert registry.alias_version("previous_champion") is None


def test_a_held_lock_refuses_a_promotion_and_a_stale_one_is_taken_over(registry: Registry):
    registry.record_verdict("2", PASS)
    registry.approve("2", "owner")
    with registry.promotion_lock():
        registry.lock_wait_seconds = 0.3
        with pytest.raises(PromotionBusy, match="another promotion is in progress .*pid"):
            registry.promote()
    assert registry.alias_version("champion") is None and not registry.audit_log.exists()
    registry.client.create_registered_model(registry.lock_name, description="a dead holder")
    with pytest.raises(PromotionBusy, match="a dead holder"):
        registry.promote()  # young: it is honoured
    with registry.promotion_lock(wait_seconds=0, stale_seconds=0):  # old: taken over
        assert registry.client.get_registered_model(registry.lock_name).description != (
            "a dead holder"
        )
    assert registry.promote()["to"] == "2"  # and released after use


def test_a_champion_alias_moved_outside_vitrine_is_refused_and_promote_repairs_it(
    registry: Registry,
):
    registry.record_verdict("1", PASS)
    registry.approve("1", "owner")
    registry.promote("1", bootstrap_without_approval=True)
    registry.record_verdict("2", FAIL)
    assert registry.served_champion() == ("1", None)
    # the MLflow UI's alias editor (or the API) moves `champion` to the version that failed
    registry.client.set_registered_model_alias(MODEL, "champion", "2")
    served, refusal = registry.served_champion()
    assert served == "1" and "moved to version 2 outside vitrine's promotion" in refusal
    assert registry.status()["champion_refused"] == refusal
    with pytest.raises(PromotionRefused, match="failed the gate"):
        registry.promote("2")  # the bypassed version is still judged as what it is
    repaired = registry.promote()  # nothing newer to promote: the alias is put back
    assert repaired["action"] == "repair" and repaired["to"] == "1"
    assert registry.alias_version("champion") == "1"
    assert registry.served_champion() == ("1", None)
    assert [line["action"] for line in audit_lines(registry)] == ["promote", "repair"]


def test_a_champion_alias_set_before_any_promotion_is_refused(registry: Registry):
    registry.client.set_registered_model_alias(MODEL, "champion", "2")
    served, refusal = registry.served_champion()
    assert served is None and "vitrine never promoted a version" in refusal


KILLED_PROMOTE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from components.release.registry import Registry

    def killed(*args, **kwargs):  # the moment after the alias moved, before the audit record
        os.kill(os.getpid(), signal.SIGKILL)

    Registry._audit = killed
    uri, artifacts, audit = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    Registry(uri, artifacts, "vitrine-product", audit, owners=["owner"]).promote("2")
    """
)


def test_a_promote_killed_between_the_alias_move_and_the_audit_is_detected_and_repaired(
    registry: Registry,
):
    registry.record_verdict("1", PASS)
    registry.promote("1", bootstrap_without_approval=True)
    registry.record_verdict("2", PASS)
    registry.approve("2", "owner")
    args = [registry.tracking_uri, str(registry.artifact_root), str(registry.audit_log)]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_PROMOTE, *args], cwd=PROJECT_ROOT, timeout=120
    )
    assert killed.returncode == -9  # SIGKILL: no finally ran, the lock is left behind
    assert registry.alias_version("champion") == "2"  # moved, but never audited
    assert registry.client.get_registered_model(registry.lock_name)  # held by the dead process
    served, refusal = registry.served_champion()
    assert served == "1" and "moved to version 2 outside vitrine's promotion" in refusal
    assert registry.status()["champion_refused"] == refusal  # `vitrine status` flags it
    registry.lock_wait_seconds = 0  # the dead holder's lock is taken over at once, not waited on
    record = registry.promote()
    assert (record["action"], record["from"], record["to"]) == ("promote", "1", "2")
    assert registry.served_champion() == ("2", None)
    assert registry.alias_version("previous_champion") == "1"
    assert [(line["action"], line["to"]) for line in audit_lines(registry)] == [
        ("promote", "1"),
        ("promote", "2"),
    ]


def test_a_version_whose_stored_artifacts_changed_is_refused_on_load(tmp_path: Path):
    """Registration records the sha256 of every stored file; a download that differs (a disk
    error, a hand edit, a truncated copy) raises instead of serving other weights."""
    registry = make_registry(tmp_path)  # its own artifact store: this test damages it
    version = register_version(registry, tmp_path, 0.90, "data-v1")
    recorded = json.loads(registry.version_info(version)["tags"]["artifact_sha256"])
    assert {name.split("/")[0] for name in recorded} == {"model", "index"}
    assert "index/embeddings.npy" in recorded
    registry.load_model(version)  # intact: loads
    registry.download_artifacts(version, "index", tmp_path / "ok")
    stored = tmp_path / "artifacts"
    weights = next(path for path in stored.rglob("*.pth"))
    data = bytearray(weights.read_bytes())
    data[-200] ^= 0xFF  # one flipped byte inside the tensor data: torch would still load it
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match=r"artifact model/.*model\.pth is corrupted"):
        registry.load_model(version)
    next(stored.rglob("embeddings.npy")).unlink()
    with pytest.raises(ArtifactCorrupt, match="artifact index/embeddings.npy is missing"):
        registry.download_artifacts(version, "index", tmp_path / "damaged")


def publish_revision(registry: Registry, tmp: Path, rows: int, value: float) -> dict:
    """A revision folder as a refresh writes one (an index file and revision.json), published
    for version 1."""
    folder = tmp / f"revision-{value}"
    folder.mkdir()
    np.save(folder / "embeddings.npy", np.full((rows, 3), value, np.float32))
    (folder / "revision.json").write_text(json.dumps({"files": file_digests(folder, "index")}))
    return registry.publish_index_revision("1", folder, {"size": rows})


def test_index_revisions_are_numbered_audited_and_the_newest_is_served(
    registry: Registry, tmp_path: Path
):
    assert registry.index_revision("1") | {"built_at": None} == {
        "revision": 0,
        "built_at": None,
        "artifact": "index",
    }
    first = publish_revision(registry, tmp_path, 2, 1.0)
    second = publish_revision(registry, tmp_path, 3, 2.0)
    assert (first["revision"], second["revision"]) == (1, 2)
    served = registry.index_revision("1")
    assert served["revision"] == 2 and served["size"] == 3 and served["by"]
    assert served["built_at"] > first["built_at"]
    assert served["artifact"].startswith("index-revisions/")
    assert served["artifact"] != first["artifact"]
    local = registry.download_index("1", served, tmp_path / "download")
    assert (np.load(local / "embeddings.npy") == 2.0).all()
    assert registry.index_revision("2")["revision"] == 0  # another version's index is its own
    assert [(r["action"], r["revision"]) for r in audit_lines(registry)[-2:]] == [
        ("index_refresh", 1),
        ("index_refresh", 2),
    ]
    assert registry.alias_version("champion") is None  # no alias moved


def test_a_revision_changed_in_the_artifact_store_is_refused(registry: Registry, tmp_path: Path):
    revision = publish_revision(registry, tmp_path, 2, 5.0)
    run_id = registry.version_info("1")["run_id"]
    stored = next(
        path
        for path in registry.artifact_root.rglob("embeddings.npy")
        if run_id in path.parts and path.parent.name == Path(revision["artifact"]).name
    )
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-4] + b"\0\0\0\1")
        served = registry.index_revision("1")
        with pytest.raises(ArtifactCorrupt, match="embeddings.npy is corrupted"):
            registry.download_index("1", served, tmp_path / "download")
    finally:
        stored.write_bytes(original)
