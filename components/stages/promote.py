"""The promote stage: an approved, gate-passed challenger becomes champion (audited); with no
champion yet, a version over the floors may bootstrap without approval."""

from __future__ import annotations

from components.config import Params
from components.release.registry import Registry, open_registry
from components.stages.context import (
    RunContext,
    read_json,
)


def floors_passed(metrics: dict, params: Params) -> bool:
    return bool(
        metrics["accuracy"] >= params.gate.min_accuracy
        and metrics["recall_at_1"] >= params.gate.min_recall_at_1
    )


def bootstrap(ctx: RunContext, verdict: dict, registry: Registry | None = None) -> dict | None:
    """With no champion yet, a version over the floors becomes champion without approval
    (when params.promotion.bootstrap_without_approval); otherwise it waits for an owner."""
    registry = registry or open_registry(ctx.paths, ctx.params)
    if registry.alias_version("champion") is not None or not verdict["passed"]:
        return None
    if not ctx.params.promotion.bootstrap_without_approval:
        return None
    metrics = read_json(ctx.work / "evaluate" / "metrics.json")
    return registry.promote(
        verdict["version"],
        bootstrap_without_approval=True,
        floors_passed=floors_passed(metrics, ctx.params),
    )


def run(
    ctx: RunContext, version: str | None = None, registry: Registry | None = None
) -> dict | None:
    """`vitrine promote` / the promote flow: approved + gate-passed → champion; with
    params.promotion.require_ab the challenger also needs a finished, healthy online A/B period."""
    check = None
    if ctx.params.promotion.require_ab:
        from components.serving.ab import ab_verdict, read_ab_log, summarise_arms

        def check(candidate: str) -> str | None:
            summary = summarise_arms(read_ab_log(ctx.paths.home / "requests"))
            passed, reasons = ab_verdict(summary, candidate, ctx.params.serving.ab)
            return None if passed else "A/B gate: " + "; ".join(reasons)

    registry = registry or open_registry(ctx.paths, ctx.params)
    return registry.promote(version, extra_check=check)
