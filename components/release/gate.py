"""The promotion gate: a pure decision on a challenger versus the champion.

No MLflow, no I/O: metrics and per-image correctness in, a Verdict out. The flow reads the
inputs from the registry, calls `decide`, and records the verdict on the version.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from components.config import SHOPPER_SHIFTS, DetectGatePolicy, GatePolicy, ShopperGatePolicy

EXACT_TEST_MAX_DISCORDANT = 25  # below this many discordant pairs use the exact binomial test


@dataclass(frozen=True)
class Candidate:
    """One model's results on the frozen test set."""

    version: str | None
    metrics: dict[str, float]
    correct: np.ndarray | None = None  # bool per test image, same set and order for both arms


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def mcnemar_p_value(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> float:
    """Two-sided McNemar p-value for paired correctness arrays of the same length.

    Exact binomial on the discordant pairs when they are few, otherwise chi-squared with
    continuity correction. No discordant pairs at all -> 1.0.
    """
    a = np.asarray(challenger_correct, dtype=bool)
    b = np.asarray(champion_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    only_challenger = int(np.sum(a & ~b))
    only_champion = int(np.sum(~a & b))
    discordant = only_challenger + only_champion
    if discordant == 0:
        return 1.0
    if discordant < EXACT_TEST_MAX_DISCORDANT:
        return float(stats.binomtest(only_challenger, discordant, 0.5).pvalue)
    statistic = (abs(only_challenger - only_champion) - 1) ** 2 / discordant
    return float(stats.chi2.sf(statistic, df=1))


def check_floors(metrics: dict[str, float], policy: GatePolicy) -> list[tuple[bool, str]]:
    """Absolute floors and the latency budget: (ok, reason) per check."""
    checks = [
        ("accuracy", policy.min_accuracy, ">="),
        ("recall_at_1", policy.min_recall_at_1, ">="),
        ("latency_ms", policy.max_latency_ms, "<="),
    ]
    results = []
    for name, bound, op in checks:
        value = metrics.get(name)
        kind = "floor" if op == ">=" else "budget"
        if value is None:
            results.append((False, f"FAIL: {name} missing (needs {op} {kind} {bound:g})"))
            continue
        ok = value >= bound if op == ">=" else value <= bound
        bad_op = "<" if op == ">=" else ">"
        text = f"{name} {value:.4g} {op if ok else bad_op} {kind} {bound:g}"
        results.append((ok, text if ok else f"FAIL: {text}"))
    return results


def check_regressions(
    challenger: dict[str, float], champion: dict[str, float], policy: GatePolicy
) -> list[tuple[bool, str]]:
    """No metric in policy.max_regression may drop more than its tolerance."""
    results = []
    for name, tolerance in policy.max_regression.items():
        new, old = challenger.get(name), champion.get(name)
        if new is None or old is None:
            results.append((False, f"FAIL: {name} cannot compare (missing on one side)"))
            continue
        drop = old - new
        if drop > tolerance + 1e-12:
            text = (
                f"FAIL: {name} {new:.4g} regresses {drop:.4g} vs champion {old:.4g} "
                f"(tolerance {tolerance:g})"
            )
            results.append((False, text))
        else:
            change = f"change {-drop:+.4g}, tolerance {tolerance:g}"
            results.append((True, f"{name} {new:.4g} vs champion {old:.4g} ({change})"))
    return results


def shopper_shifts(metrics: dict[str, float]) -> list[str]:
    """The shifts a metrics dict holds shopper-style results for (shopper_<shift>_accuracy)."""
    return [shift for shift in SHOPPER_SHIFTS if f"shopper_{shift}_accuracy" in metrics]


def check_shopper(
    challenger: dict[str, float], champion: dict[str, float] | None, policy: ShopperGatePolicy
) -> list[tuple[bool, str]]:
    """Per shift of the shopper-style set: the floors of accuracy and Recall@1, and (with a
    champion measured on the same photos) no drop beyond policy.max_regression. A champion
    without shopper-style results (registered before them) is compared on floors only."""
    results = []
    shifts = shopper_shifts(challenger)
    if not shifts:
        floors = [policy.floor(m, s) for m in ("accuracy", "recall_at_1") for s in SHOPPER_SHIFTS]
        if any(floors):
            return [(False, "FAIL: shopper-style results missing (the gate has shift floors)")]
        return []
    for shift in shifts:
        for metric in ("accuracy", "recall_at_1"):
            value, bound = challenger.get(f"shopper_{shift}_{metric}"), policy.floor(metric, shift)
            if value is not None and value < bound:
                results.append(
                    (False, f"FAIL: shopper {shift} {metric} {value:.4g} < floor {bound:g}")
                )
    if champion is not None and shopper_shifts(champion):
        for shift in shifts:
            for metric, tolerance in policy.max_regression.items():
                new = challenger.get(f"shopper_{shift}_{metric}")
                old = champion.get(f"shopper_{shift}_{metric}")
                if new is None or old is None:
                    continue
                if old - new > tolerance + 1e-12:
                    results.append(
                        (
                            False,
                            f"FAIL: shopper {shift} {metric} {new:.4g} regresses {old - new:.4g} "
                            f"vs champion {old:.4g} (tolerance {tolerance:g})",
                        )
                    )
    worst = min(shifts, key=lambda s: challenger[f"shopper_{s}_accuracy"])
    if all(ok for ok, _ in results):
        versus = "" if champion is None or not shopper_shifts(champion) else ", none regresses"
        results.append(
            (
                True,
                f"shopper-style: {len(shifts)} shifts above their floors{versus} (worst "
                f"{worst} accuracy {challenger[f'shopper_{worst}_accuracy']:.4g})",
            )
        )
    return results


def check_detection(
    challenger: dict[str, float], champion: dict[str, float] | None, policy: DetectGatePolicy
) -> list[tuple[bool, str]]:
    """The detector on the held-out scenes: mAP@0.5 at or above its floor, and (when the
    champion detects too, measured on the same scenes) no drop beyond the tolerance."""
    new = challenger.get("detect_map50")
    if new is None:
        if policy.min_map50 > 0:
            why = "the gate has a floor on mAP@0.5; detect.enabled, or gate.detect.min_map50: 0"
            return [(False, f"FAIL: no detector results ({why})")]
        return []  # a version without a detector, and no floor asks for one
    if new < policy.min_map50:
        return [(False, f"FAIL: detector mAP@0.5 {new:.4g} < floor {policy.min_map50:g}")]
    old = None if champion is None else champion.get("detect_map50")
    if old is not None and old - new > policy.max_regression + 1e-12:
        return [
            (
                False,
                f"FAIL: detector mAP@0.5 {new:.4g} regresses {old - new:.4g} versus the "
                f"champion's {old:.4g} (tolerance {policy.max_regression:g})",
            )
        ]
    versus = "" if old is None else f", champion {old:.4g} on the same scenes"
    return [(True, f"detector mAP@0.5 {new:.4g} >= floor {policy.min_map50:g}{versus}")]


def check_significance(
    challenger: np.ndarray | None, champion: np.ndarray | None, alpha: float
) -> tuple[bool, str]:
    """Paired McNemar test: fail only if the challenger is significantly worse."""
    if challenger is None or champion is None or np.shape(challenger) != np.shape(champion):
        return False, "FAIL: cannot compare: different test sets (paired correctness missing)"
    p = mcnemar_p_value(challenger, champion)
    n_new, n_old = int(np.sum(challenger)), int(np.sum(champion))
    detail = f"McNemar p={p:.3g}, {n_new} vs {n_old} correct of {len(challenger)}"
    if p < alpha and n_new < n_old:
        return False, f"FAIL: significantly worse than champion ({detail}, alpha {alpha:g})"
    return True, f"not significantly worse than champion ({detail}, alpha {alpha:g})"


def check_compression(
    variant: str, fp32: dict[str, float], compressed: dict[str, float], tolerance: float
) -> tuple[bool, str]:
    """A compressed variant may lose at most `tolerance` accuracy (absolute) against its own fp32
    weights on the same frozen test split; otherwise it is refused and never served."""
    old, new = fp32.get("accuracy"), compressed.get("accuracy")
    if old is None or new is None:
        return False, f"refused: {variant} accuracy cannot be compared (missing on one side)"
    drop = old - new
    detail = (
        f"{variant} accuracy {new:.4f} vs fp32 {old:.4f} (loss {drop:+.4f}, tolerance "
        f"{tolerance:g})"
    )
    if "recall_at_1" in fp32 and "recall_at_1" in compressed:
        detail += f", recall_at_1 {compressed['recall_at_1']:.4f} vs {fp32['recall_at_1']:.4f}"
    if drop > tolerance + 1e-12:
        return False, f"refused: {detail}"
    return True, f"accepted: {detail}"


def decide(challenger: Candidate, champion: Candidate | None, policy: GatePolicy) -> Verdict:
    """Apply every check; the challenger passes only if all of them pass."""
    results = check_floors(challenger.metrics, policy)
    if champion is None:
        results.append((True, "no champion yet: floors only"))
    else:
        results += check_regressions(challenger.metrics, champion.metrics, policy)
        results.append(
            check_significance(challenger.correct, champion.correct, policy.significance_alpha)
        )
    results += check_shopper(
        challenger.metrics, None if champion is None else champion.metrics, policy.shopper
    )
    results += check_detection(
        challenger.metrics, None if champion is None else champion.metrics, policy.detect
    )
    return Verdict(passed=all(ok for ok, _ in results), reasons=[text for _, text in results])


# ---------------------------------------------------------------- promotion eligibility
# Pure rules over version tags (as the registry stores them); the registry applies them.


def read_gate_passed(tags: dict[str, str]) -> bool | None:
    """The recorded verdict: True / False, or None when the version was never gated."""
    return {"true": True, "false": False}.get(tags.get("gate_passed", ""))


def owner_approval(tags: dict[str, str], owners: Collection[str]) -> str | None:
    """The owner who approved (the `approved_by` tag), or None: unapproved, or the name is not
    in `owners` (params.yaml promotion.owners). Only an owner's approval counts."""
    name = tags.get("approved_by")
    return name if name and name in owners else None


def approver_refusal(name: str, owners: Collection[str], loop_account: str) -> str | None:
    """Why `name` may not approve a version, or None when it may (an owner, never the loop)."""
    if name == loop_account:
        return (
            f"{name!r} is the loop's own account (promotion.loop_account): it cannot approve; "
            "an owner must"
        )
    return None if name in owners else f"{not_an_owner(name, owners)}: only an owner can approve"


def not_an_owner(name: str, owners: Collection[str]) -> str:
    listed = ", ".join(sorted(owners)) or "none listed"
    return f"{name!r} is not an owner (params.yaml promotion.owners: {listed})"


def find_promotion_refusal(
    version: str,
    champion: str | None,
    tags: dict[str, str],
    *,
    bootstrap: bool,
    floors_passed: bool | None,
    owners: Collection[str],
) -> str | None:
    """Why `version` may not become champion, or None when it may.

    It needs the gate and the approval of one of `owners`. `bootstrap` means: no champion
    exists yet and the policy allows a first promotion without approval, provided the floors
    passed (`floors_passed`, else the recorded verdict).
    """
    gate = read_gate_passed(tags)
    if version == champion:
        return f"version {version} is already the champion"
    if gate is False:
        return f"version {version} failed the gate: {tags.get('gate_reasons', '')}"
    if gate is True and owner_approval(tags, owners):
        return None
    if bootstrap and (floors_passed if floors_passed is not None else gate is True):
        return None
    if gate is None:
        return f"version {version} has no gate verdict yet"
    if tags.get("approved_by"):
        return (
            f"version {version} is not approved by an owner: approved_by "
            f"{not_an_owner(tags['approved_by'], owners)}; an owner must approve it"
        )
    return (
        f"version {version} is not approved: an owner sets the version tag approved_by "
        "(MLflow UI or `vitrine approve`) before promotion"
    )


def pick_promotion_candidate(
    versions: list[dict],
    champion: str | None,
    *,
    bootstrap: bool,
    floors_passed: bool | None,
    owners: Collection[str],
) -> str | None:
    """Newest version newer than the champion that passed the gate and an owner approved.

    `versions` holds {"version", "tags"} rows. Rolled-back versions are skipped (only an
    explicit promote brings them back). With `bootstrap`, an unapproved one qualifies too.
    """
    newer = sorted(
        (
            row
            for row in versions
            if (champion is None or int(row["version"]) > int(champion))
            and read_gate_passed(row["tags"]) is True
            and row["tags"].get("rolled_back") != "true"
        ),
        key=lambda row: int(row["version"]),
        reverse=True,
    )
    approved = [row["version"] for row in newer if owner_approval(row["tags"], owners)]
    if approved:
        return str(approved[0])
    if bootstrap and newer and floors_passed is not False:
        return str(newer[0]["version"])
    return None


AUDIT_TAG_PREFIX = "audit_"  # version tags written by vitrine's promote / rollback (registry.py)


def last_audited(versions: list[dict]) -> dict | None:
    """The newest audit record (a promote or rollback by vitrine) in the versions' tags."""
    records = [
        json.loads(value)
        for row in versions
        for key, value in row["tags"].items()
        if key.startswith(AUDIT_TAG_PREFIX)
    ]
    return max(records, key=lambda record: record["at"], default=None)


def alias_refusal(alias: str | None, audited: dict | None) -> str | None:
    """Why the version the `champion` alias names may not be served, or None when it may.

    Only vitrine's promotion moves the alias after the gate and an owner's approval, and it
    writes an audit record; an alias that does not name the last audited promotion's version
    was moved some other way (the MLflow UI's alias editor, the API)."""
    if audited is None:
        if alias is None:
            return None
        return f"the champion alias names version {alias}, but vitrine never promoted a version"
    if alias == audited["to"]:
        return None
    moved = f"moved to version {alias}" if alias is not None else "removed"
    return (
        f"the champion alias was {moved} outside vitrine's promotion; the last audited "
        f"{audited['action']} (at {audited['at']}) made version {audited['to']} champion, "
        "which is served; `vitrine promote` or `vitrine rollback` repairs the alias"
    )
