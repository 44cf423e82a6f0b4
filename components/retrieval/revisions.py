"""Index revisions: the served model version's index brought up to date with the catalogue,
without retraining (`vitrine index refresh`, components/stages/refresh.py).

A registered version holds the index its training run built (revision 0, the `index`
artifact). A refresh compares the catalogue source as it is now with the products that index
holds (`plan_refresh`): products the source lists for the first time are *added*, products
whose image, category or title differ are *changed*, products it no longer lists are
*removed* (delisted). The new and changed rows are validated like ingest's and embedded by the
version's own model; the result is published as revision N of the SAME version (the artifact
`index-revisions/<time>-<id>/`, the version tag `index_revision`), so a model and its index still always
belong together, and the service swaps to it as it swaps models.

Images of refreshed products are not in the catalogue folder (which only a retrain's ingest
replaces): they live content-addressed in the state folder's product-image store, and their
index path is `@store/<sha256><ext>`; each revision artifact carries the store images its
products use, so a service on another host fetches them with the index.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

STORE_PREFIX = "@store/"
STORE_DIR = "images"  # in each revision folder: the store images its products use
COMPARED = ("sha256", "category", "title")  # what makes an indexed product "changed"


class RefreshRefused(RuntimeError):
    """The refresh would do something the policy forbids (e.g. delist too much at once)."""


@dataclass
class RefreshPlan:
    """What a refresh does to an index: `added` and `changed` are source rows (to validate and
    embed), `removed` the delisted product ids; `unchanged` how many products stay as they are."""

    added: pd.DataFrame
    changed: pd.DataFrame
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    still_quarantined: int = 0  # rows exactly as when they were quarantined: not checked again

    @property
    def empty(self) -> bool:
        return not (len(self.added) or len(self.changed) or self.removed)

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added),
            "changed": len(self.changed),
            "removed": len(self.removed),
            "unchanged": self.unchanged,
            "still_quarantined": self.still_quarantined,
        }


def plan_refresh(
    indexed: pd.DataFrame, source: pd.DataFrame, quarantined: pd.DataFrame | None = None
) -> RefreshPlan:
    """Compare the indexed products (product_id and, from indexes built since refreshes exist,
    sha256, category, title) with the source rows (manifest columns). A product listed twice
    in the source is planned once (its first row); the refresh quarantines the repeat.

    `quarantined`: rows validation already refused (the version's training run, earlier
    refreshes); a source row identical to one of them is not planned again (ingest's checks
    compare it with the whole catalogue, a refresh's only with the index).

    An index without image digests (built before refreshes existed) has every product
    `changed`: the refresh re-embeds them all once, and later refreshes compare digests."""
    source = source.drop_duplicates("product_id", keep="first")
    ids = set(indexed["product_id"].astype(str))
    removed = sorted(ids - set(source["product_id"].astype(str)))  # every listed id counts
    still = 0
    if quarantined is not None and len(quarantined) and len(source):
        again = listed_in(source, quarantined)
        still = int(again.sum())
        source = source[~again]
    listed = source["product_id"].astype(str)
    added = source[~listed.isin(ids)]
    present = source[listed.isin(ids)]
    if all(c in indexed.columns for c in COMPARED):
        old = indexed.set_index(indexed["product_id"].astype(str))[list(COMPARED)]
        old = old.reindex(present["product_id"].astype(str)).astype(str).to_numpy()
        new = present[list(COMPARED)].astype(str).to_numpy()
        differs = (old != new).any(axis=1)
    else:
        differs = np.ones(len(present), dtype=bool)
    return RefreshPlan(
        added=added.reset_index(drop=True),
        changed=present[differs].reset_index(drop=True),
        removed=removed,
        unchanged=int((~differs).sum()),
        still_quarantined=still,
    )


def listed_in(rows: pd.DataFrame, other: pd.DataFrame) -> np.ndarray:
    """Which of `rows` appear in `other` exactly: same product id, image, category, title."""
    key = ["product_id", *COMPARED]
    if not len(rows) or not len(other):
        return np.zeros(len(rows), dtype=bool)
    known = set(map(tuple, other[key].astype(str).to_numpy()))
    return np.array([tuple(row) in known for row in rows[key].astype(str).to_numpy()])


def check_removals(plan: RefreshPlan, indexed: int, max_share: float) -> None:
    """Refuse to delist more than `max_share` of the index in one refresh: a truncated or
    half-exported catalogue file must not empty the shop's search."""
    if indexed and len(plan.removed) / indexed > max_share:
        raise RefreshRefused(
            f"the source no longer lists {len(plan.removed)} of the index's {indexed} products "
            f"({len(plan.removed) / indexed:.0%}), above refresh.max_removed_share "
            f"({max_share:.0%}): check the catalogue source, or raise the share to delist them"
        )


def store_name(sha256: str, suffix: str) -> str:
    """A product image's name in the store: its content digest and the source's suffix."""
    return f"{sha256}{suffix.lower()}"


def store_image(src: Path, store: Path, name: str) -> Path:
    """Put a copy of `src` in the store as `name` unless it is there: written under a name of
    this process and thread, then renamed, so service workers filling the same store at once
    never see (or rename away) each other's half-written copies."""
    target = Path(store) / name
    if not target.is_file():
        Path(store).mkdir(parents=True, exist_ok=True)
        part = Path(store) / f".{name}.{os.getpid()}.{threading.get_ident()}.part"
        shutil.copyfile(src, part)
        os.replace(part, target)
    return target


def image_file(path: str, catalogue_dir: Path, store_dir: Path) -> Path:
    """The file behind an index record's `path`: under the catalogue folder, or in the
    product-image store for `@store/` paths (products added or changed by a refresh)."""
    if path.startswith(STORE_PREFIX):
        return Path(store_dir) / path.removeprefix(STORE_PREFIX)
    return Path(catalogue_dir) / path
