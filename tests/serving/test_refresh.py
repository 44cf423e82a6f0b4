"""A fresh index without retraining: `vitrine index refresh` on a changed shop catalogue
publishes the next index revision of the champion's version (validated, quarantined, audited),
and a real `bentoml serve` swaps to it while serving the same model version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import PROJECT_ROOT
from components.retrieval.revisions import RefreshRefused
from components.stages import refresh as refresh_stage
from tests.conftest import CATEGORIES
from tests.serving.conftest import (
    POLL_SECONDS,
    build_champion,
    readyz,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = [pytest.mark.serving, pytest.mark.scale]

CHANGED = ("p-train-00010", "p-train-00011")  # re-photographed
DELISTED = ("p-train-00020", "p-test-00003")
NEW = ("n-0001", "n-0002")  # good new products
BAD = {"n-truncated": "truncated", "n-dup": "exact_duplicate"}  # new rows to quarantine


@pytest.fixture(scope="module")
def champion(tmp_path_factory, fmnist):
    return build_champion(tmp_path_factory.mktemp("refresh"), fmnist)


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    env = {**champion.env, "VITRINE_POLL_SECONDS": str(POLL_SECONDS)}
    running = start_server(env, tmp_path_factory.mktemp("refresh-server") / "serve.log")
    yield running
    stop_server(running.proc)


def refresher_home(champion):
    """The state folder of the host that runs the refresh: not the service's. They share only
    the registry (its tracking URI), so the service gets the new products' images from the
    revision artifact, as on two hosts."""
    return champion.ctx.repo / "refresher-host"


def refresh_cli(champion, *args: str) -> subprocess.CompletedProcess:
    env = {
        **champion.env,
        "VITRINE_HOME": str(refresher_home(champion)),
        "VITRINE_TRACKING_URI": champion.ctx.paths.embedded_tracking_uri,
    }
    return subprocess.run(
        [sys.executable, "-m", "vitrine.cli", "index", "refresh", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def edit_catalogue(champion, fmnist) -> dict[str, bytes]:
    """The shop's next export: two products re-photographed, two new ones, two bad new rows,
    two delisted. Returns the new image bytes by product id."""
    shop = champion.ctx.repo / "shop"
    table = pd.read_csv(shop / "catalogue.csv", dtype=str, keep_default_na=False)
    images, labels = fmnist["train"]
    spare = iter(range(3000, 4000))
    photos = {}
    for pid in CHANGED:  # another photo of the same category
        category = table.loc[table["product_id"] == pid, "label"].item()
        j = next(j for j in spare if CATEGORIES[int(labels[j])] == category)
        Image.fromarray(images[j]).save(shop / f"img/{pid}-new.png")
        table.loc[table["product_id"] == pid, "image"] = f"img/{pid}-new.png"
        photos[pid] = (shop / f"img/{pid}-new.png").read_bytes()
    rows = []
    for pid in NEW:
        j = next(spare)
        Image.fromarray(images[j]).save(shop / f"img/{pid}.png")
        photos[pid] = (shop / f"img/{pid}.png").read_bytes()
        category = CATEGORIES[int(labels[j])]
        rows.append([pid, f"img/{pid}.png", category, f"new {category}", "train"])
    good = Image.fromarray(images[next(spare)])
    good.save(shop / "img/whole.png")
    data = (shop / "img/whole.png").read_bytes()
    (shop / "img/truncated.png").write_bytes(data[: len(data) // 2])
    rows.append(["n-truncated", "img/truncated.png", "Bag", "", "train"])
    indexed = table.loc[table["product_id"] == "p-train-00005", "image"].item()
    rows.append(["n-dup", indexed, "Bag", "the same photo again", "train"])
    table = pd.concat([table, pd.DataFrame(rows, columns=table.columns)], ignore_index=True)
    table = table[~table["product_id"].isin(DELISTED)]
    table.to_csv(shop / "catalogue.csv", index=False)
    return photos


def post_image(url: str, route: str, data: bytes, **form) -> dict:
    files = {"image": ("photo.png", data, "image/png")}
    response = httpx.post(f"{url}{route}", files=files, data=form, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_refresh_publishes_a_revision_that_the_service_swaps_to(champion, server, fmnist):
    version = champion.version
    assert readyz(server.url).json()["index_revision"] == 0
    before = len(champion.registry.list_versions())
    photos = edit_catalogue(champion, fmnist)

    done = refresh_cli(champion, "--json", str(champion.ctx.repo / "refresh.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((champion.ctx.repo / "refresh.json").read_text())
    assert result["published"] and result["version"] == version and result["revision"] == 1
    assert (result["added"], result["changed"], result["removed"]) == (2, 2, 2)
    assert result["quarantined_by_reason"] == {"truncated": 1, "exact_duplicate": 1}
    assert f"index revision 1 published ({result['size']} products: 2 added" in done.stdout

    # the same model version, a new revision of its index: audited like a promotion
    assert len(champion.registry.list_versions()) == before
    revision = champion.registry.index_revision(version)
    assert revision["revision"] == 1 and revision["by"] and revision["base_revision"] == 0
    audit_log = refresher_home(champion) / "audit.jsonl"
    audit = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert audit[-1]["action"] == "index_refresh" and audit[-1]["revision"] == 1
    stored = champion.registry.download_index(version, revision, champion.ctx.repo / "rev1")
    products = pd.read_parquet(stored / "products.parquet")
    ids = set(products["product_id"])
    assert set(NEW) <= ids and not ids & set(DELISTED) and not ids & set(BAD)
    assert result["size"] == len(products)
    quarantine = pd.read_parquet(stored / "quarantine.parquet")
    assert dict(zip(quarantine["product_id"], quarantine["reason"], strict=True)) == BAD

    # the service swaps to it and says so
    ready = wait_for(
        lambda: (body := readyz(server.url).json())["index_revision"] == 1 and body,
        timeout=60,
        what="the service serving index revision 1",
    )
    assert ready["model_version"] == version and ready["index_built_at"] == revision["built_at"]
    embeddings = np.load(stored / "embeddings.npy")
    for pid in (*NEW, *CHANGED):  # searchable by their new photos, embedded by the champion
        found = post_image(server.url, "/search", photos[pid], k="1")
        assert found["model_version"] == version
        assert found["results"][0]["product_id"] == pid, (pid, found["results"][0])
        vector = np.asarray(post_image(server.url, "/embed", photos[pid])["embedding"])
        row = products.index[products["product_id"] == pid][0]
        assert np.allclose(vector, embeddings[row], atol=1e-4)
        image = httpx.get(f"{server.url}/products/{pid}/image", timeout=10)
        assert image.status_code == 200 and image.content == photos[pid]
    assert not (refresher_home(champion) / "product-images").is_relative_to(
        champion.ctx.paths.home
    )  # the service's own store got them from the revision artifact
    status = subprocess.run(
        [sys.executable, "-m", "vitrine.cli", "status"],
        cwd=PROJECT_ROOT,
        env={**os.environ, **champion.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"champion's index: revision 1 ({result['size']} products" in status.stdout
    for pid in DELISTED:
        assert httpx.get(f"{server.url}/products/{pid}", timeout=10).status_code == 404


def test_an_unchanged_catalogue_publishes_nothing(champion, server):
    result = refresh_stage.run(champion.ctx, registry=champion.registry)
    assert not result["published"] and result["revision"] == 1
    # the two bad rows are still listed as they were: still quarantined, not checked again
    assert result["planned"] | {"unchanged": 0} == {
        "added": 0,
        "changed": 0,
        "removed": 0,
        "unchanged": 0,
        "still_quarantined": 2,
    }
    assert result["quarantined_by_reason"] == {"truncated": 1, "exact_duplicate": 1}
    assert champion.registry.index_revision(champion.version)["revision"] == 1


def test_a_truncated_export_is_refused_and_changes_nothing(champion, server):
    shop = champion.ctx.repo / "shop"
    full = (shop / "catalogue.csv").read_text()
    lines = full.splitlines()
    (shop / "catalogue.csv").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    try:
        with pytest.raises(RefreshRefused, match=r"no longer lists .* refresh.max_removed_share"):
            refresh_stage.run(champion.ctx, registry=champion.registry)
    finally:
        (shop / "catalogue.csv").write_text(full)
    assert champion.registry.index_revision(champion.version)["revision"] == 1
    assert readyz(server.url).json()["index_revision"] == 1
