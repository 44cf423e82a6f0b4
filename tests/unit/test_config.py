"""A bad params.yaml: one line naming the file, the key, the value and what is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from components.config import DEFAULT_PARAMS, PROJECT_ROOT, ConfigError, load_params
from vitrine.cli import app


def params_with(tmp_path, section: str, key: str, value) -> str:
    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "lr", -1, "train.lr = -1: Input should be greater than 0"),
        ("train", "preprocess", "fancy", "train.preprocess = 'fancy': Input should be 'plain' or"),
        ("train", "lr_typo", 0.1, "train.lr_typo: unknown key"),
        ("labels", "policy", "burn", "labels.policy = 'burn': Input should be 'drop', 'relabel'"),
        ("train", "shopper_weights", {"fog": 1}, "train.shopper_weights.fog"),
        ("train", "segmenter", {"side": 30}, "train.segmenter.side = 30: the segmenter's input"),
        ("train", "segmenter", {"budget_seconds": 0}, "train.segmenter.budget_seconds = 0: Input"),
        ("train", "segmenter", {"enabled": "maybe"}, "train.segmenter.enabled = 'maybe': Input"),
        ("train", "segmenter", {"epochs": 3}, "train.segmenter.epochs: unknown key"),
        ("promotion", "owners", "ana", "promotion.owners = 'ana': Input should be a valid list"),
        ("promotion", "owners", ["vitrine"], "owners = ['vitrine']: 'vitrine' is the loop's own"),
        ("promotion", "owners", ["a b"], "promotion.owners = ['a b']: 'a b' is not an account"),
        ("promotion", "owners", ["ana", "ana"], "owners = ['ana', 'ana']: each owner once"),
        ("promotion", "loop_account", "", "promotion.loop_account = '': an account name"),
        ("registry", "tracking_uri", "tracking-host:5000", "registry.tracking_uri = 'tracking-h"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(tmp_path, section, key, value, expected):
    path = params_with(tmp_path, section, key, value)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message


def test_unreadable_and_broken_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(broken)
    broken.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected sections"):
        load_params(broken)


def test_the_cli_prints_the_line_and_exits_2_without_a_traceback(tmp_path):
    path = params_with(tmp_path, "train", "lr", -1)
    result = CliRunner().invoke(app, ["status"], env={"VITRINE_PARAMS": path})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {path}: train.lr = -1: Input should be greater than 0"]
    assert "Traceback" not in result.output


def test_third_party_progress_bars_are_off_in_vitrine_processes(tmp_path):
    """MLflow's download bars and transformers' "Loading weights" bar would interleave with
    vitrine's own progress lines; a process that configured its environment shows neither."""
    code = (
        "import os\n"
        "from components.config import configure_environment, state_paths\n"
        f"configure_environment(state_paths({str(tmp_path)!r}))\n"
        "from transformers.utils import logging\n"
        "from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as bar\n"
        "print(logging.is_progress_bar_enabled(), bar.get())\n"
    )
    env = {k: v for k, v in os.environ.items() if "PROGRESS_BAR" not in k}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]


def test_serve_sets_the_worker_count_through_bentomls_overrides():
    from vitrine.cli import worker_env

    assert "BENTOML_CONFIG_OVERRIDES" not in worker_env({}, 0)  # the service's default: per core
    env = worker_env({"BENTOML_CONFIG_OVERRIDES": '{"api_server": {"workers": 9}}'}, 3)
    overrides = json.loads(env["BENTOML_CONFIG_OVERRIDES"])
    assert overrides == {"api_server": {"workers": 9}, "services": {"vitrine": {"workers": 3}}}
    gpu = json.loads(worker_env({}, 0, gpus=1)["BENTOML_CONFIG_OVERRIDES"])
    assert gpu == {"services": {"vitrine": {"resources": {"gpu": 1}}}}  # serving.device cuda


def test_serving_device_settings_choose_the_device_and_the_batch_size(monkeypatch):
    import torch

    from bentos.settings import ServiceSettings, SettingsError
    from components.config import ServingParams
    from components.model.device import DeviceError

    cfg = ServiceSettings.load(ServingParams(device="cuda", max_batch_size=32))
    assert cfg.resolved_device(cuda_available=True).type == "cuda"
    with pytest.raises(DeviceError, match="^serving.device is cuda, but torch sees no CUDA"):
        cfg.resolved_device(cuda_available=False)
    assert cfg.batch_size(torch.device("cuda")) == 256 and cfg.batch_size(torch.device("cpu")) == 32
    assert ServiceSettings.load(ServingParams()).resolved_device(cuda_available=False).type == "cpu"
    monkeypatch.setenv("VITRINE_DEVICE", "gpu")
    with pytest.raises(SettingsError, match="^VITRINE_DEVICE: Input should be 'auto', 'cpu' or"):
        ServiceSettings.load(ServingParams())


def test_the_tracking_uri_is_the_environment_then_params_then_the_state_folder(
    tmp_path, monkeypatch
):
    from components.config import state_paths, tracking_uri

    paths = state_paths(tmp_path / "state")
    monkeypatch.delenv("VITRINE_TRACKING_URI", raising=False)
    assert tracking_uri(paths, load_params()) == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    shared = load_params(params_with(tmp_path, "registry", "tracking_uri", "http://tracking:5000"))
    assert tracking_uri(paths, shared) == "http://tracking:5000"
    monkeypatch.setenv("VITRINE_TRACKING_URI", "https://other:443")
    assert tracking_uri(paths, shared) == "https://other:443"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without CUDA")
def test_vitrine_serve_on_cuda_without_a_gpu_is_one_line_and_starts_nothing(tmp_path):
    path = params_with(tmp_path, "serving", "device", "cuda")
    result = CliRunner().invoke(app, ["serve"], env={"VITRINE_PARAMS": path})
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "error: serving.device is cuda, but torch sees no CUDA device on this machine "
        "(torch.cuda.is_available() is False): use auto or cpu"
    ]
