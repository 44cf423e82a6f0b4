"""The short summary a retrain run ends with (JSON for machines, text for people)."""

from __future__ import annotations

from components.config import SUMMARY_METRICS


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


def format_summary(s: dict) -> str:
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
        f"  model          version {s['version']} (trained {s['train_seconds']} s, "
        f"best epoch {s['best_epoch']})",
        "  metrics        " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()),
        f"  gate           {'PASSED' if s['gate']['passed'] else 'FAILED'} "
        f"(vs champion {s['champion_before'] or 'none yet'})",
        *reasons,
    ]
    if s["promoted"]:
        lines.append(
            f"  promoted       version {s['version']} is now champion (no champion before)"
        )
    elif s["gate"]["passed"]:
        lines.append(
            f"  promotion      waiting for approval (tag approved_by on version {s['version']})"
        )
    else:
        lines.append("  promotion      none: the challenger failed the gate")
    lines += [
        "next:",
        "  vitrine ui                              # MLflow UI + Prefect UI on 127.0.0.1",
        f"  vitrine approve {s['version']} --by NAME            # or tag approved_by in the MLflow UI",
        "  vitrine promote                         # moves champion to the approved version",
        "  vitrine status                          # champion, challenger, verdict, approval",
    ]
    return "\n".join(lines)
