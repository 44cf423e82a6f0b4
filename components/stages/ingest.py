"""The ingest stage: a catalogue source into data/catalogue, versioned with DVC; and the
scheduled refresh that re-ingests only when the source changed (components/data/sources.py)."""

from __future__ import annotations

from pathlib import Path

from components.data import catalogue, sources, versioning
from components.stages.context import RunContext, data_version, dvc_tracked


def run(ctx: RunContext, source: str | None = None) -> dict:
    """Ingest the catalogue source into the catalogue folder and version it: with DVC when the
    folder is the repository's data/catalogue, else by its manifest digest."""
    data = ctx.params.data
    fmnist = sources.fashion_mnist_dir(data, ctx.paths)
    manifest = catalogue.ingest_catalogue(
        source or data.source,
        ctx.catalogue_dir,
        data.categories,
        fashion_mnist_dir=fmnist,
        test_fraction=data.test_fraction,
    )
    # DVC versions the repository's data/ folder; it must not `dvc add` a data/ that does not
    # hold this catalogue (a worker host's own catalogue folder: the manifest digest names it)
    if dvc_tracked(ctx):
        version = versioning.track_data(ctx.repo, ctx.paths.dvc_remote)
    else:
        version = data_version(ctx)
    # which source, in which state: scheduled retrains re-check it
    source = source or data.source
    source = source if source == "fashion-mnist" else str(Path(source).resolve())
    sources.record_source(
        ctx.paths, ctx.catalogue_dir, source, sources.source_fingerprint(source, fmnist)
    )
    return {"ingested": len(manifest), "data_version": version}


def refresh(ctx: RunContext) -> dict:
    """Re-ingest (and DVC-version) the catalogue when its source changed; else keep it."""
    source, reason = sources.refresh_reason(ctx.params.data, ctx.paths, ctx.catalogue_dir)
    if reason is None:
        return {
            "reingested": False,
            "reason": f"source {source} unchanged",
            "data_version": data_version(ctx),
        }
    return {"reingested": True, "reason": reason, **run(ctx, source)}
