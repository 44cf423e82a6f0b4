"""The MLflow model registry for one registered model: the only module that imports mlflow.

Aliases carry the lifecycle ("challenger", "champion", "previous_champion"); version tags carry
the gate verdict, the approval (`approved_by`, settable in the MLflow UI) and an audit trail.
Every store failure surfaces as RegistryUnavailable naming the tracking URI.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import json
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import mlflow.pytorch
import numpy as np
import requests
import sqlalchemy.exc
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from components.config import Params, StatePaths, tracking_uri
from components.release.gate import (
    AUDIT_TAG_PREFIX,
    alias_refusal,
    approver_refusal,
    find_promotion_refusal,
    last_audited,
    not_an_owner,
    owner_approval,
    pick_promotion_candidate,
    read_gate_passed,
)

EXPERIMENT = "vitrine"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous_champion"
_NOT_OUTAGES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"}
F = TypeVar("F", bound=Callable[..., Any])


class RegistryUnavailable(RuntimeError):
    """The tracking store cannot be reached."""


class PromotionRefused(RuntimeError):
    """A promotion or rollback that the rules do not allow; the message says why."""


class PromotionBusy(PromotionRefused):
    """Another process holds the promotion lock (a promote or rollback in progress)."""


class AccessDenied(PromotionRefused):
    """A tracking server with authentication refused the call (401 or 403): no login, or the
    account lacks the permission (only owners may tag or alias the model)."""


_ACCESS_ERRORS = {"PERMISSION_DENIED", "UNAUTHENTICATED"}


class ArtifactCorrupt(ValueError):
    """A version's stored artifact is missing or differs from what was registered."""


INDEX_REVISION_TAG = "index_revision"  # the revision of the version's index to serve (0: none)
REVISION_FILE = "revision.json"  # in a refresh's revision: what changed and each file's sha256
INTEGRITY_TAG = "artifact_sha256"  # {"model/…" | "index/…": sha256} written at registration
WRITTEN_ON_DOWNLOAD = {"registered_model_meta"}  # MLflow writes it into each models:/ download


def file_digests(folder: Path, prefix: str) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by "<prefix>/<path inside folder>"."""
    return {
        f"{prefix}/{path.relative_to(folder).as_posix()}": _sha256(path)
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file() and path.name not in WRITTEN_ON_DOWNLOAD
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


REVISIONS_ARTIFACT = "index-revisions"  # a refresh's revision: index-revisions/<time>-<id>/


def _is_outage(error: BaseException) -> bool:
    if isinstance(error, MlflowException):
        return error.error_code not in _NOT_OUTAGES
    return isinstance(error, sqlalchemy.exc.SQLAlchemyError | requests.ConnectionError)


def _guarded(method: F) -> F:
    """Turn store outages raised inside a Registry method into RegistryUnavailable."""

    @functools.wraps(method)
    def wrapper(self: Registry, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (PromotionRefused, RegistryUnavailable):
            raise
        except Exception as error:
            if isinstance(error, MlflowException) and error.error_code in _ACCESS_ERRORS:
                raise self.access_denied(error) from error
            if _is_outage(error):
                raise self.unavailable(error) from error
            raise

    return wrapper  # type: ignore[return-value]


def _signature(model: torch.nn.Module, example: np.ndarray) -> ModelSignature:
    """Input N×C×H×W float32 (normalised pixels); outputs as the model returns them (vitrine's
    models: class logits and the embedding). Declared explicitly: MLflow cannot infer a
    signature for a model returning a tuple."""
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(example, np.float32)))
    outs = list(out) if isinstance(out, tuple | list) else [out]
    names = ["logits", "embedding"] if len(outs) == 2 else [f"output_{i}" for i in range(len(outs))]
    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, *example.shape[1:]), "pixels")]),
        outputs=Schema(
            [TensorSpec(f32, (-1, *o.shape[1:]), n) for o, n in zip(outs, names, strict=True)]
        ),
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _holder_died(holder: str) -> bool:
    """Whether the lock's holder ("<host> pid <pid> since …") was a process of this host that
    no longer runs (a promote killed mid-way): its lock is stale at once, whatever its age."""
    match = re.fullmatch(r"(\S+) pid (\d+) since .*", holder)
    if match is None or match[1] != socket.gethostname():
        return False  # another host's holder: only its age can tell
    try:
        os.kill(int(match[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def check_detector(version: str, tags: dict[str, str], model: Any) -> None:
    """Raise ArtifactCorrupt unless the detector pickled with the version's classifier is the one
    registered with it (its `detector` tag): a version never answers /detect with another
    version's detector, nor with none when it was registered with one."""
    expected = tags.get("detector")
    found = getattr(getattr(model, "detector", None), "digest", None)
    if expected != found:
        raise ArtifactCorrupt(
            f"version {version}: its model carries detector {found or 'none'}, but the version "
            f"was registered with detector {expected or 'none'}"
        )


class Registry:
    def __init__(
        self,
        tracking_uri: str,
        artifact_root: Path,
        model_name: str,
        audit_log: Path,
        *,
        owners: Collection[str] = (),
        loop_account: str = "vitrine",
    ):
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root)
        self.model_name = model_name
        self.audit_log = Path(audit_log)
        self.owners = tuple(owners)  # only their approval counts (params promotion.owners)
        self.loop_account = loop_account  # the loop's own name: never an approver
        self.lock_wait_seconds = 10.0  # how long a promote or rollback waits for another one
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            self.experiment_id = self._ensure_experiment()
            self._ensure_model()
        except Exception as error:
            if _is_outage(error) or isinstance(error, OSError):
                raise self.unavailable(error) from error
            raise

    def access_denied(self, error: MlflowException) -> AccessDenied:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        who = f"account {user!r}" if user else "an anonymous call (no MLFLOW_TRACKING_USERNAME)"
        what = "not logged in" if error.error_code == "UNAUTHENTICATED" else "permission denied"
        return AccessDenied(
            f"MLflow tracking server {self.tracking_uri} refused {who}: {what} (only owners may "
            f"tag or alias {self.model_name}; `vitrine users add NAME --owner`)"
        )

    def unavailable(self, error: BaseException) -> RegistryUnavailable:
        return RegistryUnavailable(
            f"MLflow tracking store {self.tracking_uri} is unavailable: "
            f"{type(error).__name__}: {str(error)[:300]}"
        )

    def _ensure_experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        if self.tracking_uri.startswith(("http://", "https://")):
            # a tracking server: its own (proxied) artifact store, reachable from every host
            return self.client.create_experiment(EXPERIMENT)
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        return self.client.create_experiment(
            EXPERIMENT, artifact_location=self.artifact_root.resolve().as_uri()
        )

    def _ensure_model(self) -> None:
        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.create_registered_model(self.model_name)

    def _activate(self) -> None:
        """Point MLflow's fluent API (runs, log_model, models:/ URIs) at this store."""
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)

    # ----------------------------------------------------------------- runs and logging
    @contextmanager
    def start_run(self, run_name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
        """An MLflow run on the vitrine experiment; yields its run_id."""
        self._activate()
        try:
            run = mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, tags=tags)
        except Exception as error:
            raise (self.unavailable(error) if _is_outage(error) else error) from error
        with run:
            yield run.info.run_id

    @staticmethod
    def _require_run() -> str:
        run = mlflow.active_run()
        if run is None:  # else mlflow would start a stray run in ./mlruns
            raise RuntimeError("no active run: log inside `with registry.start_run(...)`")
        return run.info.run_id

    @_guarded
    def log_params(self, params: dict) -> None:
        self._require_run()
        mlflow.log_params({key: str(value)[:6000] for key, value in params.items()})

    @_guarded
    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._require_run()
        mlflow.log_metrics({key: float(value) for key, value in metrics.items()})

    @_guarded
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._require_run()
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_guarded
    def log_dict(self, d: dict, name: str) -> None:
        self._require_run()
        mlflow.log_dict(d, name)

    @_guarded
    def has_artifact(self, version: str, artifact_path: str) -> bool:
        """Whether the run that produced `version` logged `artifact_path` (a top-level entry):
        versions registered before an artifact existed (e.g. the drift reference) lack it."""
        run_id = self.client.get_model_version(self.model_name, str(version)).run_id
        return any(f.path == artifact_path for f in self.client.list_artifacts(run_id))

    @_guarded
    def log_report_run(
        self,
        experiment: str,
        run_name: str,
        folder: Path,
        metrics: dict[str, float],
        tags: dict[str, str],
    ) -> str:
        """One run in `experiment` (e.g. drift reports, kept apart from the retrain runs)
        holding a report folder as artifacts, its figures and tags; returns the run id."""
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(
                experiment, artifact_location=(self.artifact_root / experiment).resolve().as_uri()
            )
        )
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, float(value))
        self.client.log_artifacts(run_id, str(folder))
        self.client.set_terminated(run_id)
        return run_id

    @_guarded
    def log_and_register_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        extra_artifacts: dict[str, Path],
        tags: dict[str, str],
    ) -> str:
        """Log the model (+ e.g. its index folder) in the active run, register it as challenger."""
        run_id = self._require_run()
        torch_pin = torch.__version__.split("+")[0]
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pickle",
            signature=_signature(model, input_example),
            pip_requirements=[f"torch=={torch_pin}", f"numpy=={np.__version__}"],
        )
        for artifact_path, path in extra_artifacts.items():
            self.log_artifact(Path(path), artifact_path=artifact_path)
        tags = {
            **tags,
            INTEGRITY_TAG: json.dumps(self._stored_digests(info, extra_artifacts)),
        }
        version = self.client.create_model_version(
            self.model_name, source=info.model_uri, run_id=run_id, model_id=info.model_id
        ).version
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, version, key, str(value))
        self.client.set_registered_model_alias(self.model_name, CHALLENGER, version)
        return str(version)

    def _stored_digests(self, info: Any, extra: dict[str, Path]) -> dict[str, str]:
        """The digests of the model as the store holds it (read back: MLflow serialises it)
        and of the extra artifacts (from the local files just logged, byte for byte)."""
        with tempfile.TemporaryDirectory(prefix="vitrine-digests-") as tmp:
            model = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=tmp)
            digests = file_digests(Path(model), "model")
        for artifact_path, path in extra.items():
            path = Path(path)
            if path.is_dir():
                digests.update(file_digests(path, artifact_path))
            else:  # log_artifact keeps the file's name under artifact_path
                digests[f"{artifact_path}/{path.name}"] = _sha256(path)
        return digests

    def _verify(self, version: str, tags: dict, folder: Path, prefix: str) -> None:
        """Raise ArtifactCorrupt unless `folder` (a download of `prefix`) holds every file
        recorded at registration (`tags`) with the same sha256. Versions registered before the
        record existed are not checked."""
        recorded = tags.get(INTEGRITY_TAG)
        if recorded is None:
            return
        expected = {k: v for k, v in json.loads(recorded).items() if k.startswith(f"{prefix}/")}
        found = file_digests(folder, prefix)
        for name, digest in expected.items():
            if name not in found:
                raise ArtifactCorrupt(f"version {version}: artifact {name} is missing")
            if found[name] != digest:
                raise ArtifactCorrupt(
                    f"version {version}: artifact {name} is corrupted (sha256 "
                    f"{found[name][:12]}… on disk, {digest[:12]}… at registration)"
                )

    # ----------------------------------------------------------------- reading
    @_guarded
    def load_model(self, version: str) -> torch.nn.Module:
        """The version's model, from a download checked against its registration digests."""
        self._activate()
        tags = self.client.get_model_version(self.model_name, version).tags
        with tempfile.TemporaryDirectory(prefix=f"vitrine-model-v{version}-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.model_name}/{version}", dst_path=tmp
            )
            self._verify(version, tags, Path(local), "model")
            model = mlflow.pytorch.load_model(local)
        check_detector(version, tags, model)
        return model

    @_guarded
    def download_artifacts(self, version: str, artifact_path: str, dst: Path) -> Path:
        """Download `artifact_path` of the run that produced `version` into `dst`, checked
        against the version's registration digests (ArtifactCorrupt if it differs)."""
        mv = self.client.get_model_version(self.model_name, version)
        Path(dst).mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id,
            artifact_path=artifact_path,
            dst_path=str(dst),
            tracking_uri=self.tracking_uri,
        )
        self._verify(version, mv.tags, Path(local), artifact_path)
        return Path(local)

    @_guarded
    def version_info(self, version: str) -> dict:
        mv = self.client.get_model_version(self.model_name, str(version))
        metrics = self.client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        return {
            "version": str(mv.version),
            "run_id": mv.run_id,
            "tags": dict(mv.tags),
            "aliases": list(mv.aliases),
            "metrics": dict(metrics),
        }

    @_guarded
    def alias_version(self, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException as error:
            if error.error_code in _NOT_OUTAGES:
                return None
            raise

    @_guarded
    def served_champion(self) -> tuple[str | None, str | None]:
        """(the version to serve as champion, why the alias is refused or None).

        The version the `champion` alias names, if vitrine's promotion (or rollback) put it
        there; else the last audited champion, with the reason (gate.alias_refusal)."""
        alias = self.alias_version(CHAMPION)
        audited = last_audited(self.list_versions())
        refusal = alias_refusal(alias, audited)
        if refusal is None:
            return alias, None
        return (audited["to"] if audited else None), refusal

    @_guarded
    def list_versions(self) -> list[dict]:
        """Every version of the model, newest first, with its tags."""
        found = self.client.search_model_versions(f"name='{self.model_name}'")
        rows = [{"version": str(mv.version), "tags": dict(mv.tags)} for mv in found]
        return sorted(rows, key=lambda row: int(row["version"]), reverse=True)

    # ----------------------------------------------------------------- index revisions
    @_guarded
    def index_revision(self, version: str) -> dict:
        """The revision of `version`'s index to serve: its number, when it was built and
        where it is stored (revision 0: the `index` the training run registered)."""
        mv = self.client.get_model_version(self.model_name, str(version))
        revision = int(mv.tags.get(INDEX_REVISION_TAG, "0"))
        if revision == 0:
            built = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat()
            return {"revision": 0, "built_at": built, "artifact": "index"}
        return json.loads(mv.tags[f"{INDEX_REVISION_TAG}_{revision}"])  # with its "artifact"

    @_guarded
    def download_index(self, version: str, revision: dict, dst: Path) -> Path:
        """Download revision `revision` (an `index_revision` answer) of `version`'s index into
        `dst`, checked: revision 0 against the registration digests, a refresh's revision
        against its revision.json, whose own digest its version tag records."""
        if revision["revision"] == 0:
            return self.download_artifacts(version, revision["artifact"], dst)
        mv = self.client.get_model_version(self.model_name, str(version))
        Path(dst).mkdir(parents=True, exist_ok=True)
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=mv.run_id,
                artifact_path=revision["artifact"],
                dst_path=str(dst),
                tracking_uri=self.tracking_uri,
            )
        )
        manifest = local / REVISION_FILE
        where = f"version {version} index revision {revision['revision']}"
        if not manifest.is_file() or _sha256(manifest) != revision["manifest_sha256"]:
            raise ArtifactCorrupt(f"{where}: {REVISION_FILE} is missing or altered")
        expected = json.loads(manifest.read_text())["files"]
        found = file_digests(local, "index")
        for name, digest in expected.items():
            if found.get(name) != digest:
                state = "missing" if name not in found else "corrupted"
                raise ArtifactCorrupt(f"{where}: {name} is {state}")
        return local

    @_guarded
    def publish_index_revision(self, version: str, folder: Path, summary: dict) -> dict:
        """Store `folder` (an index, its revision.json and store images) as the next revision
        of `version`'s index and make it the one served (the `index_revision` tag, set last).
        Audited like a promotion: the record is a version tag and a line of the audit log.
        Under the promotion lock, so two refreshes never take the same number."""
        # uploaded first, outside the lock (gigabytes at millions of products, longer than
        # the lock's stale age), under a name of its own; numbered and served under the lock
        run_id = self.client.get_model_version(self.model_name, str(version)).run_id
        artifact = f"{REVISIONS_ARTIFACT}/{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.client.log_artifacts(run_id, str(folder), artifact)
        with self.promotion_lock(self.lock_wait_seconds):
            mv = self.client.get_model_version(self.model_name, str(version))
            revision = int(mv.tags.get(INDEX_REVISION_TAG, "0")) + 1
            user = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
            record = {
                "action": "index_refresh",
                "version": str(version),
                "revision": revision,
                "built_at": _now().isoformat(),
                "by": f"{user}@{socket.gethostname()}",
                **summary,
                "artifact": artifact,
                "manifest_sha256": _sha256(Path(folder) / REVISION_FILE),
            }
            self._tag(version, f"{INDEX_REVISION_TAG}_{revision}", json.dumps(record))
            self._tag(version, INDEX_REVISION_TAG, str(revision))
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        with self.audit_log.open("a") as log:
            log.write(json.dumps(record) + "\n")
        return record

    # ----------------------------------------------------------------- gate and approval
    @_guarded
    def record_verdict(self, version: str, verdict: dict) -> None:
        passed = bool(verdict["passed"])
        self._tag(version, "gate_passed", "true" if passed else "false")
        self._tag(version, "gate_reasons", json.dumps(list(verdict.get("reasons", []))))
        if passed:
            self._tag(version, "approval", "pending")

    @_guarded
    def approve(self, version: str, by: str) -> None:
        """Tag the version approved_by=`by`, who must be an owner (never the loop itself)."""
        if refusal := approver_refusal(by, self.owners, self.loop_account):
            raise PromotionRefused(f"version {version} cannot be approved by {refusal}")
        gate = read_gate_passed(self.version_info(version)["tags"])
        if gate is not True:
            state = "failed the gate" if gate is False else "has no gate verdict yet"
            raise PromotionRefused(f"version {version} {state}: it cannot be approved")
        self._tag(version, "approved_by", by)
        self._tag(version, "approved_at", _now().isoformat())
        self._tag(version, "approval", "approved")

    def _tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.model_name, str(version), key, value)

    # ----------------------------------------------------------------- the promotion lock
    @property
    def lock_name(self) -> str:
        return f"{self.model_name}.promotion-lock"

    @contextmanager
    def promotion_lock(self, wait_seconds: float = 10.0, stale_seconds: float = 600.0):
        """The one right to move the `champion` alias, across processes and hosts.

        Creating a registered model is atomic in every MLflow store (the name is the key of
        its table, on SQLite as on PostgreSQL, and over a tracking server's HTTP API), so the
        lock is a registered model named `<model>.promotion-lock` whose description names its
        holder; it exists only while a promote or rollback runs. A lock older than
        `stale_seconds` (its holder died on another host), or held by a process of this host
        that is gone (killed mid-promotion), is taken over. Waits up to `wait_seconds`, then
        raises PromotionBusy naming the holder."""
        holder = f"{socket.gethostname()} pid {os.getpid()} since {_now().isoformat()}"
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                self.client.create_registered_model(self.lock_name, description=holder)
                break
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            if (held := self._lock_holder(stale_seconds)) is None:
                continue  # released, or stale and removed: try again at once
            if time.monotonic() > deadline:
                raise PromotionBusy(f"another promotion is in progress ({held})")
            time.sleep(0.1)
        try:
            yield
        finally:
            self.client.delete_registered_model(self.lock_name)

    def _lock_holder(self, stale_seconds: float) -> str | None:
        """The lock's holder, or None if it is gone or was stale (then it is removed)."""
        try:
            lock = self.client.get_registered_model(self.lock_name)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        age = time.time() - lock.creation_timestamp / 1000
        if age <= stale_seconds and not _holder_died(lock.description or ""):
            return lock.description
        with contextlib.suppress(MlflowException):  # another contender may remove it first
            self.client.delete_registered_model(self.lock_name)
        return None

    # ----------------------------------------------------------------- promotion
    @_guarded
    def promote(
        self,
        version: str | None = None,
        *,
        bootstrap_without_approval: bool = False,
        floors_passed: bool | None = None,
        extra_check: Callable[[str], str | None] | None = None,
    ) -> dict | None:
        """Move "champion" to `version`, or to the newest approved, gate-passed newer version.

        Without a champion and with `bootstrap_without_approval`, a version that passed the
        floors needs no approval. `extra_check(version)` may refuse with a reason (e.g. an
        unfinished A/B period). Returns the audit record, or None if nothing is eligible.
        Under the promotion lock: of two promotions at once, one moves the alias and the other
        then finds nothing to promote (or raises PromotionBusy after waiting).
        """
        with self.promotion_lock(self.lock_wait_seconds):
            return self._promote(version, bootstrap_without_approval, floors_passed, extra_check)

    def _promote(
        self,
        version: str | None,
        bootstrap_without_approval: bool,
        floors_passed: bool | None,
        extra_check: Callable[[str], str | None] | None,
    ) -> dict | None:
        champion, refused = self.served_champion()  # an alias moved outside vitrine is ignored
        bootstrap = champion is None and bootstrap_without_approval
        if version is None:
            versions = self.list_versions()
            version = pick_promotion_candidate(
                versions,
                champion,
                bootstrap=bootstrap,
                floors_passed=floors_passed,
                owners=self.owners,
            )
            if version is None:
                return self._repair_alias(champion) if refused and champion else None
        tags = self.version_info(version)["tags"]
        refusal = find_promotion_refusal(
            str(version),
            champion,
            tags,
            bootstrap=bootstrap,
            floors_passed=floors_passed,
            owners=self.owners,
        )
        if not refusal and extra_check is not None and champion is not None:
            refusal = extra_check(str(version))
        if refusal:
            raise PromotionRefused(refusal)
        return self._move_champion(str(version), champion, "promote", tags)

    @_guarded
    def rollback(self, to: str | None = None) -> dict:
        """Champion back to previous_champion (or to `to`); the demoted version is marked.
        Under the promotion lock, like promote."""
        with self.promotion_lock(self.lock_wait_seconds):
            return self._rollback(to)

    def _rollback(self, to: str | None) -> dict:
        champion, _ = self.served_champion()
        target = str(to) if to is not None else self.alias_version(PREVIOUS)
        if target is None:
            raise PromotionRefused("nothing to roll back to: no previous_champion")
        if target == champion:
            raise PromotionRefused(f"version {target} is already the champion")
        tags = self.version_info(target)["tags"]
        if read_gate_passed(tags) is False:
            raise PromotionRefused(f"version {target} failed the gate: cannot roll back to it")
        if champion is not None:
            self._tag(champion, "rolled_back", "true")
        return self._move_champion(target, champion, "rollback", tags)

    def _repair_alias(self, champion: str) -> dict:
        """Point the `champion` alias back at the audited champion, and audit that."""
        self.client.set_registered_model_alias(self.model_name, CHAMPION, champion)
        return self._audit("repair", champion, champion, self.version_info(champion)["tags"])

    def _move_champion(self, version: str, old: str | None, action: str, tags: dict) -> dict:
        self.client.set_registered_model_alias(self.model_name, CHAMPION, version)
        for key in ("previous_champion", "rolled_back"):
            if key in tags:
                self.client.delete_model_version_tag(self.model_name, version, key)
        if old is not None:
            self.client.set_registered_model_alias(self.model_name, PREVIOUS, old)
            self._tag(old, "previous_champion", "true")
        elif self.alias_version(PREVIOUS) == version:
            self.client.delete_registered_model_alias(self.model_name, PREVIOUS)
        if self.alias_version(CHALLENGER) == version:
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        return self._audit(action, old, version, tags)

    def _audit(self, action: str, old: str | None, version: str, tags: dict) -> dict:
        """The audit record of a move of the champion alias: in the audit log and as a tag of
        the version (the tag is what the service checks the alias against)."""
        at = _now()
        record = {
            "action": action,
            "from": old,
            "to": version,
            "approved_by": owner_approval(tags, self.owners),  # None: bootstrap, no owner's
            "at": at.isoformat(),
            "verdict": {
                "passed": read_gate_passed(tags),
                "reasons": json.loads(tags.get("gate_reasons", "[]")),
            },
        }
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        with self.audit_log.open("a") as log:
            log.write(json.dumps(record) + "\n")
        self._tag(
            version, f"{AUDIT_TAG_PREFIX}{at.strftime('%Y%m%dT%H%M%S%fZ')}", json.dumps(record)
        )
        return record

    # ----------------------------------------------------------------- status
    @_guarded
    def status(self) -> dict:
        champion = self.alias_version(CHAMPION)
        challenger = self.alias_version(CHALLENGER)
        champ_info = self.version_info(champion) if champion else None
        chall_info = self.version_info(challenger) if challenger else None
        source = champ_info or chall_info
        return {
            "champion": champ_info
            and {
                "version": champion,
                "metrics": champ_info["metrics"],
                "tags": champ_info["tags"],
                "approved_by": champ_info["tags"].get("approved_by"),
                "index": self.index_revision(champion),  # what `vitrine index refresh` made
            },
            "challenger": chall_info
            and {
                "version": challenger,
                "metrics": chall_info["metrics"],
                "gate": {
                    "passed": read_gate_passed(chall_info["tags"]),
                    "reasons": json.loads(chall_info["tags"].get("gate_reasons", "[]")),
                },
                "approval": self._approval_state(chall_info["tags"]),
            },
            "previous_champion": self.alias_version(PREVIOUS),
            "data_version": source["tags"].get("data_version") if source else None,
            "champion_refused": self.served_champion()[1],
        }

    def _approval_state(self, tags: dict[str, str]) -> str:
        """approved (by an owner), pending, or why an approved_by does not count."""
        if owner_approval(tags, self.owners):
            return "approved"
        name = tags.get("approved_by")
        return f"refused: approved_by {not_an_owner(name, self.owners)}" if name else "pending"


def open_registry(paths: StatePaths, params: Params) -> Registry:
    """The project's registry: the one place a `Registry` is built from the state paths and
    params (tracking URI, artifact root, model name, audit log, owners, the loop's account)."""
    return Registry(
        tracking_uri=tracking_uri(paths, params),
        artifact_root=paths.artifacts,
        model_name=params.registry.model_name,
        audit_log=paths.audit_log,
        owners=params.promotion.owners,
        loop_account=params.promotion.loop_account,
    )
