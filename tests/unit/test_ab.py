"""The online A/B: sticky arm assignment, the per-arm report and the promotion check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from components.config import ABParams
from components.serving.ab import (
    ABEvent,
    ABLog,
    ab_verdict,
    assign_arm,
    read_ab_log,
    summarise_arms,
)


def test_assignment_is_sticky_and_matches_the_share():
    ids = [f"client-{i}" for i in range(20_000)]
    arms = [assign_arm(c, 0.1) for c in ids]
    assert arms == [assign_arm(c, 0.1) for c in ids]  # same client, same arm
    share = arms.count("challenger") / len(arms)
    assert share == pytest.approx(0.1, abs=0.01)
    assert assign_arm(None, 0.5) == "champion" and assign_arm("", 0.5) == "champion"
    assert {assign_arm(c, 0.0) for c in ids[:500]} == {"champion"}
    assert {assign_arm(c, 1.0) for c in ids[:500]} == {"challenger"}
    # growing the share only moves clients from champion to challenger, never back
    moved = [a for a, b in zip(arms, (assign_arm(c, 0.3) for c in ids), strict=True) if a != b]
    assert set(moved) == {"champion"}


def _events(
    arm: str,
    version: str,
    n: int,
    errors: int = 0,
    latency: float = 10.0,
    agrees: bool | None = None,
) -> list[dict]:
    now = datetime.now(UTC).isoformat()
    return [
        {
            "timestamp": now,
            "arm": arm,
            "model_version": version,
            "endpoint": "/search",
            "status": 500 if i < errors else 200,
            "latency_ms": latency,
            "mode": "route",
            "confidence": 0.8,
            "agrees": agrees,
        }
        for i in range(n)
    ]


def test_report_summarises_each_arm():
    events = _events("champion", "1", 100, errors=2, latency=8.0)
    events += _events("challenger", "2", 50, errors=5, latency=12.0, agrees=True)
    summary = summarise_arms(events)
    champ, chal = summary["arms"]["champion:v1"], summary["arms"]["challenger:v2"]
    assert (champ["requests"], champ["errors"]) == (100, 2)
    assert chal["error_rate"] == pytest.approx(0.1)
    assert chal["p95_ms"] == pytest.approx(12.0) and champ["p50_ms"] == pytest.approx(8.0)
    assert chal["agreement"] == 1.0 and champ["agreement"] is None
    assert summary["events"] == 150


@pytest.mark.parametrize(
    ("champion", "challenger", "passed", "needle"),
    [
        (dict(n=600), dict(n=600), True, "finished"),
        (dict(n=600), dict(n=100), False, "challenger arm has 100 requests"),
        (dict(n=10), dict(n=600), False, "champion arm has 10 requests"),
        (dict(n=600), dict(n=600, errors=60), False, "error rate"),
        (dict(n=600, latency=10.0), dict(n=600, latency=30.0), False, "p95 latency"),
    ],
)
def test_verdict_requires_enough_healthy_traffic(champion, challenger, passed, needle):
    events = _events("champion", "1", **champion) + _events("challenger", "2", **challenger)
    ok, reasons = ab_verdict(summarise_arms(events), "2", ABParams(min_requests=500))
    assert ok is passed
    assert any(needle in r for r in reasons), reasons


def test_verdict_without_traffic_for_that_version_and_minimum_duration():
    events = _events("champion", "1", 600) + _events("challenger", "2", 600)
    ok, reasons = ab_verdict(summarise_arms(events), "3", ABParams(min_requests=500))
    assert not ok and "no A/B traffic for version 3" in reasons[0]
    ok, reasons = ab_verdict(summarise_arms(events), "2", ABParams(min_requests=500, min_hours=2))
    assert not ok and "h required" in reasons[0]


def test_log_round_trip_and_since(tmp_path):
    log = ABLog(tmp_path)
    log.write(ABEvent("champion", "1", "/classify", 200, 5.0, "shadow", 0.9, True))
    log.write(ABEvent("challenger", "2", "shadow", 200, 7.0, "shadow", 0.7, True))
    events = read_ab_log(tmp_path)
    assert [e["arm"] for e in events] == ["champion", "challenger"]
    assert read_ab_log(tmp_path, since=datetime.now(UTC) + timedelta(seconds=1)) == []
