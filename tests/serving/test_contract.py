"""The HTTP API holds its OpenAPI contract under fuzzing: schemathesis' CLI runs every check
(`--checks all`: no 5xx, status codes, content types, headers and bodies as documented, schema-valid
requests accepted, schema-invalid ones refused, undeclared methods a 405 with Allow, the admin
token enforced, ...) against the real service's /openapi.json, in every phase (examples,
coverage, fuzzing, stateful), twice: without the admin token and with it.

The uploaded photos schemathesis generates are real images (tests/serving/schemathesis_hooks.py):
the contract declares them `format: binary` and JSON Schema cannot say "decodes as an image",
so its default random bytes would be schema-valid requests the service rightly refuses (415).
Nothing else is narrowed: no check, phase or operation is excluded."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from components.config import PROJECT_ROOT
from tests.serving.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.serving

SCHEMATHESIS = PROJECT_ROOT / ".venv" / "bin" / "schemathesis"
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
OPERATIONS = 15  # 12 routes (with /detect) + the 3 probes
MAX_EXAMPLES = 100  # per operation and phase; ~2,000 cases a run


def schemathesis_run(url: str, folder: Path, seed: int, *options: str) -> tuple[dict, str]:
    """`schemathesis run URL/openapi.json --checks all` in `folder` (its .schemathesis/ and
    reports stay there): the JSON report and the summary lines of its output."""
    folder.mkdir(parents=True)
    report = folder / "report.json"
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "json,junit",
        "--report-dir",
        str(folder),
        "--report-json-path",
        str(report),
        *options,
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    done = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    (folder / "output.txt").write_text(done.stdout + done.stderr)
    assert report.is_file(), f"no report (exit {done.returncode}):\n{done.stdout[-4000:]}"
    lines = done.stdout.splitlines()
    summary = [
        line.strip() for line in lines if re.search(r"\d+ generated|^=+ .* in [\d.]+s", line)
    ]
    shown = " ".join(["--seed", str(seed), *options]).replace(ADMIN_TOKEN, "***")
    print(f"schemathesis {shown}:", *summary)
    return json.loads(report.read_text()), done.stdout


def requests_total(url: str, endpoint: str) -> dict[str, float]:
    """vitrine_requests_total of `endpoint` by status, summed over the workers."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vitrine_requests_total" and sample.labels["endpoint"] == endpoint
    }


def assert_passed(report: dict, output: str) -> int:
    """Every operation tested, every phase passed, no failure and no error: the case count."""
    failures = output[output.find("FAILURES") :][:6000]
    assert report["test_cases"]["unique_failures"] == 0 and not report["failures"], failures
    assert not report["errors"] and report["test_cases"]["errored"] == 0, report["errors"]
    assert report["exit_code"] == 0 and report["complete"], output[-3000:]
    assert report["operations"] == {
        "total": OPERATIONS,
        "selected": OPERATIONS,
        "tested": OPERATIONS,
        "errored": 0,
        "skipped": 0,
        "skip_reasons": [],
    }
    assert {name: phase["status"] for name, phase in report["phases"].items()} == {
        "examples": "success",
        "coverage": "success",
        "fuzzing": "success",
        "stateful": "success",
    }
    return report["test_cases"]["generated"]


def test_schemathesis_finds_no_failure_over_every_check_without_and_with_the_admin_token(
    server, champion, tmp_path
):
    before = httpx.get(f"{server.url}/readyz", timeout=10).json()["model_version"]
    admin = requests_total(server.url, "/admin/reload")

    anonymous, output = schemathesis_run(server.url, tmp_path / "anonymous", seed=1)
    cases = assert_passed(anonymous, output)
    assert anonymous["warnings"]["missing_auth"] == ["POST /admin/reload"]  # 403 only
    refused = requests_total(server.url, "/admin/reload")
    assert refused.get("403", 0) > admin.get("403", 0) and refused.get("200") == admin.get("200")

    token = ["--header", f"X-Admin-Token: {ADMIN_TOKEN}"]
    admitted, output = schemathesis_run(server.url, tmp_path / "token", 2, *token)
    cases += assert_passed(admitted, output)
    assert admitted["warnings"]["missing_auth"] == []
    reloads = requests_total(server.url, "/admin/reload")
    assert reloads.get("200", 0) > refused.get("200", 0)  # the token run reloaded
    assert reloads.get("403", 0) > refused.get("403", 0)  # and its probes without it were refused

    print(f"schemathesis: {cases} cases, 0 failures over both runs")
    assert cases >= 1000
    ready = httpx.get(f"{server.url}/readyz", timeout=10)  # the session's server still serves
    assert ready.status_code == 200 and ready.json()["model_version"] == before
