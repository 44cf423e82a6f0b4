"""The run summary's next steps follow the verdict (components/stages/summary.py)."""

from __future__ import annotations

import pytest

from components.stages.summary import format_summary, summarize_unchanged


def summary(passed: bool, promoted: bool, champion: str | None) -> dict:
    reasons = ["PASS: accuracy 0.93 >= 0.85"] if passed else ["FAIL: accuracy 0.41 < floor 0.85"]
    return {
        "data_version": "abc",
        "ingested": 10,
        "accepted": 10,
        "quarantined": 0,
        "quarantined_by_reason": {},
        "label_issues": 2,
        "label_policy": "review",
        "label_dropped": 0,
        "label_relabelled": 0,
        "label_review": "10 training rows < labels.review_below_rows (10000): drop not applied",
        "version": "3",
        "metrics": {"accuracy": 0.93 if passed else 0.41},
        "train_seconds": 5,
        "best_epoch": 2,
        "gate": {"passed": passed, "reasons": reasons},
        "champion_before": champion,
        "promoted": promoted,
    }


def next_block(text: str) -> str:
    return text.split("\nnext:\n", 1)[1]


def test_a_failed_gate_says_why_and_never_approve():
    text = format_summary(summary(passed=False, promoted=False, champion="2"))
    assert "FAIL: accuracy 0.41 < floor 0.85" in text
    assert "version 3 failed the gate and cannot be approved; version 2 stays champion" in text
    steps = next_block(text)
    assert "approve" not in steps and "promote" not in steps
    assert "train.epochs" in steps and "vitrine run" in steps


@pytest.mark.parametrize(
    ("passed", "promoted", "wanted", "unwanted"),
    [
        (True, False, "vitrine approve 3 --by NAME", "vitrine serve"),
        (True, True, "vitrine serve", "vitrine approve"),
    ],
)
def test_a_passed_gate_leads_to_approval_or_serving(passed, promoted, wanted, unwanted):
    text = format_summary(summary(passed, promoted, champion=None if promoted else "2"))
    assert wanted in next_block(text) and unwanted not in next_block(text)
    assert "drop not applied" in text  # the review queue's reason is in the summary


def unchanged(passed: bool, champion: str | None, approved_by: str | None = None) -> dict:
    tags = {
        "data_version": "abc",
        "accuracy": "0.9300",
        "gate_passed": "true" if passed else "false",
        "gate_reasons": '["FAIL: accuracy 0.41 < floor 0.85"]' if not passed else "[]",
        **({"approved_by": approved_by} if approved_by else {}),
    }
    return summarize_unchanged(
        {"version": "3", "tags": tags, "fingerprint": "f" * 32, "champion": champion}
    )


@pytest.mark.parametrize(
    ("passed", "champion", "approved_by", "wanted"),
    [
        (True, "3", None, "it is the champion"),
        (True, "2", None, "awaiting approval"),
        (True, "2", "ana", "approved by ana"),
        (False, "2", None, "it cannot be promoted"),
    ],
)
def test_an_unchanged_rerun_names_the_version_it_would_make_again(
    passed, champion, approved_by, wanted
):
    s = unchanged(passed, champion, approved_by)
    assert s["unchanged_since"] == "3" and s["metrics"] == {"accuracy": 0.93}
    text = format_summary(s)
    assert "unchanged since version 3" in text and "nothing registered" in text
    assert wanted in text
    assert ("FAIL: accuracy 0.41" in text) is not passed
    assert "vitrine run --force" in next_block(text) and "approve" not in next_block(text)
