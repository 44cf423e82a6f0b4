"""The promotion gate, table-driven: one row per situation the flow must decide."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from components.config import DetectGatePolicy, GatePolicy, ShopperGatePolicy
from components.release.gate import (
    Candidate,
    Verdict,
    approver_refusal,
    decide,
    find_promotion_refusal,
    mcnemar_p_value,
    owner_approval,
    pick_promotion_candidate,
)

POLICY = GatePolicy(
    min_accuracy=0.85,
    min_recall_at_1=0.80,
    max_regression={"accuracy": 0.005, "macro_f1": 0.005, "recall_at_1": 0.01},
    max_latency_ms=25.0,
    significance_alpha=0.05,
)
GOOD = {"accuracy": 0.93, "macro_f1": 0.92, "recall_at_1": 0.88, "latency_ms": 5.0}
N = 1000


def paired(n_both: int, only_new: int, only_old: int, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays with the given concordant/discordant counts (rest wrong for both)."""
    new = np.zeros(n, dtype=bool)
    old = np.zeros(n, dtype=bool)
    new[:n_both] = old[:n_both] = True
    new[n_both : n_both + only_new] = True
    old[n_both + only_new : n_both + only_new + only_old] = True
    return new, old


SAME = paired(900, 10, 10)
WORSE = paired(850, 5, 60)  # challenger 855 correct vs champion 910: p << 0.05
SLIGHTLY_WORSE = paired(900, 8, 12)  # p ~ 0.5: not significant


def with_(**changes: float) -> dict[str, float]:
    return {**GOOD, **changes}


# id, challenger metrics, challenger correct, champion metrics (None = no champion),
# champion correct, expected pass, a fragment every expected FAIL reason must contain
CASES = [
    ("pass", GOOD, SAME[0], GOOD, SAME[1], True, None),
    (
        "accuracy_floor",
        with_(accuracy=0.84),
        SAME[0],
        with_(accuracy=0.84),
        SAME[1],
        False,
        "FAIL: accuracy 0.84 < floor 0.85",
    ),
    (
        "recall_floor",
        with_(recall_at_1=0.79),
        SAME[0],
        with_(recall_at_1=0.79),
        SAME[1],
        False,
        "FAIL: recall_at_1 0.79 < floor 0.8",
    ),
    (
        "latency_budget",
        with_(latency_ms=30.0),
        SAME[0],
        GOOD,
        SAME[1],
        False,
        "FAIL: latency_ms 30 > budget 25",
    ),
    (
        "accuracy_regression",
        with_(accuracy=0.92),
        SAME[0],
        GOOD,
        SAME[1],
        False,
        "FAIL: accuracy 0.92 regresses",
    ),
    (
        "macro_f1_regression",
        with_(macro_f1=0.91),
        SAME[0],
        GOOD,
        SAME[1],
        False,
        "FAIL: macro_f1 0.91 regresses",
    ),
    (
        "recall_regression",
        with_(recall_at_1=0.86),
        SAME[0],
        GOOD,
        SAME[1],
        False,
        "FAIL: recall_at_1 0.86 regresses 0.02 vs champion 0.88 (tolerance 0.01)",
    ),
    ("no_champion_pass", GOOD, None, None, None, True, None),
    (
        "no_champion_floor_fail",
        with_(accuracy=0.5),
        None,
        None,
        None,
        False,
        "FAIL: accuracy 0.5 < floor",
    ),
    ("significantly_worse", GOOD, WORSE[0], GOOD, WORSE[1], False, "significantly worse"),
    (
        "within_tolerance_not_significant",
        with_(accuracy=0.926, recall_at_1=0.875),
        SLIGHTLY_WORSE[0],
        GOOD,
        SLIGHTLY_WORSE[1],
        True,
        None,
    ),
    ("missing_correct", GOOD, None, GOOD, SAME[1], False, "cannot compare: different test sets"),
    (
        "different_lengths",
        GOOD,
        SAME[0][:500],
        GOOD,
        SAME[1],
        False,
        "cannot compare: different test sets",
    ),
]


@pytest.mark.parametrize(
    ("challenger", "new_correct", "champion", "old_correct", "passed", "fragment"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(challenger, new_correct, champion, old_correct, passed, fragment):
    champ = None if champion is None else Candidate("1", champion, old_correct)
    verdict = decide(Candidate("2", challenger, new_correct), champ, POLICY)
    assert verdict.passed is passed, verdict.reasons
    failures = [r for r in verdict.reasons if r.startswith("FAIL")]
    if passed:
        assert failures == []
    else:
        assert len(failures) == 1, failures  # each row isolates exactly one failing reason
        assert fragment in failures[0], failures
    if champion is None:
        assert "no champion yet: floors only" in verdict.reasons
        assert not any("champion " in r for r in verdict.reasons if "no champion" not in r)


def test_reasons_cover_every_check_when_passing():
    verdict = decide(Candidate("2", GOOD, SAME[0]), Candidate("1", GOOD, SAME[1]), POLICY)
    # 3 floors/budget + 3 regression metrics + 1 significance test
    assert len(verdict.reasons) == 7
    assert any(r.startswith("accuracy 0.93 >= floor 0.85") for r in verdict.reasons)
    assert any(r.startswith("not significantly worse") for r in verdict.reasons)


def test_significantly_better_challenger_passes():
    better_new, better_old = paired(850, 60, 5)
    verdict = decide(Candidate("2", GOOD, better_new), Candidate("1", GOOD, better_old), POLICY)
    assert verdict.passed, verdict.reasons


def test_missing_metric_fails():
    metrics = {k: v for k, v in GOOD.items() if k != "latency_ms"}
    verdict = decide(Candidate("2", metrics), None, POLICY)
    assert not verdict.passed
    assert any("latency_ms missing" in r for r in verdict.reasons)


def test_verdict_to_dict_round_trips():
    verdict = Verdict(passed=False, reasons=["FAIL: x"])
    assert verdict.to_dict() == {"passed": False, "reasons": ["FAIL: x"]}


def test_mcnemar_identical_arrays_is_one():
    new, _ = paired(900, 0, 0)
    assert mcnemar_p_value(new, new.copy()) == 1.0


def test_mcnemar_is_symmetric():
    new, old = paired(800, 30, 50)
    assert mcnemar_p_value(new, old) == pytest.approx(mcnemar_p_value(old, new))


def test_mcnemar_exact_for_few_discordant_pairs():
    new, old = paired(900, 1, 9)  # 10 discordant: exact binomial
    expected = stats.binomtest(1, 10, 0.5).pvalue
    assert mcnemar_p_value(new, old) == pytest.approx(expected)
    assert mcnemar_p_value(new, old) < 0.05


def test_mcnemar_chi2_with_continuity_for_many_discordant_pairs():
    new, old = paired(800, 40, 60)  # chi2 = (|40-60|-1)^2 / 100 = 3.61
    assert mcnemar_p_value(new, old) == pytest.approx(stats.chi2.sf(3.61, 1))
    assert 0.05 < mcnemar_p_value(new, old) < 0.06


def test_mcnemar_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        mcnemar_p_value(np.ones(3, bool), np.ones(4, bool))


PASSED = {"gate_passed": "true", "approval": "pending"}
APPROVED = {**PASSED, "approved_by": "alice"}
BY_NON_OWNER = {**PASSED, "approved_by": "mallory"}
BY_LOOP = {**PASSED, "approved_by": "vitrine"}
FAILED = {"gate_passed": "false", "gate_reasons": '["FAIL: accuracy 0.5 < floor 0.85"]'}
OWNERS = ("alice", "bob")
NOT_OWNER = "is not an owner (params.yaml promotion.owners: alice, bob)"

# id, version, champion, tags, bootstrap, floors_passed, expected refusal fragment (None = ok)
PROMOTION_CASES = [
    ("approved", "2", "1", APPROVED, False, None, None),
    ("approved_by_other_owner", "2", "1", {**PASSED, "approved_by": "bob"}, False, None, None),
    ("not_approved", "2", "1", PASSED, False, None, "not approved: an owner sets"),
    ("non_owner", "2", "1", BY_NON_OWNER, False, None, f"approved_by 'mallory' {NOT_OWNER}"),
    ("loop_account", "2", "1", BY_LOOP, False, None, f"approved_by 'vitrine' {NOT_OWNER}"),
    ("owner_case_differs", "2", "1", {**PASSED, "approved_by": "Alice"}, False, None, "'Alice'"),
    ("failed_gate", "2", "1", {**FAILED, "approved_by": "alice"}, False, None, "failed the gate"),
    ("failed_gate_bootstrap", "1", None, FAILED, True, True, "failed the gate"),
    ("never_gated", "2", "1", {"approved_by": "alice"}, False, None, "no gate verdict"),
    ("bootstrap", "1", None, PASSED, True, True, None),
    ("bootstrap_non_owner_tag", "1", None, BY_NON_OWNER, True, True, None),
    ("bootstrap_from_recorded_verdict", "1", None, PASSED, True, None, None),
    ("bootstrap_floors_failed", "1", None, PASSED, True, False, "not approved"),
    ("bootstrap_off", "1", None, PASSED, False, True, "not approved"),
    ("already_champion", "1", "1", APPROVED, False, None, "already the champion"),
]


@pytest.mark.parametrize(
    ("version", "champion", "tags", "bootstrap", "floors", "fragment"),
    [case[1:] for case in PROMOTION_CASES],
    ids=[case[0] for case in PROMOTION_CASES],
)
def test_find_promotion_refusal(version, champion, tags, bootstrap, floors, fragment):
    refusal = find_promotion_refusal(
        version, champion, tags, bootstrap=bootstrap, floors_passed=floors, owners=OWNERS
    )
    if fragment is None:
        assert refusal is None
    else:
        assert fragment in refusal


def test_with_no_owners_listed_no_approval_counts():
    refusal = find_promotion_refusal(
        "2", "1", APPROVED, bootstrap=False, floors_passed=None, owners=()
    )
    assert "'alice' is not an owner (params.yaml promotion.owners: none listed)" in refusal


# name, expected refusal fragment (None = may approve)
APPROVER_CASES = [
    ("alice", None),
    ("mallory", "'mallory' is not an owner (params.yaml promotion.owners: alice, bob): only an"),
    ("vitrine", "'vitrine' is the loop's own account (promotion.loop_account): it cannot approve"),
    ("", "'' is not an owner"),
]


@pytest.mark.parametrize(("name", "fragment"), APPROVER_CASES)
def test_approver_refusal(name, fragment):
    refusal = approver_refusal(name, OWNERS, loop_account="vitrine")
    assert refusal is None if fragment is None else fragment in refusal


def test_the_loop_is_refused_even_if_listed():
    assert "loop's own account" in approver_refusal("vitrine", ("vitrine",), "vitrine")


def test_owner_approval():
    assert owner_approval(APPROVED, OWNERS) == "alice"
    assert owner_approval(BY_NON_OWNER, OWNERS) is None
    assert owner_approval(PASSED, OWNERS) is None


def test_pick_promotion_candidate():
    rows = [
        {"version": "1", "tags": APPROVED},
        {"version": "2", "tags": PASSED},
        {"version": "3", "tags": {**APPROVED, "rolled_back": "true"}},
        {"version": "4", "tags": {**FAILED, "approved_by": "alice"}},
        {"version": "5", "tags": BY_NON_OWNER},
        {"version": "6", "tags": BY_LOOP},
    ]

    def pick(rows, champion, bootstrap=False, floors_passed=None, owners=OWNERS):
        return pick_promotion_candidate(
            rows, champion, bootstrap=bootstrap, floors_passed=floors_passed, owners=owners
        )

    assert pick(rows, None) == "1"  # 5 and 6 are newer, but approved by no owner
    assert pick(rows, "1") is None  # 2 lacks approval; 5 and 6 lack an owner's
    assert pick(rows, None, owners=("mallory",)) == "5"
    rows.append({"version": "10", "tags": APPROVED})
    assert pick(rows, "1") == "10"  # numeric, not lexical
    assert pick(rows[1:2], None, bootstrap=True) == "2"
    assert pick(rows[1:2], None, bootstrap=True, floors_passed=False) is None


# ---------------------------------------------------------------- the shopper-style set

SHOPPER_POLICY = GatePolicy(
    **{
        **POLICY.model_dump(),
        "shopper": ShopperGatePolicy(
            min_accuracy={"phone": 0.80, "white_background": 0.85},
            min_recall_at_1=0.70,
            max_regression={"accuracy": 0.02, "recall_at_1": 0.02},
        ),
    }
)


def shopper(**per_shift: tuple[float, float]) -> dict[str, float]:
    """GOOD plus shopper_<shift>_accuracy / _recall_at_1 for each (accuracy, recall) given."""
    out = dict(GOOD)
    for shift, (accuracy, recall) in per_shift.items():
        out[f"shopper_{shift}_accuracy"], out[f"shopper_{shift}_recall_at_1"] = accuracy, recall
    return out


BOTH = {"phone": (0.90, 0.85), "white_background": (0.92, 0.88)}
# id, challenger metrics, champion metrics (None = no champion), passes, FAIL fragment
SHOPPER_CASES = [
    ("pass", shopper(**BOTH), shopper(**BOTH), True, None),
    ("pass_no_champion", shopper(**BOTH), None, True, None),
    (
        "shift_floor",
        shopper(**{**BOTH, "phone": (0.79, 0.85)}),
        None,
        False,
        "FAIL: shopper phone accuracy 0.79 < floor 0.8",
    ),
    (
        "per_shift_floor_differs",  # 0.84 passes phone's floor (0.80), fails white's (0.85)
        shopper(phone=(0.84, 0.85), white_background=(0.84, 0.85)),
        None,
        False,
        "FAIL: shopper white_background accuracy 0.84 < floor 0.85",
    ),
    (
        "recall_floor",
        shopper(**{**BOTH, "white_background": (0.92, 0.60)}),
        None,
        False,
        "FAIL: shopper white_background recall_at_1 0.6 < floor 0.7",
    ),
    (
        "regresses_on_one_shift",  # in-domain equal, phone 0.03 worse than the champion
        shopper(**{**BOTH, "phone": (0.87, 0.85)}),
        shopper(**BOTH),
        False,
        "FAIL: shopper phone accuracy 0.87 regresses 0.03 vs champion 0.9",
    ),
    (
        "within_tolerance",
        shopper(**{**BOTH, "phone": (0.885, 0.84)}),
        shopper(**BOTH),
        True,
        None,
    ),
    (
        "champion_without_shopper_results",  # registered before them: floors only
        shopper(**BOTH),
        dict(GOOD),
        True,
        None,
    ),
    (
        "challenger_without_shopper_results",
        dict(GOOD),
        shopper(**BOTH),
        False,
        "FAIL: shopper-style results missing",
    ),
]


@pytest.mark.parametrize(
    "challenger, champion, passed, fragment",
    [case[1:] for case in SHOPPER_CASES],
    ids=[case[0] for case in SHOPPER_CASES],
)
def test_decide_on_shopper_shifts(challenger, champion, passed, fragment):
    old = None if champion is None else Candidate("1", champion, SAME[1])
    verdict = decide(Candidate("2", challenger, SAME[0]), old, SHOPPER_POLICY)
    assert verdict.passed is passed, verdict.reasons
    if fragment:
        assert any(fragment in reason for reason in verdict.reasons), verdict.reasons
    else:
        assert any(reason.startswith("shopper-style:") for reason in verdict.reasons)


def audit_tag(action: str, to: str, at: str) -> dict:
    record = {"action": action, "from": None, "to": to, "at": at}
    return {f"audit_{at}": json.dumps(record)}


@pytest.mark.parametrize(
    ("alias", "tags_by_version", "refused"),
    [
        (None, {}, None),  # nothing promoted, no alias: nothing to refuse
        ("1", {"1": audit_tag("promote", "1", "2026-12-01T10:00")}, None),
        ("2", {"1": audit_tag("promote", "1", "2026-12-01T10:00")}, "moved to version 2"),
        (None, {"1": audit_tag("promote", "1", "2026-12-01T10:00")}, "removed"),
        ("3", {}, "vitrine never promoted"),
        (  # promoted to 2, then rolled back to 1: the rollback is the newest record
            "1",
            {
                "1": audit_tag("promote", "1", "2026-12-01T10:00")
                | audit_tag("rollback", "1", "2026-12-03T10:00"),
                "2": audit_tag("promote", "2", "2026-12-02T10:00"),
            },
            None,
        ),
        (  # an older audited version is not enough: 2's promotion is the newest record
            "1",
            {
                "1": audit_tag("promote", "1", "2026-12-01T10:00"),
                "2": audit_tag("promote", "2", "2026-12-02T10:00"),
            },
            "moved to version 1",
        ),
    ],
)
def test_only_the_last_audited_promotion_is_served(alias, tags_by_version, refused):
    from components.release.gate import alias_refusal, last_audited

    versions = [{"version": v, "tags": tags} for v, tags in tags_by_version.items()]
    reason = alias_refusal(alias, last_audited(versions))
    assert (reason is None) if refused is None else (refused in reason)


DETECT_POLICY = GatePolicy(
    **{**POLICY.model_dump(), "detect": DetectGatePolicy(min_map50=0.8, max_regression=0.03)}
)
# id, challenger's mAP@0.5 (None: no detector), champion's (None: none), passes, FAIL fragment
DETECT_CASES = [
    ("pass", 0.91, 0.90, True, "detector mAP@0.5 0.91 >= floor 0.8, champion 0.9"),
    ("pass_no_champion_detector", 0.85, None, True, "detector mAP@0.5 0.85 >= floor 0.8"),
    ("below_floor", 0.79, None, False, "FAIL: detector mAP@0.5 0.79 < floor 0.8"),
    ("within_tolerance", 0.875, 0.90, True, "detector mAP@0.5 0.875"),
    (
        "regresses",
        0.86,
        0.90,
        False,
        "FAIL: detector mAP@0.5 0.86 regresses 0.04 versus the champion's 0.9 (tolerance 0.03)",
    ),
    ("no_detector_with_a_floor", None, 0.90, False, "FAIL: no detector results"),
]


@pytest.mark.parametrize(
    "new, old, passed, fragment",
    [case[1:] for case in DETECT_CASES],
    ids=[case[0] for case in DETECT_CASES],
)
def test_decide_on_the_detector(new, old, passed, fragment):
    with_map = lambda value: GOOD | ({} if value is None else {"detect_map50": value})  # noqa: E731
    verdict = decide(
        Candidate("2", with_map(new), SAME[0]),
        Candidate("1", with_map(old), SAME[1]),
        DETECT_POLICY,
    )
    assert verdict.passed is passed, verdict.reasons
    assert any(fragment in reason for reason in verdict.reasons), verdict.reasons


def test_without_a_floor_a_version_without_detector_passes_silently():
    verdict = decide(Candidate("2", dict(GOOD), SAME[0]), Candidate("1", GOOD, SAME[1]), POLICY)
    assert verdict.passed and not any("detector" in r for r in verdict.reasons)
