"""Index refresh planning (components/retrieval/revisions.py) and the source scan it reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from components.data.catalogue import CatalogueError, scan_source
from components.retrieval.revisions import (
    STORE_PREFIX,
    RefreshPlan,
    RefreshRefused,
    check_removals,
    image_file,
    plan_refresh,
)

INDEXED = pd.DataFrame(
    {
        "product_id": ["a", "b", "c", "d", "e"],
        "sha256": ["1", "2", "3", "4", "5"],
        "category": ["Bag", "Bag", "Coat", "Coat", "Dress"],
        "title": ["a bag", "b bag", "c coat", "d coat", "e dress"],
    }
)


def source(*rows: tuple[str, str, str, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["product_id", "sha256", "category", "title"])


@pytest.mark.parametrize(
    ("rows", "added", "changed", "removed", "unchanged"),
    [
        # the same catalogue: nothing to do
        (list(INDEXED.itertuples(index=False)), [], [], [], 5),
        # a new image (b), a new category (c), a new title (d), a new product (f), e delisted
        (
            [
                ("a", "1", "Bag", "a bag"),
                ("b", "9", "Bag", "b bag"),
                ("c", "3", "Dress", "c coat"),
                ("d", "4", "Coat", "d coat, long"),
                ("f", "6", "Bag", "f bag"),
            ],
            ["f"],
            ["b", "c", "d"],
            ["e"],
            1,
        ),
        # a product listed twice is planned once, by its first row
        (
            [("a", "1", "Bag", "a bag"), ("a", "7", "Bag", "a bag"), ("g", "8", "Bag", "g")],
            ["g"],
            [],
            ["b", "c", "d", "e"],
            1,
        ),
    ],
)
def test_plan_compares_images_categories_and_titles(rows, added, changed, removed, unchanged):
    plan = plan_refresh(INDEXED, source(*rows))
    assert plan.added["product_id"].tolist() == added
    assert plan.changed["product_id"].tolist() == changed
    assert plan.removed == removed
    assert plan.unchanged == unchanged
    assert plan.empty == (not added and not changed and not removed)


def test_rows_quarantined_before_are_not_planned_again_but_still_count_as_listed():
    known = source(("b", "9", "Bag", "b bag"), ("f", "6", "Bag", "f bag"))  # refused before
    rows = [
        ("a", "1", "Bag", "a bag"),
        ("b", "9", "Bag", "b bag"),  # b's new photo, refused before: b keeps its old entry
        ("c", "3", "Coat", "c coat"),
        ("d", "4", "Coat", "d coat"),
        ("e", "5", "Dress", "e dress"),
        ("f", "6", "Bag", "f bag"),  # refused before, unchanged since
        ("g", "7", "Bag", "f bag, fixed"),  # a new product
    ]
    plan = plan_refresh(INDEXED, source(*rows), known)
    assert plan.added["product_id"].tolist() == ["g"]
    assert plan.changed.empty and plan.removed == []  # b is listed: not delisted
    assert (plan.unchanged, plan.still_quarantined) == (4, 2)


def test_an_index_without_image_digests_re_embeds_every_listed_product():
    old_index = INDEXED[["product_id", "category", "title"]]  # built before refreshes existed
    plan = plan_refresh(old_index, source(*INDEXED.itertuples(index=False)))
    assert plan.changed["product_id"].tolist() == ["a", "b", "c", "d", "e"]
    assert plan.unchanged == 0 and plan.added.empty and plan.removed == []


@pytest.mark.parametrize(("removed", "share", "refused"), [(2, 0.5, False), (3, 0.5, True)])
def test_delisting_more_than_the_allowed_share_is_refused(removed, share, refused):
    plan = RefreshPlan(INDEXED.head(0), INDEXED.head(0), removed=list("abcde"[:removed]))
    if not refused:
        check_removals(plan, 5, share)
        return
    with pytest.raises(RefreshRefused, match=r"3 of the index's 5 .*refresh.max_removed_share"):
        check_removals(plan, 5, share)


def test_store_paths_resolve_in_the_store_and_others_in_the_catalogue(tmp_path):
    catalogue, store = tmp_path / "catalogue", tmp_path / "store"
    assert image_file(f"{STORE_PREFIX}ab.png", catalogue, store) == store / "ab.png"
    assert image_file("images/train/x.png", catalogue, store) == catalogue / "images/train/x.png"


def test_scan_reads_a_csv_in_place_with_digests_and_known_labels(tmp_path):
    Image.new("L", (28, 28), 90).save(tmp_path / "one.png")
    (tmp_path / "cat.csv").write_text(
        "product_id,image,label,title\np1,one.png,Bag,a bag\np2,gone.png,Spaceship,\n"
    )
    rows = scan_source(str(tmp_path / "cat.csv"), tmp_path / "nowhere", ["Coat", "Bag"], 0.5)
    assert rows["product_id"].tolist() == ["p1", "p2"]
    assert rows["path"].tolist() == [str(tmp_path / "one.png"), ""]  # read in place, not copied
    assert len(rows["sha256"].iloc[0]) == 64 and rows["sha256"].iloc[1] == ""
    assert rows["label"].tolist() == [1, -1]  # an unknown category: validation quarantines it
    assert rows["title"].tolist() == ["a bag", "Spaceship"]
    assert set(rows["split"]) <= {"train", "test"}
    assert not (tmp_path / "nowhere").exists()


def test_scan_of_a_csv_without_its_columns_names_them(tmp_path):
    (tmp_path / "cat.csv").write_text("id,picture\n1,x.png\n")
    with pytest.raises(CatalogueError, match="missing required column"):
        scan_source(str(tmp_path / "cat.csv"), Path("."), ["Bag"])


def test_workers_filling_the_store_at_once_each_succeed_and_leave_one_whole_copy(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from components.retrieval.revisions import store_image

    src = tmp_path / "photo.png"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: copies overlap in time
    store = tmp_path / "store"
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda _: store_image(src, store, "abc.png"), range(16)))
    assert done == [store / "abc.png"] * 16
    assert (store / "abc.png").read_bytes() == src.read_bytes()
    assert [p.name for p in store.iterdir()] == ["abc.png"]  # no half-written copy left
