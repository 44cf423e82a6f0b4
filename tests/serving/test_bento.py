"""The bento ships serving code only: its requirement set leaves the training side out, its
files are exactly what the service imports, and the built bento serves /classify."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grimp
import httpx
import pandas as pd
import pytest
import yaml

from bentos import requirements
from components.config import PROJECT_ROOT
from tests.serving.conftest import start_server, stop_server

BENTOML = str(PROJECT_ROOT / ".venv/bin/bentoml")


def test_the_serving_requirements_are_current_and_leave_training_out():
    text = (PROJECT_ROOT / "bentos/requirements.txt").read_text()
    assert text == requirements.render(), "run `python -m bentos.requirements`"
    names = {line.split("==")[0] for line in text.splitlines() if "==" in line}
    assert {"bentoml", "torch", "mlflow", "faiss-cpu", "pydantic-settings"} <= names
    assert not names & set(requirements.TRAINING_ONLY)
    lock = requirements.lock_pins()
    assert all(lock[line.split("==")[0]] == line.split("==")[1] for line in text.splitlines()[1:])


def service_modules() -> set[str]:
    """Every project module bentos.service imports, directly or not (lazy imports included)."""
    graph = grimp.build_graph("bentos", "components")
    return {"bentos.service"} | graph.find_upstream_modules("bentos.service")


@pytest.fixture(scope="module")
def bento(tmp_path_factory) -> tuple[str, Path, Path]:
    """`bentoml build` of bentos/bentofile.yaml into a fresh BENTOML_HOME: (tag, home, src)."""
    home = tmp_path_factory.mktemp("bento") / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    done = subprocess.run(
        [BENTOML, "build", "-f", "bentos/bentofile.yaml", "--output", "tag", "."],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return tag, home, home / "bentos" / name / version / "src"


def test_the_bento_holds_the_service_modules_and_no_training_code(bento):
    _, _, src = bento
    shipped = {
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        for p in src.rglob("*.py")
    }
    assert service_modules() <= shipped, service_modules() - shipped
    for training in (
        "components.stages",
        "components.data",
        "components.model.training",
        "flows",
        "monitoring",
        "vitrine",
    ):
        assert not any(m == training or m.startswith(training + ".") for m in shipped), training
    built = (src.parent / "env/python/requirements.txt").read_text()
    assert "prefect" not in built and "cleanlab" not in built and "torch==" in built
    assert yaml.safe_load((src.parent / "bento.yaml").read_text())["service"] == (
        "bentos.service:Vitrine"
    )


def test_the_built_bento_serves_classify(bento, champion, tmp_path):
    tag, home, src = bento
    env = {**champion.env, "VITRINE_POLL_SECONDS": "0"}
    env.pop("PYTHONPATH", None)
    os.environ.pop("PYTHONPATH", None)
    # started outside the project tree: the bento's own copy of the code is what runs
    # start_server points BENTOML_HOME at the log's folder / "bentoml": the home built into
    server = start_server(env, home.parent / "serve.log", target=tag, cwd=tmp_path)
    try:
        manifest = pd.read_parquet(champion.ctx.catalogue_dir / "manifest.parquet")
        row = manifest.iloc[0]
        photo = (champion.ctx.catalogue_dir / row["path"]).read_bytes()
        answer = httpx.post(f"{server.url}/classify", files={"image": ("p.png", photo)}, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_version"] == champion.version
        assert body["category"] in champion.ctx.params.data.categories
        assert len(body["top"]) == 3
        served = httpx.get(f"{server.url}/readyz", timeout=10).json()
        assert served["ready"] and served["model_version"] == champion.version
    finally:
        stop_server(server.proc)


def test_the_bento_runs_its_own_copy_of_the_code(bento):
    """From the bento's folder, with the project's editable install taken out of the import
    system (as on a machine that has only the bento), every module the service imports loads
    from the bento's files, and what it does not ship cannot be imported."""
    _, _, src = bento
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = f"""
import importlib, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path_importer_cache.clear()
for name in {sorted(service_modules())!r}:
    module = importlib.import_module(name)
    assert module.__file__.startswith({str(src)!r}), (name, module.__file__)
try:
    import components.stages
except ImportError:
    print("no stages")
"""
    done = subprocess.run(
        [str(PROJECT_ROOT / ".venv/bin/python"), "-c", probe],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "no stages"


def test_the_bento_defines_a_container_image_that_fetches_its_model_at_start(bento):
    """What `bentoml containerize vitrine:TAG` builds (no Docker here: the definition only):
    the tested Python, the serving requirements, the service on port 3000 and no model: the
    container loads the champion from the registry it is pointed at, like `vitrine serve`."""
    _, _, src = bento
    docker = src.parent / "env" / "docker"
    dockerfile = (docker / "Dockerfile").read_text()
    major, minor = sys.version_info[:2]
    assert f"FROM python:{major}.{minor}-slim" in dockerfile
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile
    assert "EXPOSE 3000" in dockerfile and "USER bentoml" in dockerfile
    assert 'exec bentoml "$@" "$BENTO_PATH"' in (docker / "entrypoint.sh").read_text()
    shipped = [p.name for p in src.parent.rglob("*") if p.is_file()]
    assert not [
        n for n in shipped if n.endswith((".pt", ".onnx", ".npy", ".faiss")) or n == "MLmodel"
    ]
