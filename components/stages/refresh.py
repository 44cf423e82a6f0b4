"""The index refresh: the champion's index brought up to date with the catalogue source
without retraining (`vitrine index refresh`, the hourly `refresh` deployment).

plan (the source against the served revision: added, changed, delisted; the new and changed
rows staged into the product-image store and validated like ingest's, quarantine included) →
embed (with the champion's own model; on Dask at catalogue scale, flows/refresh.py) → publish
(the served revision, minus the delisted and changed products, plus the accepted rows, as the
next index revision of the SAME version: components/retrieval/revisions.py). Nothing is
published before the last step, so a refresh that fails leaves the registry and the service
as they were.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from components.data import catalogue, validation
from components.model import training
from components.model.transforms import model_input
from components.release.registry import REVISION_FILE, Registry, file_digests, open_registry
from components.retrieval import revisions
from components.retrieval.index import FAISS_FILE, META_FILE, CatalogueIndex
from components.stages.context import RunContext, write_json
from components.stages.evaluate import Catalogue

INDEX_COLUMNS = ["product_id", "label", "category", "title", "path", "split", "sha256"]
MODEL_FILE = "model.pt"  # the champion's model, saved in the refresh folder for Dask workers


class NoChampion(LookupError):
    """There is no champion, so no served index to refresh."""


@dataclass
class Staged:
    """A planned refresh: the served revision it starts from, the accepted new and changed rows
    (paths in the product-image store), the delisted ids and the quarantined rows."""

    version: str
    base: dict  # Registry.index_revision of the revision refreshed
    base_dir: Path  # its downloaded folder
    counts: dict  # added, changed, removed, unchanged (as planned, before validation)
    accepted: pd.DataFrame
    removed: list[str]
    quarantine: pd.DataFrame

    @property
    def empty(self) -> bool:
        return len(self.accepted) == 0 and not self.removed


def champion(registry: Registry) -> str:
    version, _ = registry.served_champion()
    if version is None:
        raise NoChampion("no champion yet: nothing to refresh (`vitrine run` makes one)")
    return version


def plan(ctx: RunContext, registry: Registry, source: str | None = None) -> Staged:
    """Compare the source with the champion's served index; stage and validate what changed."""
    data = ctx.params.data
    version = champion(registry)
    base = registry.index_revision(version)
    out = ctx.stage_dir("refresh")
    shutil.rmtree(out / "base", ignore_errors=True)  # an earlier refresh's download
    base_dir = registry.download_index(version, base, out / "base")
    indexed = pd.read_parquet(base_dir / "products.parquet")
    rows = catalogue.scan_source(
        source or data.source, ctx.catalogue_dir, data.categories, data.test_fraction
    )
    known = known_quarantine(registry, version, base, base_dir, out)
    planned = revisions.plan_refresh(indexed, rows, known)
    revisions.check_removals(planned, len(indexed), ctx.params.refresh.max_removed_share)
    repeated = rows[rows["product_id"].duplicated(keep="first")]
    candidates = pd.concat([planned.added, planned.changed], ignore_index=True)
    staged = stage_images(candidates, ctx.paths.product_images)
    accepted, quarantine = validate_rows(ctx, staged, indexed, planned, out / "docs")
    accepted["replaces"] = accepted["product_id"].isin(planned.changed["product_id"])
    carried = known[revisions.listed_in(known, rows)] if known is not None else None
    if carried is not None and len(carried):  # still listed as they were: still quarantined
        quarantine = pd.concat([carried, quarantine], ignore_index=True)
    if len(repeated):
        again = repeated.assign(
            reason="duplicate_product_id",
            reasons="duplicate_product_id",
            detail="listed again in the source: its first row is the product",
        )
        quarantine = pd.concat([quarantine, again], ignore_index=True)
    return Staged(version, base, base_dir, planned.counts(), accepted, planned.removed, quarantine)


def known_quarantine(
    registry: Registry, version: str, base: dict, base_dir: Path, out: Path
) -> pd.DataFrame | None:
    """Rows validation already refused: the served revision's quarantine (a refresh keeps
    every row of the source still quarantined), or for revision 0 the training run's."""
    if base["revision"] > 0:
        path = base_dir / "quarantine.parquet"
        return pd.read_parquet(path) if path.is_file() else None
    if not registry.has_artifact(version, "validation"):
        return None
    path = registry.download_artifacts(version, "validation/quarantine.parquet", out / "known")
    return pd.read_parquet(path)


def stage_images(rows: pd.DataFrame, store: Path) -> pd.DataFrame:
    """Copy each row's image file into the content-addressed store (`@store/<sha256><ext>`)
    and read its size; a missing file keeps path '' (validation quarantines it)."""
    paths, widths, heights = [], [], []
    for src, digest in zip(rows["path"], rows["sha256"], strict=True):
        if not src:
            paths.append(""), widths.append(0), heights.append(0)
            continue
        name = revisions.store_name(digest, Path(src).suffix)
        _, width, height = catalogue.probe_file(revisions.store_image(Path(src), store, name))
        paths.append(revisions.STORE_PREFIX + name), widths.append(width), heights.append(height)
    return rows.assign(path=paths, width=widths, height=heights)


def validate_rows(
    ctx: RunContext,
    staged: pd.DataFrame,
    indexed: pd.DataFrame,
    planned: revisions.RefreshPlan,
    docs: Path,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The Great Expectations suite and image checks of ingest on the staged rows, plus: an
    image that a product staying in the index already shows is an exact duplicate."""
    if staged.empty:
        return staged, staged.assign(reason=[], reasons=[], detail=[])
    in_store = staged.assign(path=staged["path"].str.removeprefix(revisions.STORE_PREFIX))
    result = validation.validate_catalogue(
        in_store, ctx.paths.product_images, ctx.params.data.categories, ctx.params.validation, docs
    )
    accepted = staged.loc[result.accepted.index]
    quarantine = result.quarantine.assign(path=staged.loc[result.quarantine.index, "path"])
    if "sha256" in indexed.columns:
        leaving = set(planned.removed) | set(planned.changed["product_id"])
        staying = indexed[~indexed["product_id"].isin(leaving)]
        shown = dict(zip(staying["sha256"], staying["product_id"], strict=True))
        again = accepted["sha256"].map(shown)
        if again.notna().any():
            dup = accepted[again.notna()].assign(
                reason="exact_duplicate",
                reasons="exact_duplicate",
                detail="the same image as indexed product " + again[again.notna()],
            )
            quarantine = pd.concat([quarantine, dup], ignore_index=True)
            accepted = accepted[again.isna()]
    return accepted.reset_index(drop=True), quarantine.reset_index(drop=True)


def load_champion_model(ctx: RunContext, registry: Registry, version: str) -> Path:
    """The champion's model, saved in the refresh folder (what each embedding shard loads)."""
    path = ctx.stage_dir("refresh") / MODEL_FILE
    torch.save(registry.load_model(version).eval(), path)
    return path


def describe_rows(ctx: RunContext, model_path: Path, rows: pd.DataFrame) -> Catalogue:
    """Embed rows with the model at `model_path` and tag their colours: one shard's work."""
    from components.retrieval.colours import catalogue_colours

    model = torch.load(model_path, weights_only=False).eval()
    files = [
        revisions.image_file(p, ctx.catalogue_dir, ctx.paths.product_images) for p in rows["path"]
    ]
    images = []
    for file in files:  # the model's own input size, channels and preprocessing
        with Image.open(file) as image:
            images.append(model_input(image, model))
    size, channels = model.image_size, model.in_channels
    batch = np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8)
    _, emb = training.predict_batches(model, batch)
    return Catalogue(emb.astype(np.float32), list(catalogue_colours(files)))


def publish(
    ctx: RunContext, registry: Registry, staged: Staged, described: Catalogue, source: str
) -> dict:
    """The next revision: the served one minus the delisted and changed products plus the
    accepted rows, saved with its store images, quarantine and revision.json, and published."""
    out = ctx.stage_dir("refresh") / "revision"
    shutil.rmtree(out, ignore_errors=True)
    index = CatalogueIndex.load(staged.base_dir)
    index.remove(staged.removed)
    products = staged.accepted[INDEX_COLUMNS].assign(colours=described.colours)
    index.add(products, described.embeddings)  # a changed product is replaced
    index.save(out)
    if index.kind == "exact":  # built at load in no time: the artifact stays the arrays
        (out / FAISS_FILE).unlink(missing_ok=True)
        (out / META_FILE).unlink(missing_ok=True)
    elif not (out / FAISS_FILE).exists():  # removals: the graph / lists built once, here
        CatalogueIndex.load(out).write_search_structure(out)
    for extra in staged.base_dir.glob("*.npz"):  # the text projection maps any embedding
        shutil.copyfile(extra, out / extra.name)
    copy_store_images(pd.read_parquet(out / "products.parquet", columns=["path"]), ctx, out)
    staged.quarantine.to_parquet(out / "quarantine.parquet", index=False)
    summary = {
        "base_revision": staged.base["revision"],
        "source": source,
        "size": len(index),
        "added": int((~staged.accepted["replaces"]).sum()),
        "changed": int(staged.accepted["replaces"].sum()),
        "removed": len(staged.removed),
        "quarantined": len(staged.quarantine),
    }
    write_json({**summary, "files": file_digests(out, "index")}, out / REVISION_FILE)
    return registry.publish_index_revision(staged.version, out, summary)


def copy_store_images(products: pd.DataFrame, ctx: RunContext, out: Path) -> None:
    """Every store image the revision's products use, in its `images/` folder."""
    folder = out / revisions.STORE_DIR
    folder.mkdir(exist_ok=True)
    paths = products["path"].astype(str)
    for name in paths[paths.str.startswith(revisions.STORE_PREFIX)].str[
        len(revisions.STORE_PREFIX) :
    ]:
        shutil.copyfile(ctx.paths.product_images / name, folder / name)


def run(ctx: RunContext, source: str | None = None, registry: Registry | None = None) -> dict:
    """plan → embed → publish in this process (the flow maps the embedding over Dask)."""
    registry = registry or open_registry(ctx.paths, ctx.params)
    start = time.perf_counter()
    staged = plan(ctx, registry, source)
    result = outcome(staged)
    if staged.empty:
        return result | {"seconds": round(time.perf_counter() - start, 1)}
    described = describe_rows(
        ctx, load_champion_model(ctx, registry, staged.version), staged.accepted
    )
    record = publish(ctx, registry, staged, described, source or ctx.params.data.source)
    return finish(result, record, start)


def outcome(staged: Staged) -> dict:
    """What the planned refresh found (the summary of an unchanged one)."""
    reasons = staged.quarantine["reason"].value_counts().to_dict() if len(staged.quarantine) else {}
    return {
        "version": staged.version,
        "revision": staged.base["revision"],
        "published": False,
        "planned": staged.counts,
        "quarantined": len(staged.quarantine),
        "quarantined_by_reason": {k: int(v) for k, v in reasons.items()},
    }


def finish(result: dict, record: dict, start: float) -> dict:
    keys = ("revision", "built_at", "size", "added", "changed", "removed", "base_revision")
    published = {k: record[k] for k in keys}
    return (
        result | published | {"published": True, "seconds": round(time.perf_counter() - start, 1)}
    )
