"""The catalogue vector index: FAISS search, category/group filters, live updates, recommendations.

Embeddings are L2-normalised float32, so inner product = cosine similarity. Each product gets a
stable int64 row id that is never reused: the exact index (IndexFlatIP inside IndexIDMap2) keys its
vectors by row id and drops them with remove_ids; the HNSW index (IndexHNSWFlat, inner product) is
append-only, so its internal id IS the row id and removed rows are masked out through an
IDSelectorBitmap. Filters (category, group, exclude, removed rows) become one bitmap selector passed
in the faiss search parameters; a filter matching at most `subset_exact_max` rows is answered by
exact numpy search over just those rows, and an HNSW query that comes back short is retried with a
wider efSearch and finally exactly, so a filter returns fewer than k hits only when fewer than k
products match it.

Colour: the products table's optional `colours` column (comma-joined palette names, "navy,white",
components/retrieval/colours.py colours_of) becomes one bitmask per row; the `colour` filter keeps
the products whose colours contain it. An index without the column (built before colour tags)
loads as products without colours: a colour filter on it matches no product (an empty answer,
not an error); an unknown colour name raises UnknownColour (a ValueError; the service's 422).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from components.retrieval.colours import (
    COLOURS,
    colour_bits,
    colour_name,
    colours_from_bits,
    split_colour_query,
)
from components.retrieval.tags import GROUPS, OTHER_GROUP, group_of

PRODUCT_COLUMNS = ["product_id", "category", "title", "path"]
FAISS_FILE, META_FILE = "index.faiss", "index.json"
MAX_EF_SEARCH = 4096


class UnknownFilter(ValueError):
    """A category or group filter that names no known value (the service answers 4xx)."""


class UnknownProduct(KeyError):
    """One or more product_ids the index does not hold."""


@dataclass
class Hit:
    product_id: str
    score: float
    category: str
    group: str
    title: str
    path: str
    colours: tuple[str, ...] = ()


def _as_matrix(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    m = np.ascontiguousarray(np.atleast_2d(np.asarray(x, dtype=np.float32)))
    if dim is not None and m.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got {m.shape[1]}")
    return m


class CatalogueIndex:
    """Vector index over catalogue products; see the module docstring for the design."""

    def __init__(self, dim: int, kind: str, *, hnsw_m: int, ef_search: int, ef_construction: int):
        self.dim, self._kind, self.ef_search = dim, kind, ef_search
        self.hnsw_m, self.ef_construction = hnsw_m, ef_construction
        self.subset_exact_max = 20_000  # filters matching <= this many rows: exact numpy search
        self.recency_decay = 0.85  # recommend(): the i-th most recent item weighs decay**i
        if kind == "exact":
            self._faiss: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        else:
            self._faiss = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._faiss.hnsw.efConstruction = ef_construction
        self._emb = np.zeros((0, dim), dtype=np.float32)
        self._records = pd.DataFrame(columns=PRODUCT_COLUMNS)
        self._text = {c: np.zeros(0, dtype=object) for c in PRODUCT_COLUMNS}  # fast Hit fields
        self._cat_code: dict[str, int] = {}  # category -> int code; filters compare int32 arrays
        self._category = np.zeros(0, dtype=np.int32)
        self._colours = np.zeros(0, dtype=np.uint16)  # palette bitmask per row (0: no colours)
        self._alive = np.zeros(0, dtype=bool)
        self._row_of: dict[str, int] = {}

    # ---- construction and persistence -------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        products: pd.DataFrame,
        *,
        exact_max: int = 100_000,
        hnsw_m: int = 32,
        ef_search: int = 128,
        ef_construction: int = 80,
    ) -> CatalogueIndex:
        """Exact index up to `exact_max` products, HNSW above; row i of embeddings = products row i."""
        emb = _as_matrix(embeddings)
        kind = "exact" if len(emb) <= exact_max else "hnsw"
        index = cls(
            emb.shape[1], kind, hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=ef_construction
        )
        index.add(products, emb)
        return index

    @classmethod
    def load(cls, index_dir: Path, **build_kwargs) -> CatalogueIndex:
        """From an artifact folder (embeddings.npy + products.parquet); reuses a saved graph if any."""
        index_dir = Path(index_dir)
        emb = np.load(index_dir / "embeddings.npy")
        products = pd.read_parquet(index_dir / "products.parquet")
        meta_path, faiss_path = index_dir / META_FILE, index_dir / FAISS_FILE
        if not (meta_path.exists() and faiss_path.exists()):
            return cls.build(emb, products, **build_kwargs)
        meta = json.loads(meta_path.read_text())
        if meta["rows"] != len(products) or len(emb) != len(products):
            return cls.build(emb, products, **build_kwargs)
        index = cls(
            emb.shape[1],
            meta["kind"],
            hnsw_m=meta["hnsw_m"],
            ef_search=build_kwargs.get("ef_search", meta["ef_search"]),
            ef_construction=meta["ef_construction"],
        )
        index._append_rows(products, _as_matrix(emb, index.dim))
        index._faiss = faiss.read_index(str(faiss_path))
        return index

    def save(self, index_dir: Path) -> None:
        """Write the live products in artifact format, plus the faiss graph when it maps 1:1."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(self._alive)
        np.save(index_dir / "embeddings.npy", self._emb[rows])
        self._records.iloc[rows].reset_index(drop=True).to_parquet(
            index_dir / "products.parquet", index=False
        )
        (index_dir / FAISS_FILE).unlink(missing_ok=True)
        if len(rows) == len(self._alive):  # no removals: faiss ids are rows 0..n-1 of the files
            faiss.write_index(self._faiss, str(index_dir / FAISS_FILE))
        meta = {"kind": self._kind, "rows": len(rows), "dim": self.dim, "hnsw_m": self.hnsw_m}
        meta |= {"ef_search": self.ef_search, "ef_construction": self.ef_construction}
        (index_dir / META_FILE).write_text(json.dumps(meta, indent=2))

    def __len__(self) -> int:
        return len(self._row_of)

    @property
    def kind(self) -> str:
        return self._kind

    # ---- live updates ---------------------------------------------------------------------
    def add(self, products: pd.DataFrame, embeddings: np.ndarray) -> None:
        """Make products searchable at once; a product_id already present is replaced."""
        emb = _as_matrix(embeddings, self.dim)
        if len(emb) != len(products):
            raise ValueError(f"{len(products)} products but {len(emb)} embeddings")
        ids = products["product_id"].astype(str)
        if ids.duplicated().any():
            raise ValueError(f"duplicate product_ids: {sorted(set(ids[ids.duplicated()]))[:5]}")
        self.remove([pid for pid in ids if pid in self._row_of])
        start = len(self._alive)
        self._append_rows(products, emb)
        if self._kind == "exact":
            self._faiss.add_with_ids(emb, np.arange(start, start + len(emb), dtype=np.int64))
        else:
            self._faiss.add(emb)

    def _append_rows(self, products: pd.DataFrame, emb: np.ndarray) -> None:
        records = pd.DataFrame(
            {c: products.get(c, "") for c in PRODUCT_COLUMNS}, index=products.index
        )
        extra = [c for c in products.columns if c not in PRODUCT_COLUMNS]
        records = pd.concat([records, products[extra]], axis=1).reset_index(drop=True)
        records[["product_id", "category", "title", "path"]] = (
            records[["product_id", "category", "title", "path"]].fillna("").astype(str)
        )
        start = len(self._alive)
        self._records = pd.concat([self._records, records], ignore_index=True) if start else records
        self._emb = np.concatenate([self._emb, emb]) if start else emb
        for c in PRODUCT_COLUMNS:
            self._text[c] = np.concatenate([self._text[c], records[c].to_numpy(dtype=object)])
        for cat in pd.unique(records["category"]):
            self._cat_code.setdefault(cat, len(self._cat_code))
        codes = records["category"].map(self._cat_code).to_numpy(dtype=np.int32)
        self._category = np.concatenate([self._category, codes])
        names = records["colours"] if "colours" in records else pd.Series("", index=records.index)
        names = names.fillna("").astype(str)
        bits = names.map({v: colour_bits(v) for v in pd.unique(names)}).to_numpy(np.uint16)
        self._colours = np.concatenate([self._colours, bits])
        self._alive = np.concatenate([self._alive, np.ones(len(emb), dtype=bool)])
        self._row_of.update({pid: start + i for i, pid in enumerate(records["product_id"])})

    def remove(self, product_ids: list[str]) -> int:
        """Drop products from results at once; returns how many were present."""
        rows = [self._row_of.pop(pid) for pid in dict.fromkeys(product_ids) if pid in self._row_of]
        if rows:
            self._alive[rows] = False
            if self._kind == "exact":
                self._faiss.remove_ids(np.asarray(rows, dtype=np.int64))
        return len(rows)

    # ---- lookups --------------------------------------------------------------------------
    def _row(self, product_id: str) -> int:
        if product_id not in self._row_of:
            raise UnknownProduct(f"unknown product_id: {product_id}")
        return self._row_of[product_id]

    def embedding_of(self, product_id: str) -> np.ndarray:
        return self._emb[self._row(product_id)].copy()

    def product(self, product_id: str) -> dict:
        record = self._records.iloc[self._row(product_id)].to_dict()
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in record.items()}

    def _hit(self, row: int, score: float) -> Hit:
        pid, cat, title, path = (self._text[c][row] for c in PRODUCT_COLUMNS)
        colours = colours_from_bits(int(self._colours[row]))
        return Hit(pid, float(score), cat, group_of(cat), title, path, colours)

    # ---- search ---------------------------------------------------------------------------
    def colour_count(self, colour: str) -> int:
        """How many live products have `colour` (0 on an index without colours)."""
        bit = 1 << COLOURS.index(colour_name(colour))
        return int(((self._colours & bit) != 0)[self._alive].sum())

    def colour_preference(self, query: str) -> tuple[str | None, str]:
        """(colour, text) of a text query: its first colour word (tags.split_colour_query) and
        the rest as the text to match, when some live product has that colour; else (None, the
        whole query), so a grayscale catalogue searches "blue jeans" as it always did."""
        colour, rest = split_colour_query(query)
        if colour is None or not self.colour_count(colour):
            return None, query
        return colour, rest or query

    def _filter_mask(
        self,
        category: str | None,
        group: str | None,
        exclude: set[str] | None,
        *colours: str | None,
    ):
        """Boolean mask over rows, or None when every live row qualifies and faiss holds only those."""
        mask = None
        if category is not None:
            known = {c.lower(): c for c in [*GROUPS, *self._cat_code]}
            if category.lower() not in known:
                valid = sorted(set(known.values()))
                raise UnknownFilter(f"unknown category {category!r}; valid: {valid}")
            mask = self._category == self._cat_code.get(known[category.lower()], -1)
        if group is not None:
            groups = sorted({*GROUPS.values(), OTHER_GROUP})
            if group.lower() not in groups:
                raise UnknownFilter(f"unknown group {group!r}; valid: {groups}")
            codes = [code for cat, code in self._cat_code.items() if group_of(cat) == group.lower()]
            g = np.isin(self._category, codes)
            mask = g if mask is None else mask & g
        bits = sum({1 << COLOURS.index(colour_name(c)) for c in colours if c is not None})
        if bits:  # products having every colour given
            has = (self._colours & bits) == bits
            mask = has if mask is None else mask & has
        rows = [self._row_of[p] for p in exclude or () if p in self._row_of]
        needs_alive = self._kind == "hnsw" and not self._alive.all()
        if mask is None and not rows and not needs_alive:
            return None
        mask = self._alive.copy() if mask is None else mask & self._alive
        mask[rows] = False
        return mask

    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        *,
        category: str | None = None,
        group: str | None = None,
        exclude: set[str] | None = None,
        colour: str | None = None,
    ) -> list[Hit]:
        """The k products most similar to one query vector (D,), best first."""
        return self.search_batch(
            _as_matrix(query), k, category=category, group=group, exclude=exclude, colour=colour
        )[0]

    def search_batch(
        self,
        queries: np.ndarray,
        k: int,
        *,
        category: str | None = None,
        group: str | None = None,
        exclude: set[str] | None = None,
        colour: str | None = None,
    ) -> list[list[Hit]]:
        """search() for each row of queries (B, D); the filters apply to every query."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_matrix(queries, self.dim)
        mask = self._filter_mask(category, group, exclude, colour)
        n_match = len(self) if mask is None else int(mask.sum())
        want = min(k, n_match)
        if want == 0:
            return [[] for _ in q]
        if mask is not None and n_match <= self.subset_exact_max:
            scores, rows = self._exact_subset(q, want, np.flatnonzero(mask))
        else:
            scores, rows = self._faiss_search(q, want, mask, n_match)
        return [
            [self._hit(r, s) for s, r in zip(srow, rrow, strict=True) if r >= 0]
            for srow, rrow in zip(scores, rows, strict=True)
        ]

    def _faiss_search(self, q: np.ndarray, k: int, mask: np.ndarray | None, n_match: int):
        ef = max(self.ef_search, k)
        if mask is not None and self._kind == "hnsw":  # filtered HNSW: widen ef by selectivity
            ef = min(MAX_EF_SEARCH, max(ef, int(4 * k * len(self._alive) / n_match)))
        scores, rows = self._faiss_call(q, k, mask, ef)
        short = np.flatnonzero((rows < 0).any(axis=1))
        while len(short) and ef < MAX_EF_SEARCH:  # only HNSW can come back short here
            ef = min(MAX_EF_SEARCH, ef * 4)
            scores[short], rows[short] = self._faiss_call(q[short], k, mask, ef)
            short = short[(rows[short] < 0).any(axis=1)]
        if len(short):
            subset = np.flatnonzero(self._alive if mask is None else mask)
            scores[short], rows[short] = self._exact_subset(q[short], k, subset)
        return scores, rows

    def _faiss_call(self, q: np.ndarray, k: int, mask: np.ndarray | None, ef: int):
        params = faiss.SearchParametersHNSW() if self._kind == "hnsw" else faiss.SearchParameters()
        if self._kind == "hnsw":
            params.efSearch = ef
        if mask is not None:  # bits and selector stay referenced (locals) until search returns
            bits = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
            params.sel = selector
        scores, rows = self._faiss.search(q, k, params=params)
        return scores, rows

    def _exact_subset(self, q: np.ndarray, k: int, subset: np.ndarray):
        sims = q @ self._emb[subset].T
        k = min(k, len(subset))
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, order, 1), subset[np.take_along_axis(top, order, 1)]

    def search_space(
        self,
        vectors: np.ndarray,
        query: np.ndarray,
        k: int,
        *,
        category: str | None = None,
        group: str | None = None,
        colour: str | None = None,
        prefer_colour: str | None = None,
    ) -> list[Hit]:
        """Exact top-k of the live products in ANOTHER vector space (e.g. the text space).

        `vectors` row i describes index row i (`self.embeddings` row i, removed rows included);
        rows added after `vectors` was computed are not ranked. Filters work as in search().
        `prefer_colour` ranks the products of that colour first (best first among them), then,
        only when fewer than k of them match the filters, the best others (best first).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        first: list[Hit] = []
        if prefer_colour is not None:
            mask = self._filter_mask(category, group, None, colour, prefer_colour)
            first = self._rank_space(vectors, query, k, mask)
            if len(first) >= k:
                return first
        seen = {hit.product_id for hit in first}
        rest = self._rank_space(
            vectors, query, k + len(first), self._filter_mask(category, group, None, colour)
        )
        return first + [hit for hit in rest if hit.product_id not in seen][: k - len(first)]

    def _rank_space(self, vectors: np.ndarray, query: np.ndarray, k: int, mask) -> list[Hit]:
        mask = self._alive.copy() if mask is None else mask
        mask[len(vectors) :] = False
        rows = np.flatnonzero(mask)
        if len(rows) == 0:
            return []
        scores = vectors[rows] @ np.asarray(query, dtype=np.float32).reshape(-1)
        k = min(k, len(rows))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [self._hit(int(rows[i]), float(scores[i])) for i in top]

    @property
    def embeddings(self) -> np.ndarray:
        """Every row's embedding, removed rows included (row i = faiss id i); read-only view."""
        view = self._emb.view()
        view.flags.writeable = False
        return view

    # ---- recommendations ------------------------------------------------------------------
    def recommend(self, history: list[str], k: int = 10, *, diversify: bool = False) -> list[Hit]:
        """k products not in `history` (oldest first), ranked by similarity to it.

        The profile is the recency-weighted mean of the history's embeddings (the i-th most recent
        item weighs recency_decay**i), re-normalised. diversify=True takes each category's top k
        (filtered searches) and deals them round-robin, categories in order of their best hit:
        with c categories no category holds more than ceil(k / c) places.
        """
        if not history:
            raise ValueError("history is empty: nothing to recommend from")
        unknown = [pid for pid in dict.fromkeys(history) if pid not in self._row_of]
        if unknown:
            raise UnknownProduct(f"unknown product_ids in history: {unknown}")
        weights = self.recency_decay ** np.arange(len(history))[::-1]
        rows = [self._row_of[pid] for pid in history]
        profile = (weights[:, None] * self._emb[rows]).sum(axis=0)
        profile /= max(float(np.linalg.norm(profile)), 1e-12)
        if not diversify:
            return self.search(profile, k, exclude=set(history))
        per_category = [
            self.search(profile, k, category=cat, exclude=set(history)) for cat in self._cat_code
        ]
        return _round_robin([hits for hits in per_category if hits], k)


def _round_robin(queues: list[list[Hit]], k: int) -> list[Hit]:
    """Deal one hit per category per round, categories in order of their best hit."""
    queues = sorted(queues, key=lambda hits: -hits[0].score)
    out: list[Hit] = []
    for rank in range(k):
        out += [hits[rank] for hits in queues if rank < len(hits)]
    return out[:k]
