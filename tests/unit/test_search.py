"""CatalogueIndex: exact vs HNSW vs IVF, filters, live add/remove, recommendations, shade, loading."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from components.retrieval import index as index_module
from components.retrieval.index import CatalogueIndex, UnknownFilter, UnknownProduct
from components.retrieval.tags import GROUPS, group_of, shade_of

CATS = list(GROUPS)  # the ten Fashion-MNIST categories
DIM = 16


def make_catalogue(shares: dict[str, float], n: int = 2000, seed: int = 0):
    """Clustered unit vectors: one cluster per category, sized by share of n."""
    rng = np.random.default_rng(seed)
    counts = {c: max(1, int(round(s * n))) for c, s in shares.items()}
    centers = {c: rng.standard_normal(DIM) for c in counts}
    cats = [c for c, m in counts.items() for _ in range(m)]
    emb = np.stack([centers[c] + 0.6 * rng.standard_normal(DIM) for c in cats]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    products = pd.DataFrame(
        {
            "product_id": [f"p{i:05d}" for i in range(len(cats))],
            "label": [CATS.index(c) if c in CATS else -1 for c in cats],
            "category": cats,
            "title": [f"{c} #{i}" for i, c in enumerate(cats)],
            "path": [f"images/{i:05d}.png" for i in range(len(cats))],
            "split": "train",
            "sha256": [f"{i:064x}" for i in range(len(cats))],  # as in the manifest
        }
    )
    return emb, products


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build(kind: str, emb, products) -> CatalogueIndex:
    """The index of that kind; an ivf one of 16 lists searched over 4 (widened when short)."""
    exact_max, ivf_min = (len(emb), len(emb)) if kind == "exact" else (0, len(emb) + 1)
    if kind == "ivf":
        exact_max, ivf_min = 0, 0
    index = CatalogueIndex.build(
        emb, products, exact_max=exact_max, ivf_min=ivf_min, nlist=16, nprobe=4
    )
    assert index.kind == kind
    return index


def brute_force(emb, products, query, k, keep) -> list[str]:
    sims = np.where(keep, emb @ query, -np.inf)
    return products["product_id"].to_numpy()[np.argsort(-sims, kind="stable")[:k]].tolist()


@pytest.fixture(scope="module")
def balanced():
    return make_catalogue({c: 0.1 for c in CATS})


@pytest.fixture(scope="module")
def skewed():  # Bag is 5% of the catalogue
    return make_catalogue({**{c: 0.95 / 9 for c in CATS if c != "Bag"}, "Bag": 0.05})


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_exact_and_approximate_agree_on_top_results(balanced, kind):
    emb, products = balanced
    exact, hnsw = build("exact", emb, products), build(kind, emb, products)
    queries = unit(np.random.default_rng(1), 30)
    overlap = []
    for q in queries:
        a = [h.product_id for h in exact.search(q, 10)]
        b = [h.product_id for h in hnsw.search(q, 10)]
        assert a == brute_force(emb, products, q, 10, np.ones(len(emb), bool))
        assert a[0] == b[0]
        overlap.append(len(set(a) & set(b)) / 10)
    assert np.mean(overlap) >= 0.95
    batch = hnsw.search_batch(queries, 10)
    assert [h.product_id for h in batch[0]] == [h.product_id for h in hnsw.search(queries[0], 10)]
    assert all(b.score >= c.score for b, c in zip(batch[0], batch[0][1:], strict=False))


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
@pytest.mark.parametrize("subset_exact_max", [20_000, 0])  # 0 forces the faiss IDSelector path
def test_selective_filter_returns_k_matching(skewed, kind, subset_exact_max):
    emb, products = skewed
    index = build(kind, emb, products)
    index.subset_exact_max = subset_exact_max
    is_bag = (products["category"] == "Bag").to_numpy()
    assert 0.04 < is_bag.mean() < 0.06
    rng = np.random.default_rng(2)
    overlap = []
    for q in unit(rng, 20):  # queries mostly far from the Bag cluster
        hits = index.search(q, 10, category="Bag")
        assert len(hits) == 10
        assert {h.category for h in hits} == {"Bag"} and {h.group for h in hits} == {"bags"}
        truth = brute_force(emb, products, q, 10, is_bag)
        overlap.append(len({h.product_id for h in hits} & set(truth)) / 10)
    # exact: the true filtered top 10; so is HNSW's (under a filter keeping less than half,
    # its flat storage is scanned); IVF through the selector: approximate (probed lists); IVF's
    # exact subset search ranks decoded (SQ8) vectors
    exact_answer = kind in ("exact", "hnsw") or subset_exact_max > 0
    if kind == "ivf" and exact_answer:
        assert np.mean(overlap) >= 0.95
    else:
        assert np.mean(overlap) == 1.0 if exact_answer else np.mean(overlap) >= 0.8
    footwear = index.search(unit(rng)[0], 25, group="footwear")
    assert len(footwear) == 25 and {h.group for h in footwear} == {"footwear"}
    assert index.search(unit(rng)[0], 10, category="sneaker", group="footwear")[0].category == (
        "Sneaker"
    )
    assert index.search(unit(rng)[0], 10, category="Sneaker", group="bags") == []


def test_filter_with_fewer_matches_than_k_returns_them_all():
    emb, products = make_catalogue({"Coat": 0.5, "Dress": 0.5}, n=200)
    emb2, extra = make_catalogue({"Bag": 1.0}, n=3, seed=5)
    extra["product_id"] = ["b1", "b2", "b3"]
    for kind in ("exact", "hnsw", "ivf"):
        index = build(kind, emb, products)
        index.add(extra, emb2)
        assert sorted(h.product_id for h in index.search(emb[0], 10, category="Bag")) == [
            "b1",
            "b2",
            "b3",
        ]


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_add_and_remove_without_rebuild(balanced, kind):
    emb, products = balanced
    index = build(kind, emb, products)
    graph = index._faiss
    tolerance = 1e-2 if kind == "ivf" else 1e-5  # ivf decodes one-byte codes
    query = emb[7]
    top = [h.product_id for h in index.search(query, 20)]
    gone = top[1:6] + ["p00007", "no-such-id"]
    assert index.remove(gone) == 6 and index.remove(["p00007"]) == 0
    assert len(index) == len(emb) - 6
    for q in [query, *emb[:50], *unit(np.random.default_rng(3), 20)]:
        ids = {h.product_id for h in index.search(q, 50)}
        assert len(ids) == 50 and not ids & set(gone)
    cat = products.loc[products["product_id"] == top[1], "category"].item()
    assert not {h.product_id for h in index.search(query, 100, category=cat)} & set(gone)
    with pytest.raises(KeyError):
        index.embedding_of("p00007")

    # new products like the catalogue's (an ivf index's codes are fitted to its distribution)
    near = emb[[300, 900, 1500]] + 0.3 * unit(np.random.default_rng(4), 3)
    new_vecs = near / np.linalg.norm(near, axis=1, keepdims=True)
    new = pd.DataFrame({"product_id": ["n1", "n2", "p00007"], "category": ["Bag", "Coat", "Dress"]})
    index.add(new, new_vecs)
    assert len(index) == len(emb) - 3
    for pid, vec in zip(["n1", "n2", "p00007"], new_vecs, strict=True):
        first = index.search(vec, 5)[0]
        assert first.product_id == pid and first.score == pytest.approx(1.0, abs=tolerance)
    assert index.product("p00007")["category"] == "Dress"
    np.testing.assert_allclose(index.embedding_of("n2"), new_vecs[1], atol=tolerance)

    replaced = emb[[1800]] + 0.3 * unit(np.random.default_rng(5))
    replaced /= np.linalg.norm(replaced)
    index.add(pd.DataFrame({"product_id": ["n1"], "category": ["Bag"]}), replaced)
    assert len(index) == len(emb) - 3
    assert index.search(replaced[0], 1)[0].product_id == "n1"
    assert "n1" not in [h.product_id for h in index.search(new_vecs[0], 3)]
    assert index._faiss is graph  # same faiss object throughout: nothing was rebuilt


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_recommend(kind):
    emb, products = make_catalogue({"Coat": 0.4, "Pullover": 0.3, "Shirt": 0.3}, n=600)
    index = build(kind, emb, products)
    history = products.loc[products["category"] == "Coat", "product_id"].tolist()[:4]
    recs = index.recommend(history, k=10)
    assert len(recs) == 10 and not {h.product_id for h in recs} & set(history)
    assert [h.score for h in recs] == sorted((h.score for h in recs), reverse=True)
    plain_cats = [h.category for h in recs]
    diverse = index.recommend(history, k=10, diversify=True)
    assert len(diverse) == 10 and not {h.product_id for h in diverse} & set(history)
    counts = pd.Series([h.category for h in diverse]).value_counts()
    assert len(counts) > len(set(plain_cats)) and counts.max() <= 5
    assert diverse[0].product_id == recs[0].product_id  # the best hit still leads
    with pytest.raises(UnknownProduct, match="nope"):
        index.recommend([history[0], "nope"], k=5)
    with pytest.raises(ValueError):
        index.recommend([], k=5)


def test_recommend_weights_recent_items_more():
    emb, products = make_catalogue({"Coat": 0.5, "Sandal": 0.5}, n=400)
    index = build("exact", emb, products)
    coat = products.loc[products["category"] == "Coat", "product_id"].tolist()
    sandal = products.loc[products["category"] == "Sandal", "product_id"].tolist()
    index.recency_decay = 0.3
    assert index.recommend(coat[:2] + sandal[:2], k=1)[0].category == "Sandal"
    assert index.recommend(sandal[:2] + coat[:2], k=1)[0].category == "Coat"


def test_unknown_filters_raise_with_valid_values(balanced):
    emb, products = balanced
    index = build("exact", emb, products)
    with pytest.raises(UnknownFilter, match="Ankle boot") as err:
        index.search(emb[0], 5, category="Hat")
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnknownFilter, match="footwear"):
        index.search_batch(emb[:2], 5, group="hats")
    with pytest.raises(ValueError):
        index.search(emb[0], 0)
    with pytest.raises(UnknownProduct):
        index.product("missing")
    assert group_of("Trouser") == "bottoms" and group_of("Hat") == "other"


def test_shade_of_synthetic_images():
    light_on_black = np.zeros((28, 28), dtype=np.uint8)
    light_on_black[6:22, 8:20] = 230
    shade, value = shade_of(light_on_black)
    assert shade == "light" and value == pytest.approx(230 / 255)
    dark_on_white = np.full((32, 32, 3), 255, dtype=np.uint8)
    dark_on_white[8:24, 8:24] = (30, 30, 40)
    assert shade_of(dark_on_white)[0] == "dark"
    mid = np.zeros((28, 28, 1), dtype=np.uint8)
    mid[4:24, 4:24, 0] = 128
    assert shade_of(mid)[0] == "mid"
    transparent = np.zeros((16, 16, 4), dtype=np.uint8)
    transparent[4:12, 4:12] = (20, 20, 20, 255)
    assert shade_of(transparent)[0] == "dark"
    assert shade_of(np.full((8, 8), 250, dtype=np.uint8)) == ("light", pytest.approx(250 / 255))


def test_load_from_artifact_folder_and_save_roundtrip(balanced, tmp_path):
    emb, products = balanced
    art = tmp_path / "index"
    art.mkdir()
    np.save(art / "embeddings.npy", emb)
    products.to_parquet(art / "products.parquet", index=False)
    loaded = CatalogueIndex.load(art)
    assert loaded.kind == "exact" and len(loaded) == len(emb)
    assert loaded.product("p00003") == {**products.iloc[3].to_dict(), "label": 0}
    assert loaded.search(emb[3], 1)[0].product_id == "p00003"

    hnsw = CatalogueIndex.load(art, exact_max=100)
    assert hnsw.kind == "hnsw"
    hnsw.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "index.faiss").exists()
    again = CatalogueIndex.load(tmp_path / "saved")
    assert again.kind == "hnsw" and len(again) == len(emb)
    q = unit(np.random.default_rng(6))[0]
    assert [h.product_id for h in again.search(q, 10)] == [h.product_id for h in hnsw.search(q, 10)]

    again.remove(["p00003"])
    again.save(tmp_path / "pruned")
    assert not (tmp_path / "pruned" / "index.faiss").exists()
    pruned = CatalogueIndex.load(tmp_path / "pruned", exact_max=100)
    assert len(pruned) == len(emb) - 1 and pruned.search(emb[3], 1)[0].product_id != "p00003"


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_search_space_ranks_live_products_in_another_space(balanced, kind):
    """Text search ranks the index's rows by vectors of another space, with the same filters."""
    emb, products = balanced
    index = build(kind, emb, products)
    rng = np.random.default_rng(3)
    other = unit(rng, len(emb))  # e.g. the products' positions in the text space
    query = unit(rng)[0]
    keep = np.ones(len(emb), dtype=bool)
    hits = index.search_space(other, query, 5)
    assert [h.product_id for h in hits] == brute_force(other, products, query, 5, keep)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    gone = [h.product_id for h in hits[:2]]
    index.remove(gone)
    keep &= ~products["product_id"].isin(gone).to_numpy()
    again = index.search_space(other, query, 5)
    assert [h.product_id for h in again] == brute_force(other, products, query, 5, keep)
    bags = index.search_space(other, query, 7, category="bag")
    assert len(bags) == 7 and {h.category for h in bags} == {"Bag"}
    with pytest.raises(UnknownFilter):
        index.search_space(other, query, 5, group="hats")
    assert not index.embeddings.flags.writeable and len(index.embeddings) == len(emb)


def test_ivf_builds_from_shards_and_saves_and_loads_its_codes(balanced, tmp_path, monkeypatch):
    emb, products = balanced
    whole = build("ivf", emb, products)
    monkeypatch.setattr(index_module, "SHARD_ROWS", 300)  # 7 shards of the 2,000 products
    sharded = build("ivf", emb, products)
    queries = unit(np.random.default_rng(8), 20)
    ids = [[h.product_id for h in row] for row in sharded.search_batch(queries, 10)]
    assert ids == [[h.product_id for h in row] for row in whole.search_batch(queries, 10)]
    np.testing.assert_allclose(sharded.embeddings, emb, atol=0.02)  # SQ_RANGE_MARGIN

    sharded.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "index.json").read_text())
    assert meta["kind"] == "ivf" and meta["nlist"] == 16 and meta["codes"] == "SQ8"
    loaded = CatalogueIndex.load(tmp_path / "saved")  # the saved faiss codes, no retraining
    assert loaded.kind == "ivf" and len(loaded) == len(emb)
    assert [[h.product_id for h in row] for row in loaded.search_batch(queries, 10)] == ids
    assert loaded.product("p01234") == {**products.iloc[1234].to_dict(), "label": 6}
    np.testing.assert_allclose(loaded.embedding_of("p01234"), emb[1234], atol=1e-2)


def test_colliding_product_id_hashes_still_find_the_right_live_row(balanced, monkeypatch):
    """Every id hashed to one value: lookups tell rows apart by the id itself."""
    monkeypatch.setattr(index_module, "_hash_ids", lambda ids: np.zeros(len(ids), np.uint64))
    emb, products = make_catalogue({"Coat": 0.5, "Bag": 0.5}, n=60)
    index = build("exact", emb, products)
    assert index.product("p00042")["product_id"] == "p00042" and "nope" not in index
    assert index.remove(["p00042"]) == 1 and "p00042" not in index
    index.add(pd.DataFrame({"product_id": ["p00042"], "category": ["Bag"]}), emb[:1])
    assert index.product("p00042")["category"] == "Bag" and len(index) == 60
    np.testing.assert_allclose(index.embedding_of("p00042"), emb[0])


def test_the_evaluate_stage_writes_the_search_structure_the_service_loads(
    skewed, tmp_path, monkeypatch
):
    """Above EXACT_MAX products, build_index saves the built HNSW graph beside the arrays,
    and CatalogueIndex.load (the service's loader) reads it instead of building one."""
    from types import SimpleNamespace

    from components.stages import evaluate

    emb, products = skewed
    monkeypatch.setattr(evaluate, "EXACT_MAX", 500)
    monkeypatch.setattr(index_module, "EXACT_MAX", 500)
    ctx = SimpleNamespace(stage_dir=lambda name: tmp_path)
    catalogue = evaluate.Catalogue(emb, ["navy"] * len(emb))
    out = evaluate.build_index(ctx, products, catalogue)
    assert json.loads((out / "index.json").read_text())["kind"] == "hnsw"

    def no_building(*args, **kwargs):
        raise AssertionError("load built the index instead of reading it")

    monkeypatch.setattr(CatalogueIndex, "build", no_building)
    loaded = CatalogueIndex.load(out)
    assert loaded.kind == "hnsw" and len(loaded) == len(emb)
    assert loaded.search(emb[42], 1)[0].product_id == "p00042"
    assert loaded.search(emb[42], 1, colour="navy")[0].colours == ("navy",)


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_a_kept_filter_follows_adds_and_removes(skewed, kind):
    """Filters are kept between searches (their masks cost ~10 ms on 10M products): an add
    or a remove must still show in the next filtered search."""
    emb, products = skewed
    index = build(kind, emb, products)
    index.subset_exact_max = 0  # the faiss path, with the kept mask and its packed bits
    query = emb[products.index[products["category"] == "Bag"][0]]
    before = [h.product_id for h in index.search(query, 10, category="Bag")]
    assert index.search(query, 10, category="Bag")[0].product_id == before[0]  # kept
    index.remove(before[:3])
    after = [h.product_id for h in index.search(query, 10, category="Bag")]
    assert len(after) == 10 and not set(after) & set(before[:3])
    index.add(pd.DataFrame({"product_id": ["new-bag"], "category": ["Bag"]}), query[None])
    assert index.search(query, 1, category="Bag")[0].product_id == "new-bag"
    assert index.search(query, 1, category="Coat")[0].category == "Coat"
