"""The serving tier: a tiny real champion in a temp VITRINE_HOME, and a real `bentoml serve`
on a free loopback port started in a subprocess with that environment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from components.config import PROJECT_ROOT, load_params, state_paths
from components.data import catalogue
from components.model.training import predict_batches
from components.release.registry import Registry, open_registry
from components.retrieval.text import PROJECTION_FILE, TextProjection
from components.stages import detect, evaluate, labels, register, train, validate
from components.stages.context import RunContext, load_images, load_trained_model
from tests.conftest import TEST_DETECTOR, shrunk_params, write_csv_catalogue, write_params

ADMIN_TOKEN = "test-admin-token"
POLL_SECONDS = 3


@dataclass
class Champion:
    ctx: RunContext
    registry: Registry
    version: str
    env: dict[str, str]  # VITRINE_HOME, VITRINE_PARAMS


def build_champion(
    root: Path, fmnist: dict, n_train: int = 400, n_test: int = 100, **overrides: dict
) -> Champion:
    """Ingest a small real CSV catalogue, train a tiny CNN, register it with its index, promote.
    `overrides`: more params sections to update (shrunk_params).

    Champions of the same catalogue and training params (the serving modules' and test_faults'
    defaults) share one real run of ingest, validate, labels, train and evaluate (seeded: each
    would train the same model, at about a minute each on two cores): trained_run copies it
    into `root`, and registration, compressed variants and promotion happen in `root`'s own
    state folder and MLflow store, so each champion's registry is its own."""
    shared = {section: values for section, values in overrides.items() if section != "registry"}
    trained = trained_run(root.parent, fmnist, n_train, n_test, shared)
    for part in ("shop", "catalogue", "run", "state"):  # state: checkpoints, image caches
        shutil.copytree(trained / part, root / part)
    for report in (root / "run").rglob("*.json"):  # validate's data docs folder, by its path
        report.write_text(report.read_text().replace(str(trained), str(root)))
    csv = root / "shop" / "catalogue.csv"
    params = champion_params(root, csv, overrides)
    params_path = write_params(root / "params.yaml", params)
    paths = state_paths(root / "state")
    ctx = RunContext(load_params(params_path), paths, work=root / "run", repo=root)
    registry = open_registry(ctx.paths, ctx.params)
    version = register.run(ctx, registry, cause="test")["version"]
    registry.promote(version, bootstrap_without_approval=True, floors_passed=True)
    env = {"VITRINE_HOME": str(paths.home), "VITRINE_PARAMS": str(params_path)}
    return Champion(ctx, registry, version, env)


def champion_params(root: Path, csv: Path, overrides: dict) -> dict:
    return shrunk_params(
        root / "catalogue",
        data={"source": str(csv)},
        train={"epochs": 2, "max_batches_per_epoch": 20},
        labels={"folds": 2},
        **{"detect": TEST_DETECTOR, **overrides},
    )


_TRAINED: dict[str, Path] = {}  # the shape of a champion's run -> its trained run folder


def trained_run(parent: Path, fmnist: dict, n_train: int, n_test: int, overrides: dict) -> Path:
    """A folder with a real ingested catalogue (shop/, catalogue/) and a real run of validate,
    labels, train and evaluate on it (run/, state/), made once per shape and never changed:
    champions copy it. Paths in its manifests and index are relative to the catalogue; only
    its JSON reports name the folder (build_champion rewrites them)."""
    key = json.dumps([n_train, n_test, overrides], sort_keys=True)
    if key in _TRAINED:
        return _TRAINED[key]
    root = parent / f"trained-run-{len(_TRAINED)}"
    csv = write_csv_catalogue(root / "shop", fmnist, n_train=n_train, n_test=n_test)
    params_path = write_params(root / "params.yaml", champion_params(root, csv, overrides))
    ctx = RunContext(load_params(params_path), state_paths(root / "state"), root / "run", root)
    catalogue.ingest_catalogue(
        str(csv),
        ctx.catalogue_dir,
        ctx.params.data.categories,
        fashion_mnist_dir=ctx.params.data.fashion_mnist_dir,
    )
    validate.run(ctx)
    labels.run(ctx)
    train.run(ctx)
    detect.run(ctx)
    evaluate.run(ctx)
    _TRAINED[key] = root
    return root


def register_distinct(champion: Champion, cause: str = "test") -> str:
    """Register a new version with weights of its own and the index THEY build (no verdict).

    Retraining per version would cost about a minute each on two cores, so the new version is
    the trained model with its embedding layer turned by a seeded random rotation R (W -> RW,
    b -> Rb): its class logits, neighbours and metrics are the trained run's, but its embedding
    coordinates share nothing with another version's (a product's two vectors have a cosine
    near 0, not 1). Its index and drift reference are rebuilt by the new model in a copy of
    the run folder and its text projection turned to match (P -> RP), so the version is
    consistent in itself, and a model answering with another version's index finds the wrong
    products (assert_serves_own_index)."""
    seed = len(champion.registry.list_versions()) + 1
    work = champion.ctx.work.with_name(f"{champion.ctx.work.name}-{seed}")
    shutil.copytree(champion.ctx.work, work, ignore=shutil.ignore_patterns("register", "compress"))
    ctx = RunContext(champion.ctx.params, champion.ctx.paths, work=work, repo=champion.ctx.repo)
    model = load_trained_model(ctx)
    dim = model.embedding.out_features
    noise = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed))
    rotation = torch.linalg.qr(noise)[0]
    with torch.no_grad():
        model.embedding.weight.copy_(rotation @ model.embedding.weight)
        model.embedding.bias.copy_(rotation @ model.embedding.bias)
    torch.save(model, work / "train" / "model.pt")
    index_dir = work / "evaluate" / "index"
    accepted = pd.read_parquet(work / "validate" / "accepted.parquet")  # as evaluate.run reads it
    accepted = accepted.sort_values("product_id").reset_index(drop=True)
    _, embeddings = predict_batches(model, load_images(ctx, accepted, model))
    np.save(index_dir / "embeddings.npy", embeddings.astype(np.float32))
    if (index_dir / PROJECTION_FILE).exists():
        projection = TextProjection.load(index_dir / PROJECTION_FILE)
        projection.weight = rotation.numpy() @ projection.weight
        projection.save(index_dir / PROJECTION_FILE)
    # the reference as THIS model sees the test split (reference_rows loads the model saved above)
    evaluate.write_drift_reference(
        ctx, evaluate.reference_rows(ctx, evaluate.test_products(accepted))
    )
    return register.run(ctx, champion.registry, cause=cause)["version"]


def register_approved(champion: Champion) -> str:
    """A new version of its own weights (register_distinct) that passed the gate and is approved."""
    version = register_distinct(champion)
    champion.registry.record_verdict(version, {"passed": True, "reasons": []})
    champion.registry.approve(version, by="test")
    return version


def register_and_promote(champion: Champion) -> str:
    version = register_approved(champion)
    champion.registry.promote(version)
    return version


def stored_index(champion: Champion, version: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The index registered with `version`: its products and embeddings, as the service loads them."""
    folder = champion.ctx.work.with_name(f"stored-index-{version}")
    index_dir = folder / "index"
    if not index_dir.is_dir():
        index_dir = champion.registry.download_artifacts(version, "index", folder)
    return pd.read_parquet(index_dir / "products.parquet"), np.load(index_dir / "embeddings.npy")


def assert_serves_own_index(
    url: str, champion: Champion, version: str, other: str, headers: dict | None = None
) -> None:
    """The service answers with `version`'s model AND `version`'s index: /embed of catalogue
    photos equals that version's stored index rows and not `other`'s, and /search finds each
    photo's own product first. A model paired with another version's index fails both."""
    products, own = stored_index(champion, version)
    _, theirs = stored_index(champion, other)
    for i in (0, 17, len(products) - 1):
        data = (champion.ctx.catalogue_dir / products["path"].iloc[i]).read_bytes()
        files = {"image": ("photo.png", data, "image/png")}
        embed = httpx.post(f"{url}/embed", files=files, headers=headers, timeout=30).json()
        assert embed["model_version"] == version
        vector = np.asarray(embed["embedding"])
        assert np.allclose(vector, own[i], atol=1e-5), (version, i)
        assert float(vector @ theirs[i]) < 0.9, (version, other, i)  # another version's space
        found = httpx.post(
            f"{url}/search", files=files, data={"k": "1"}, headers=headers, timeout=30
        ).json()
        assert found["model_version"] == version
        assert found["results"][0]["product_id"] == products["product_id"].iloc[i]


def readyz(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=10)


def every_worker_ready(url: str, probes: int = 12) -> list[httpx.Response] | None:
    """The /readyz answers of `probes` calls in a row, if all are 200: each call may land
    on another worker, and each worker recovers at its own next poll."""
    responses = []
    for _ in range(probes):
        response = readyz(url)
        if response.status_code != 200:
            return None
        responses.append(response)
    return responses


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with_value = check()
        if with_value:
            return with_value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout} s: {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path


def start_server(
    env: dict[str, str],
    log: Path,
    timeout: float = 90.0,
    target: str = "bentos.service:Vitrine",
    cwd: Path = PROJECT_ROOT,
) -> Server:
    """`bentoml serve TARGET` (the project's service, or a built bento's tag) on a free port."""
    port = free_port()
    full_env = {**os.environ, **env, "BENTOML_HOME": str(log.parent / "bentoml")}
    out = log.open("w")
    proc = subprocess.Popen(
        [
            str(Path(PROJECT_ROOT / ".venv/bin/bentoml")),
            "serve",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=cwd,
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"bentoml serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"service not ready after {timeout} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def champion(tmp_path_factory, fmnist) -> Champion:
    """One small champion and one server for the tier's read-mostly modules (test_explain,
    test_page, test_service run in that order; only test_service's last tests move the alias).
    Modules that register or promote versions from their first test (test_ab, test_variant)
    override this fixture with a champion of their own."""
    return build_champion(tmp_path_factory.mktemp("serving"), fmnist)


@pytest.fixture(scope="session")
def server(champion, tmp_path_factory):
    env = {
        **champion.env,
        "VITRINE_ADMIN_TOKEN": ADMIN_TOKEN,
        "VITRINE_POLL_SECONDS": str(POLL_SECONDS),
        "VITRINE_SAMPLE_RATE": "1.0",
    }
    running = start_server(env, tmp_path_factory.mktemp("server") / "serve.log")
    yield running
    stop_server(running.proc)
