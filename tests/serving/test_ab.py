"""Online A/B in the real service: shadow (both answer, the champion's answer returned) and
route (a sticky share of clients), per-arm metrics and log, `vitrine ab report`, and the
promotion that waits for a finished A/B period when params.promotion.require_ab is on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from components.config import PROJECT_ROOT
from components.release.registry import PromotionRefused
from components.serving.ab import read_ab_log
from components.stages import promote
from components.stages.context import RunContext
from tests.serving.conftest import (
    Champion,
    assert_serves_own_index,
    build_champion,
    register_approved,
    register_distinct,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def champion(tmp_path_factory, fmnist) -> Champion:
    """A champion of this module's own: its tests register and promote versions."""
    return build_champion(tmp_path_factory.mktemp("ab"), fmnist)


@pytest.fixture(scope="module")
def challenger(champion) -> str:
    version = register_approved(champion)  # registration gives it the `challenger` alias
    assert champion.registry.alias_version("challenger") == version != champion.version
    return version


@pytest.fixture(scope="module")
def photos(champion) -> list[bytes]:
    products = pd.read_parquet(champion.ctx.work / "evaluate" / "index" / "products.parquet")
    return [(champion.ctx.catalogue_dir / p).read_bytes() for p in products["path"][:30]]


def classify(url: str, data: bytes, client: str | None = None) -> httpx.Response:
    headers = {"x-client-id": client} if client else {}
    files = {"image": ("photo.png", data, "image/png")}
    return httpx.post(f"{url}/classify", files=files, headers=headers, timeout=30)


def test_shadow_returns_the_champion_and_records_both_arms(
    champion, challenger, photos, tmp_path_factory
):
    env = {**champion.env, "VITRINE_AB_MODE": "shadow", "VITRINE_POLL_SECONDS": "0"}
    server = start_server(env, tmp_path_factory.mktemp("shadow") / "serve.log")
    try:
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["ab"] == {
            "mode": "shadow",
            "challenger_version": challenger,
            "challenger_error": None,
        }
        answers = [classify(server.url, data) for data in photos[:20]]
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["model_version"] for a in answers} == {champion.version}
        bad = httpx.post(
            f"{server.url}/classify", content=b"not an image", headers={"content-type": "image/png"}
        )
        assert bad.status_code == 415
        metrics = httpx.get(f"{server.url}/metrics").text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics)
            for s in family.samples
        }
        key = (("arm", "challenger"), ("status", "200"), ("version", challenger))
        assert samples[("vitrine_ab_requests_total", key)] == 20
        assert samples[("vitrine_ab_latency_seconds_count", (("arm", "champion"),))] == 21
    finally:
        stop_server(server.proc)
    events = read_ab_log(champion.ctx.paths.home / "requests")
    champ = [e for e in events if e["arm"] == "champion"]
    shadow = [e for e in events if e["arm"] == "challenger"]
    assert len(shadow) == 20 and len(champ) == 21  # the bad upload counts against its arm
    assert sum(e["status"] == 415 for e in champ) == 1
    assert all(e["agrees"] in (True, False) and e["model_version"] == challenger for e in shadow)


def test_a_challenger_that_failed_the_gate_never_answers(champion, challenger, photos, tmp_path):
    failed = register_distinct(champion)  # weights and index of its own
    champion.registry.record_verdict(failed, {"passed": False, "reasons": ["FAIL: test"]})
    assert champion.registry.alias_version("challenger") == failed  # registration moved it
    env = {**champion.env, "VITRINE_AB_MODE": "route", "VITRINE_AB_SHARE": "1.0"}
    server = start_server({**env, "VITRINE_POLL_SECONDS": "0"}, tmp_path / "serve.log")
    try:
        ab = httpx.get(f"{server.url}/readyz").json()["ab"]
        answers = {classify(server.url, photos[i], f"shopper-{i}") for i in range(10)}
        shopper = {"x-client-id": "shopper-0"}  # every client would be the challenger's
        assert_serves_own_index(server.url, champion, champion.version, failed, shopper)
    finally:
        stop_server(server.proc)
        name = champion.registry.model_name  # the module's other tests use the good challenger
        champion.registry.client.set_registered_model_alias(name, "challenger", challenger)
    assert ab["challenger_version"] is None
    assert f"version {failed}, which failed the gate" in ab["challenger_error"]
    assert {a.json()["model_version"] for a in answers} == {champion.version}


def test_route_is_sticky_per_client(champion, challenger, photos, tmp_path_factory):
    env = {
        **champion.env,
        "VITRINE_AB_MODE": "route",
        "VITRINE_AB_SHARE": "0.5",
        "VITRINE_POLL_SECONDS": "0",
    }
    server = start_server(env, tmp_path_factory.mktemp("route") / "serve.log")
    try:
        seen: dict[str, set[str]] = {}
        for i in range(60):
            client = f"shopper-{i % 20}"
            answer = classify(server.url, photos[i % len(photos)], client)
            assert answer.status_code == 200
            seen.setdefault(client, set()).add(answer.json()["model_version"])
        anonymous = {classify(server.url, photos[0]).json()["model_version"] for _ in range(5)}
        # each arm answers with its own model AND its own index (their weights differ)
        arms = {versions.copy().pop(): client for client, versions in seen.items()}
        for version, other in ((challenger, champion.version), (champion.version, challenger)):
            if version in arms:
                headers = {"x-client-id": arms[version]}
                assert_serves_own_index(server.url, champion, version, other, headers)
    finally:
        stop_server(server.proc)
    assert all(len(versions) == 1 for versions in seen.values())  # sticky
    by_version = [v for versions in seen.values() for v in versions]
    assert set(by_version) == {champion.version, challenger}  # both arms get clients
    assert anonymous == {champion.version}  # no client id: the champion


def test_ab_report_and_the_promotion_that_waits_for_it(champion, challenger):
    done = subprocess.run(
        [sys.executable, "-m", "vitrine.cli", "ab", "report", "--json"],
        cwd=PROJECT_ROOT,
        env={**os.environ, **champion.env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    arm = report["arms"][f"challenger:v{challenger}"]
    assert arm["requests"] >= 20 and arm["agreement"] is not None
    assert report["verdict"]["challenger"] == challenger
    strict = champion.ctx.params.model_copy(deep=True)
    strict.promotion.require_ab = True
    strict.serving.ab.min_requests = 10_000
    ctx = RunContext(strict, champion.ctx.paths, work=champion.ctx.work, repo=champion.ctx.repo)
    with pytest.raises(PromotionRefused, match="A/B gate: challenger arm has"):
        promote.run(ctx, challenger, champion.registry)
    assert champion.registry.alias_version("champion") == champion.version
    strict.serving.ab.min_requests = 20
    strict.serving.ab.max_p95_latency_ratio = 100.0  # shadowed calls share the CPU
    record = promote.run(ctx, challenger, champion.registry)
    assert record["to"] == challenger
    assert champion.registry.alias_version("champion") == challenger
