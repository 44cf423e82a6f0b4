"""Online A/B between the champion and the challenger: arm assignment, the event log, the report
and the promotion check.

The service writes one event per answered A/B request (every request, not sampled) to
<state>/requests/ab-YYYYMMDD.jsonl: arm, model version, endpoint, status, latency, confidence,
and on shadowed requests whether the challenger agreed with the champion's category. The
report and the promotion check read only that log, so they work whether or not the service
is running.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from components.config import ABParams
from components.serving.logs import JsonlLog

CHAMPION, CHALLENGER = "champion", "challenger"


def assign_arm(client_id: str | None, share: float) -> str:
    """Sticky routing: the same client id always lands in the same arm; no id → champion."""
    if not client_id or share <= 0:
        return CHAMPION
    digest = hashlib.sha256(client_id.encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return CHALLENGER if position < share else CHAMPION


@dataclass
class ABEvent:
    arm: str  # champion | challenger
    model_version: str
    endpoint: str
    status: int
    latency_ms: float
    mode: str  # route | shadow
    confidence: float | None = None
    agrees: bool | None = None  # shadow: challenger's category == champion's


class ABLog:
    """The A/B events: <folder>/ab-YYYYMMDD.jsonl (components/serving/logs.py JsonlLog)."""

    def __init__(self, folder: Path, on_error: Any = None):
        self.log = JsonlLog(folder, "ab", on_error)

    def write(self, event: ABEvent) -> None:
        self.log.append(dict(event.__dict__))


def read_ab_log(folder: Path, since: datetime | None = None) -> list[dict]:
    return JsonlLog(folder, "ab").read(since)


class ABRouter:
    """Which bundle answers a request (serving.ab.mode), and the A/B event of each answer.

    route: a sticky share of client ids (header X-Client-Id) is answered by the challenger;
    shadow: the champion answers and the challenger runs on the same photo, unseen, its
    agreement logged. A request's arm note (`pick`'s third value) is completed by `answer`
    and recorded by the service's middleware with the response status and latency."""

    def __init__(self, mode: str, share: float, folder: Path, metrics: Any):
        self.mode, self.share, self.metrics = mode, share, metrics
        self.log = ABLog(folder, metrics.log_write_failed if metrics else None)

    def pick(self, champion: Any, challenger: Any, client_id: str | None) -> tuple:
        """(the bundle that answers, the one shadowing it or None, the arm note or None)."""
        if challenger is None or self.mode == "off":
            return champion, None, None
        if self.mode == "shadow":
            return (
                champion,
                challenger,
                {"arm": CHAMPION, "version": champion.version, "mode": "shadow"},
            )
        arm = assign_arm(client_id, self.share)
        bundle = challenger if arm == CHALLENGER else champion
        return bundle, None, {"arm": arm, "version": bundle.version, "mode": "route"}

    async def answer(
        self, bundle: Any, shadow: Any, note: dict | None, run: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        """run(bundle); in shadow mode run(shadow) too, concurrently, logged but never shown."""
        started = time.perf_counter()
        other = asyncio.ensure_future(run(shadow)) if shadow is not None else None
        try:
            result = await run(bundle)
        except Exception:
            if other is not None:
                other.cancel()
            raise
        if note is not None:
            note["confidence"] = result.confidence
        if other is not None:
            status, confidence, agrees = 200, None, None
            try:
                shadowed = await other
                confidence, agrees = shadowed.confidence, shadowed.category == result.category
            except Exception:
                status = 500
            note["agrees"] = agrees
            seconds = time.perf_counter() - started
            shadow_note = {"arm": CHALLENGER, "version": shadow.version, "mode": "shadow"}
            self.record(
                {**shadow_note, "confidence": confidence, "agrees": agrees},
                "shadow",
                status,
                seconds,
            )
        return result

    def record(self, note: dict, endpoint: str, status: int, seconds: float) -> None:
        self.metrics.observe_arm(note["arm"], note["version"], status, seconds)
        self.log.write(
            ABEvent(
                note["arm"],
                note["version"],
                endpoint,
                status,
                round(seconds * 1000, 3),
                note["mode"],
                note.get("confidence"),
                note.get("agrees"),
            )
        )


def summarise_arms(events: list[dict]) -> dict:
    """Per (arm, model version): requests, error rate, latency p50/p95, mean confidence,
    agreement on shadowed requests; plus the period's first and last timestamps."""
    arms: dict[str, dict] = {}
    for arm in sorted({(e["arm"], e["model_version"]) for e in events}):
        rows = [e for e in events if (e["arm"], e["model_version"]) == arm]
        latency = np.array([e["latency_ms"] for e in rows], dtype=float)
        conf = [e["confidence"] for e in rows if e.get("confidence") is not None]
        agree = [e["agrees"] for e in rows if e.get("agrees") is not None]
        arms[f"{arm[0]}:v{arm[1]}"] = {
            "arm": arm[0],
            "model_version": arm[1],
            "requests": len(rows),
            "errors": sum(e["status"] >= 400 for e in rows),
            "error_rate": sum(e["status"] >= 400 for e in rows) / len(rows),
            "p50_ms": float(np.percentile(latency, 50)),
            "p95_ms": float(np.percentile(latency, 95)),
            "mean_confidence": float(np.mean(conf)) if conf else None,
            "agreement": float(np.mean(agree)) if agree else None,
            "shadowed": len(agree),
        }
    stamps = sorted(e["timestamp"] for e in events)
    return {
        "arms": arms,
        "first": stamps[0] if stamps else None,
        "last": stamps[-1] if stamps else None,
        "events": len(events),
    }


def ab_verdict(summary: dict, challenger_version: str, policy: ABParams) -> tuple[bool, list[str]]:
    """Is the A/B period of `challenger_version` finished and good enough to promote it?"""
    arms = summary["arms"].values()
    challenger = [
        a for a in arms if a["arm"] == CHALLENGER and a["model_version"] == challenger_version
    ]
    champion = [a for a in arms if a["arm"] == CHAMPION]
    if not challenger:
        return False, [f"no A/B traffic for version {challenger_version} yet"]
    chal = challenger[0]
    champ = max(champion, key=lambda a: a["requests"]) if champion else None
    reasons = []
    for name, arm in (("challenger", chal), ("champion", champ)):
        count = arm["requests"] if arm else 0
        if count < policy.min_requests:
            reasons.append(f"{name} arm has {count} requests < {policy.min_requests} required")
    if summary["first"] and policy.min_hours > 0:
        hours = (
            datetime.now(UTC) - datetime.fromisoformat(summary["first"])
        ).total_seconds() / 3600
        if hours < policy.min_hours:
            reasons.append(f"A/B period ran {hours:.1f} h < {policy.min_hours} h required")
    if champ is not None:
        increase = chal["error_rate"] - champ["error_rate"]
        if increase > policy.max_error_rate_increase:
            reasons.append(
                f"error rate {chal['error_rate']:.3f} vs champion "
                f"{champ['error_rate']:.3f} (+{increase:.3f} > "
                f"{policy.max_error_rate_increase})"
            )
        if champ["p95_ms"] > 0 and chal["p95_ms"] / champ["p95_ms"] > policy.max_p95_latency_ratio:
            reasons.append(
                f"p95 latency {chal['p95_ms']:.1f} ms is "
                f"{chal['p95_ms'] / champ['p95_ms']:.2f}× the champion's "
                f"(> {policy.max_p95_latency_ratio}×)"
            )
    return not reasons, reasons or ["A/B period finished within the policy"]
