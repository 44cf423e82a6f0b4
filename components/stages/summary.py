"""The short summary a retrain run ends with (JSON for machines, text for people)."""

from __future__ import annotations

import json

from components.config import SUMMARY_METRICS
from components.release.gate import read_gate_passed


def summarize_run(
    report: dict,
    label_summary: dict,
    train_summary: dict,
    metrics: dict,
    registered: dict,
    verdict: dict,
    promoted: dict | None,
    work: str,
) -> dict:
    return {
        "data_version": registered.get("data_version"),
        **report["counts"],
        "quarantined_by_reason": report.get("quarantined_by_reason", {}),
        "label_issues": label_summary["flagged"],
        "label_policy": label_summary.get("policy"),
        "label_dropped": label_summary.get("dropped", 0),
        "label_relabelled": label_summary.get("relabelled", 0),
        "label_review": label_summary.get("review_reason"),
        "version": registered["version"],
        "run_id": registered["run_id"],
        "metrics": {k: metrics[k] for k in SUMMARY_METRICS if k in metrics},
        "train_seconds": train_summary.get("train_seconds"),
        "best_epoch": train_summary.get("best_epoch"),
        "resumed_from_epoch": train_summary.get("resumed_from_epoch"),
        "gate": {"passed": verdict["passed"], "reasons": verdict["reasons"]},
        "champion_before": verdict.get("champion"),
        "promoted": promoted is not None,
        "work_dir": work,
    }


def summarize_unchanged(found: dict) -> dict:
    """The summary of a rerun on unchanged data and params: which version it would make
    again, that version's verdict and approval, and nothing trained or registered."""
    tags = found["tags"]
    return {
        "unchanged_since": found["version"],
        "version": found["version"],
        "data_version": tags.get("data_version"),
        "run_fingerprint": found["fingerprint"],
        "metrics": {k: float(tags[k]) for k in SUMMARY_METRICS if k in tags},
        "gate": {
            "passed": read_gate_passed(tags) is True,
            "reasons": json.loads(tags.get("gate_reasons", "[]")),
        },
        "approved_by": tags.get("approved_by"),
        "champion": found["champion"],
        "promoted": False,
    }


def format_unchanged(s: dict) -> str:
    v, champion = s["version"], s["champion"]
    verdict = "PASSED" if s["gate"]["passed"] else "FAILED"
    if champion == v:
        where = "it is the champion"
    elif s["gate"]["passed"]:
        where = f"approved by {s['approved_by']}" if s["approved_by"] else "awaiting approval"
    else:
        where = "it cannot be promoted"
    lines = [
        "vitrine retrain — nothing to do",
        f"  unchanged since version {v}: same data ({s['data_version']}) and params; "
        "nothing trained, nothing registered",
        "  metrics        " + ", ".join(f"{k} {x:.4f}" for k, x in s["metrics"].items()),
        f"  gate           {verdict} for version {v}; {where} (champion: {champion or 'none'})",
        *[f"    - {r}" for r in s["gate"]["reasons"] if not s["gate"]["passed"]],
        "next:",
        "  vitrine status                          # champion, challenger, verdict, approval",
        "  vitrine run --force                     # retrain anyway (e.g. vitrine's code changed)",
    ]
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    if s.get("unchanged_since"):
        return format_unchanged(s)
    m = s["metrics"]
    reasons = [f"    - {r}" for r in s["gate"]["reasons"]]
    by_reason = ", ".join(f"{k}: {v}" for k, v in sorted(s["quarantined_by_reason"].items()))
    lines = [
        "vitrine retrain — summary",
        f"  data version   {s['data_version']}",
        f"  catalogue      {s['ingested']} ingested, {s['accepted']} accepted, "
        f"{s['quarantined']} quarantined ({by_reason or 'none'})",
        f"  label issues   {s['label_issues']} found (policy {s['label_policy']}: "
        f"{s['label_dropped']} dropped, {s['label_relabelled']} relabelled)",
        *([f"                 {s['label_review']}"] if s.get("label_review") else []),
        f"  model          version {s['version']} (trained {s['train_seconds']} s, "
        f"best epoch {s['best_epoch']})",
        "  metrics        " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()),
        f"  gate           {'PASSED' if s['gate']['passed'] else 'FAILED'} "
        f"(vs champion {s['champion_before'] or 'none yet'})",
        *reasons,
    ]
    lines += next_steps(s)
    return "\n".join(lines)


def next_steps(s: dict) -> list[str]:
    """The promotion line and what to do next, following the verdict: serve a new champion,
    approve a passed challenger, or (a failed gate) fix what the reasons name; never approve
    a version that failed."""
    v = s["version"]
    if s["promoted"]:
        return [
            f"  promoted       version {v} is now champion (no champion before)",
            "next:",
            "  vitrine serve                           # the API + page on 127.0.0.1:3000",
            "  vitrine status                          # champion, challenger, verdict, approval",
            "  vitrine ui                              # MLflow UI + Prefect UI on 127.0.0.1",
        ]
    if s["gate"]["passed"]:
        return [
            f"  promotion      waiting for approval (tag approved_by on version {v})",
            "next:",
            "  vitrine ui                              # compare it with the champion in MLflow",
            f"  vitrine approve {v} --by NAME            # or tag approved_by in the MLflow UI",
            "  vitrine promote                         # moves champion to the approved version",
            "  vitrine status                          # champion, challenger, verdict, approval",
        ]
    champion = s.get("champion_before")
    keeps = f"version {champion} stays champion" if champion else "no champion is served"
    return [
        f"  promotion      none: version {v} failed the gate and cannot be approved; {keeps}",
        "next:",
        "  fix what the FAIL lines above name: more training (train.epochs), the data "
        "(quarantine, label issues), or the gate's policy in params.yaml if it is wrong",
        "  vitrine run                             # then train and gate again",
        f"  vitrine ui                              # version {v}'s run: metrics, shopper photos",
    ]
