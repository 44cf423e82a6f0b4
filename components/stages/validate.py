"""The validate stage: Great Expectations over the (sliced) catalogue; failing rows are
quarantined with their reason, and too large a share stops the run before training."""

from __future__ import annotations

from components.data import catalogue, validation
from components.stages.context import (
    RunContext,
)


def run(ctx: RunContext) -> dict:
    """Validate the (sliced) catalogue; quarantine failing rows; stop if too many fail."""
    params = ctx.params
    manifest = catalogue.read_manifest(ctx.catalogue_dir)
    manifest = catalogue.stratified_slice(manifest, params.data.limit, params.data.seed)
    out = ctx.stage_dir("validate")
    result = validation.validate_catalogue(
        manifest, ctx.catalogue_dir, params.data.categories, params.validation, out / "docs"
    )
    validation.write_validation_outputs(result, out)
    validation.check_quarantine_share(result, params.validation.max_quarantine_share)
    return result.report
