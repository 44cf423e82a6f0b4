"""The catalogue vector index: FAISS search, category/group filters, live updates, recommendations.

Embeddings are L2-normalised float32, so inner product = cosine similarity. Each product gets a
stable int64 row id that is never reused. Three kinds, chosen by catalogue size (`build`):
- "exact" (up to `exact_max`, 100,000): IndexFlatIP inside IndexIDMap2, keyed by row id;
  removed rows are dropped with remove_ids.
- "hnsw" (up to `ivf_min`, 2,000,000): IndexHNSWFlat, inner product.
- "ivf" (above): an inverted file of `nlist` k-means lists (√n rounded to a power of two)
  holding compressed codes (`codes`, a faiss factory suffix: "SQ8", one byte a dimension, by
  default; "PQ32" etc. also work), searched over `nprobe` lists. It keeps no float copy of
  the vectors: `embedding_of`, recommendations and exact subset search decode the codes
  (within ~1e-3 of the originals with SQ8). Built from shards of SHARD_ROWS vectors, so a
  catalogue of tens of millions of products never needs all its float vectors in memory.
hnsw and ivf are append-only: their faiss id IS the row id, and removed rows are masked out
through an IDSelectorBitmap. Filters (category, group, exclude, removed rows) become one bitmap
selector passed in the faiss search parameters; a filter matching at most `subset_exact_max`
rows is answered by exact numpy search over just those rows, and an approximate query that
comes back short is retried wider (efSearch, nprobe) and finally exactly, so a filter returns
fewer than k hits only when fewer than k products match it.

Memory at scale (benchmarks/index.py --n 10000000): the product records live in an Arrow
table (compact strings, not Python objects) and product_id -> row is `RowIds` (16 bytes a
product), so the 10M-product ivf index stays within a few GB.

Colour: the products table's optional `colours` column (comma-joined palette names, "navy,white",
components/retrieval/colours.py colours_of) becomes one bitmask per row; the `colour` filter keeps
the products whose colours contain it. An index without the column (built before colour tags)
loads as products without colours: a colour filter on it matches no product (an empty answer,
not an error); an unknown colour name raises UnknownColour (a ValueError; the service's 422).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
EXACT_MAX, IVF_MIN = 100_000, 2_000_000  # build(): exact up to EXACT_MAX, HNSW below IVF_MIN
MAX_FILTERS = 32  # filter masks kept (a byte a row each, plus a bit a row packed)
SHARD_ROWS = 500_000  # vectors handed to faiss (and decoded) at a time
IVF_TRAIN_PER_LIST = 40  # k-means training vectors per ivf list (faiss asks for at least 39)
# Scalar-quantizer codes cover each dimension's range in the training sample widened by this
# share on both sides: vectors outside it (rarer products, later additions) are clipped. On
# tests/unit/test_search.py's catalogue, trained on a third of it, the worst decoding error was
# 0.19 at 0, 0.016 at 0.2, at a mean error 0.0010 -> 0.0012.
SQ_RANGE_MARGIN = 0.2

Products = pd.DataFrame | pa.Table


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


@dataclass
class Filter:
    """The rows a search may return: a read-only mask over rows, how many it keeps, and the
    mask packed for faiss's IDSelectorBitmap (packed once: ~3 ms on 10M rows)."""

    mask: np.ndarray
    count: int
    _bits: np.ndarray | None = None

    def bits(self) -> np.ndarray:
        if self._bits is None:
            self._bits = np.packbits(self.mask, bitorder="little")
        return self._bits


@dataclass(frozen=True)
class Settings:
    """How the faiss index is built and searched (saved in index.json beside it)."""

    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 80
    nlist: int = 0  # ivf lists; 0: √n rounded to a power of two, chosen at build
    nprobe: int = 32
    codes: str = "SQ8"


def ivf_lists(n: int) -> int:
    """√n rounded to a power of two, 64..65536: 4,096 lists for 10M products."""
    return int(min(65536, max(64, 2 ** round(math.log2(max(n, 1)) / 2))))


def _as_matrix(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    m = np.ascontiguousarray(np.atleast_2d(np.asarray(x, dtype=np.float32)))
    if dim is not None and m.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got {m.shape[1]}")
    return m


def _as_table(products: Products) -> pa.Table:
    """The records of `products`: the four product columns as strings ("" for missing) first,
    then any other columns as they are."""
    if isinstance(products, pd.DataFrame):
        products = pa.Table.from_pandas(products.reset_index(drop=True), preserve_index=False)
    n = products.num_rows
    columns = {}
    for c in PRODUCT_COLUMNS:
        values = products[c] if c in products.column_names else pa.nulls(n, pa.string())
        columns[c] = pc.fill_null(pc.cast(values, pa.string()), "")
    columns |= {c: products[c] for c in products.column_names if c not in PRODUCT_COLUMNS}
    return pa.table(columns)


def _hash_ids(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)  # ~25 µs a call


class RowIds:
    """product_id -> row for tens of millions of products: the 64-bit hashes of the ids,
    sorted, beside their rows (16 bytes a product; a dict of Python strings takes ~100).
    A hash can point at several rows (a removed product added again, or, rarely, two ids
    with one hash): `rows` keeps the live one whose id matches."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, np.uint64)
        self._rows = np.zeros(0, np.int64)

    def extend(self, ids: np.ndarray, start: int) -> None:
        """Rows start, start+1, … hold `ids`."""
        keys = np.concatenate([self._keys, _hash_ids(ids)])
        rows = np.concatenate([self._rows, np.arange(start, start + len(ids), dtype=np.int64)])
        order = np.argsort(keys, kind="stable")
        self._keys, self._rows = keys[order], rows[order]

    def rows(self, ids: Sequence[str], alive: np.ndarray, id_column: pa.ChunkedArray) -> np.ndarray:
        """The live row of each id, -1 where none."""
        ids = list(ids)
        out = np.full(len(ids), -1, np.int64)
        if not ids:
            return out
        keys = _hash_ids(ids)
        left = np.searchsorted(self._keys, keys, "left")
        right = np.searchsorted(self._keys, keys, "right")
        for i in np.flatnonzero(right > left):
            for row in self._rows[left[i] : right[i]]:
                if alive[row] and id_column[int(row)].as_py() == ids[i]:
                    out[i] = row
        return out


class CatalogueIndex:
    """Vector index over catalogue products; see the module docstring for the design."""

    def __init__(self, dim: int, kind: str, settings: Settings, trained: faiss.Index | None = None):
        self.dim, self._kind, self.settings = dim, kind, settings
        self.ef_search, self.nprobe = settings.ef_search, settings.nprobe
        self.subset_exact_max = 20_000  # filters matching <= this many rows: exact numpy search
        self.recency_decay = 0.85  # recommend(): the i-th most recent item weighs decay**i
        if kind == "exact":
            self._faiss: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            self._faiss = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._faiss.hnsw.efConstruction = settings.ef_construction
        elif trained is not None:  # ivf: trained by `_train_ivf`
            self._faiss = trained
        else:
            raise ValueError(f"unknown index kind {kind!r} (or an ivf index without training)")
        self._emb = np.zeros((0, dim), dtype=np.float32)  # exact and hnsw only
        self._records = _as_table(pd.DataFrame(columns=PRODUCT_COLUMNS))
        self._chunks: list | None = None  # _columns(), rebuilt after each append
        self._ids = RowIds()
        self._cat_code: dict[str, int] = {}  # category -> int code; filters compare int32 arrays
        self._category = np.zeros(0, dtype=np.int32)
        self._colours = np.zeros(0, dtype=np.uint16)  # palette bitmask per row (0: no colours)
        self._alive = np.zeros(0, dtype=bool)
        self._live = 0
        self._filters: dict[
            tuple, Filter | None
        ] = {}  # by (category, group, colours) until a change

    # ---- construction and persistence -------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        products: Products,
        *,
        exact_max: int | None = None,
        ivf_min: int | None = None,
        **settings,
    ) -> CatalogueIndex:
        """Exact index up to `exact_max` (EXACT_MAX) products, HNSW below `ivf_min` (IVF_MIN),
        IVF above; row i of embeddings (an array or a memory map) = products row i. Fed to
        faiss in shards."""
        exact_max = EXACT_MAX if exact_max is None else exact_max
        ivf_min = IVF_MIN if ivf_min is None else ivf_min
        n = len(embeddings)
        if n != len(products):
            raise ValueError(f"{len(products)} products but {n} embeddings")
        table = _as_table(products)
        ids = pc.value_counts(table["product_id"])
        repeated = pc.filter(ids.field("values"), pc.greater(ids.field("counts"), 1))
        if len(repeated):
            raise ValueError(f"duplicate product_ids: {sorted(repeated.to_pylist())[:5]}")
        kind = "exact" if n <= exact_max else "hnsw" if n < ivf_min else "ivf"
        config = Settings(**settings)
        trained = None
        if kind == "ivf":
            config = Settings(**(settings | {"nlist": settings.get("nlist") or ivf_lists(n)}))
            trained = cls.train_ivf(embeddings, config)
        index = cls(embeddings.shape[1], kind, config, trained)
        for start in range(0, n, SHARD_ROWS):
            stop = start + SHARD_ROWS
            index._append(table.slice(start, SHARD_ROWS), _as_matrix(embeddings[start:stop]))
        return index

    @staticmethod
    def train_ivf(embeddings: np.ndarray, settings: Settings, seed: int = 0) -> faiss.Index:
        """An empty IVF index (`settings.nlist` lists of `settings.codes` codes) trained on a
        sample of IVF_TRAIN_PER_LIST vectors a list (all of them when fewer)."""
        n, dim = embeddings.shape
        take = min(n, settings.nlist * IVF_TRAIN_PER_LIST)
        rows = np.sort(np.random.default_rng(seed).choice(n, take, replace=False))
        sample = _as_matrix(embeddings[rows])
        factory = f"IVF{settings.nlist},{settings.codes}"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if isinstance(index, faiss.IndexIVFScalarQuantizer):
            index.sq.rangestat_arg = SQ_RANGE_MARGIN
        index.train(sample)
        index.set_direct_map_type(faiss.DirectMap.Array)  # decoding a row: reconstruct(row)
        return index

    @classmethod
    def load(cls, index_dir: Path, **build_kwargs) -> CatalogueIndex:
        """From an artifact folder (embeddings.npy + products.parquet); reuses a saved faiss
        index if any. The embeddings are memory-mapped, read a shard at a time."""
        index_dir = Path(index_dir)
        emb = np.load(index_dir / "embeddings.npy", mmap_mode="r")
        products = pq.read_table(index_dir / "products.parquet")
        meta_path, faiss_path = index_dir / META_FILE, index_dir / FAISS_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if not (meta and faiss_path.exists()) or not meta["rows"] == len(emb) == len(products):
            return cls.build(emb, products, **build_kwargs)
        saved = {f: meta[f] for f in Settings.__dataclass_fields__ if f in meta}
        tuned = {f: build_kwargs[f] for f in ("ef_search", "nprobe") if f in build_kwargs}
        faiss_index = faiss.read_index(str(faiss_path))
        ivf = meta["kind"] == "ivf"
        index = cls(emb.shape[1], meta["kind"], Settings(**(saved | tuned)), faiss_index)
        if ivf:
            faiss_index.set_direct_map_type(faiss.DirectMap.Array)
        else:
            for start in range(0, len(emb), SHARD_ROWS):
                index._emb_parts(_as_matrix(emb[start : start + SHARD_ROWS]))
        index._faiss = faiss_index
        for start in range(0, len(products), SHARD_ROWS):
            index._append_rows(products.slice(start, SHARD_ROWS))
        return index

    def save(self, index_dir: Path) -> None:
        """Write the live products in artifact format (an ivf index writes its decoded
        vectors), plus the faiss index when it maps 1:1 (`write_search_structure`)."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(self._alive)
        out = np.lib.format.open_memmap(
            index_dir / "embeddings.npy", "w+", np.float32, (len(rows), self.dim)
        )
        for start in range(0, len(rows), SHARD_ROWS):
            out[start : start + SHARD_ROWS] = self._vectors(rows[start : start + SHARD_ROWS])
        out.flush()
        del out
        pq.write_table(self._records.take(rows), index_dir / "products.parquet")
        self.write_search_structure(index_dir)

    def write_search_structure(self, index_dir: Path) -> None:
        """Write the faiss index (and index.json) beside the artifact's embeddings.npy and
        products.parquet, so `load` reads it instead of building: an HNSW graph or IVF lists
        of millions of products take minutes to build. Only when it maps 1:1 onto those files
        (no removals); otherwise an older one is deleted and `load` builds."""
        index_dir = Path(index_dir)
        (index_dir / FAISS_FILE).unlink(missing_ok=True)
        (index_dir / META_FILE).unlink(missing_ok=True)
        if self._live != len(self._alive):  # removals: faiss ids are no longer file rows
            return
        faiss.write_index(self._faiss, str(index_dir / FAISS_FILE))
        meta = {"kind": self._kind, "rows": self._live, "dim": self.dim}
        settings = {f: getattr(self.settings, f) for f in Settings.__dataclass_fields__}
        meta |= settings | {"ef_search": self.ef_search, "nprobe": self.nprobe}
        (index_dir / META_FILE).write_text(json.dumps(meta, indent=2))

    def __len__(self) -> int:
        return self._live

    @property
    def kind(self) -> str:
        return self._kind

    # ---- live updates ---------------------------------------------------------------------
    def add(self, products: Products, embeddings: np.ndarray) -> None:
        """Make products searchable at once; a product_id already present is replaced."""
        emb = _as_matrix(embeddings, self.dim)
        table = _as_table(products)
        if len(emb) != table.num_rows:
            raise ValueError(f"{table.num_rows} products but {len(emb)} embeddings")
        ids = table["product_id"].to_numpy(zero_copy_only=False)
        unique, counts = np.unique(ids.astype(str), return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate product_ids: {sorted(unique[counts > 1])[:5]}")
        self.remove(ids.tolist())
        self._append(table, emb)

    def _append(self, table: pa.Table, emb: np.ndarray) -> None:
        start = len(self._alive)
        if self._kind != "exact" and self._faiss.ntotal != start:  # exact drops removed rows
            raise RuntimeError(f"faiss holds {self._faiss.ntotal} rows, the index {start}")
        if self._kind == "exact":
            self._faiss.add_with_ids(emb, np.arange(start, start + len(emb), dtype=np.int64))
        else:
            self._faiss.add(emb)  # hnsw and ivf number their vectors 0, 1, …: the row ids
        if self._kind != "ivf":
            self._emb_parts(emb)
        self._append_rows(table)

    def _emb_parts(self, emb: np.ndarray) -> None:
        self._emb = np.concatenate([self._emb, emb]) if len(self._emb) else emb

    def _append_rows(self, products: pa.Table) -> None:
        table, start = _as_table(products), len(self._alive)
        self._records = pa.concat_tables([self._records, table], promote_options="permissive")
        if self._records["product_id"].num_chunks > 64:  # many small adds: fewer, larger chunks
            self._records = self._records.combine_chunks()
        self._chunks = None
        categories = table["category"].combine_chunks().dictionary_encode()
        for cat in categories.dictionary.to_pylist():
            self._cat_code.setdefault(cat, len(self._cat_code))
        codes = np.array([self._cat_code[c] for c in categories.dictionary.to_pylist()], np.int32)
        self._category = np.concatenate([self._category, codes[categories.indices.to_numpy()]])
        bits = np.zeros(table.num_rows, np.uint16)
        if "colours" in table.column_names:
            names = pc.fill_null(pc.cast(table["colours"], pa.string()), "").combine_chunks()
            names = names.dictionary_encode()
            palette = np.array([colour_bits(v) for v in names.dictionary.to_pylist()], np.uint16)
            bits = palette[names.indices.to_numpy()]
        self._colours = np.concatenate([self._colours, bits])
        self._alive = np.concatenate([self._alive, np.ones(table.num_rows, dtype=bool)])
        self._live += table.num_rows
        self._filters.clear()
        self._ids.extend(table["product_id"].to_numpy(zero_copy_only=False), start)

    def remove(self, product_ids: list[str]) -> int:
        """Drop products from results at once; returns how many were present."""
        rows = self._rows_of(list(dict.fromkeys(product_ids)))
        rows = rows[rows >= 0]
        if len(rows):
            self._alive[rows] = False
            self._live -= len(rows)
            self._filters.clear()
            if self._kind == "exact":
                self._faiss.remove_ids(rows)
        return len(rows)

    # ---- lookups --------------------------------------------------------------------------
    def _rows_of(self, product_ids: Sequence[str]) -> np.ndarray:
        return self._ids.rows(product_ids, self._alive, self._records["product_id"])

    def _row(self, product_id: str) -> int:
        row = int(self._rows_of([product_id])[0])
        if row < 0:
            raise UnknownProduct(f"unknown product_id: {product_id}")
        return row

    def __contains__(self, product_id: str) -> bool:
        return bool(self._rows_of([product_id])[0] >= 0)

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """The embeddings of `rows` (decoded from the codes in an ivf index)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._kind != "ivf":
            return self._emb[rows]
        if len(rows) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._faiss.reconstruct_batch(rows)

    def embedding_of(self, product_id: str) -> np.ndarray:
        return self._vectors(np.array([self._row(product_id)]))[0].copy()

    def product(self, product_id: str) -> dict:
        return self._records.slice(self._row(product_id), 1).to_pylist()[0]

    def _columns(self) -> list[tuple[np.ndarray, list[pa.StringArray]]]:
        """Per product column: where each of its chunks starts, and the chunks. A row is read
        from its chunk (taking rows from a chunked column would combine the chunks: ~10 ms a
        call on 2M products)."""
        if self._chunks is None:
            self._chunks = [
                (np.cumsum([0] + [len(c) for c in col.chunks]), col.chunks)
                for col in (self._records[c] for c in PRODUCT_COLUMNS)
            ]
        return self._chunks

    def _hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        fields = []
        for starts, chunks in self._columns():
            which = np.searchsorted(starts, rows, "right") - 1
            offsets = (rows - starts[which]).tolist()
            fields.append(
                [chunks[c][o].as_py() for c, o in zip(which.tolist(), offsets, strict=True)]
            )
        return [
            Hit(pid, float(score), cat, group_of(cat), title, path, colours_from_bits(int(bits)))
            for pid, cat, title, path, score, bits in zip(
                *fields, scores, self._colours[rows], strict=True
            )
        ]

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

    def _filter(
        self,
        category: str | None,
        group: str | None,
        exclude: set[str] | None,
        *colours: str | None,
    ) -> Filter | None:
        """The rows the filters keep, or None when every live row qualifies and faiss holds
        only those. Without `exclude`, the answer is kept until the next add or remove: on
        10M products building a category's mask took ~10 ms a query."""
        bits = sum({1 << COLOURS.index(colour_name(c)) for c in colours if c is not None})
        key = (category and category.lower(), group and group.lower(), bits)
        if key not in self._filters:
            if len(self._filters) >= MAX_FILTERS:  # each holds a mask of every row
                self._filters.clear()
            self._filters[key] = self._build_filter(category, group, bits)
        found = self._filters[key]
        rows = self._rows_of(sorted(exclude or ()))
        rows = rows[rows >= 0]
        if not len(rows):
            return found
        mask = self._alive.copy() if found is None else found.mask.copy()
        mask[rows] = False
        return Filter(mask, int(mask.sum()))

    def _build_filter(self, category: str | None, group: str | None, bits: int) -> Filter | None:
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
        if bits:  # products having every colour given
            has = (self._colours & bits) == bits
            mask = has if mask is None else mask & has
        if mask is None and (self._kind == "exact" or self._live == len(self._alive)):
            return None
        mask = self._alive.copy() if mask is None else mask & self._alive
        mask.flags.writeable = False
        return Filter(mask, int(mask.sum()))

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
        keep = self._filter(category, group, exclude, colour)
        want = min(k, len(self) if keep is None else keep.count)
        if want == 0:
            return [[] for _ in q]
        if keep is not None and keep.count <= self.subset_exact_max:
            scores, rows = self._exact_subset(q, want, np.flatnonzero(keep.mask))
        else:
            scores, rows = self._faiss_search(q, want, keep)
        return [self._hits(r[r >= 0], s[r >= 0]) for s, r in zip(scores, rows, strict=True)]

    def _faiss_search(self, q: np.ndarray, k: int, keep: Filter | None):
        """Approximate search, widened by the filter's selectivity (efSearch and nprobe in
        proportion: a filter keeping a tenth of the products probes ten times the lists), then
        widened further for queries that came back short, finally exact for those still short.
        On 10M products with a tenth kept (benchmarks/index.py), widening nprobe 8 by √share
        only gave a filtered recall@10 of 0.69.

        HNSW under a filter keeping less than half the products scans the graph's own flat
        storage instead, exactly, skipping the rest by the selector: a category's products
        sit in their own parts of the space, and the graph walk from a query elsewhere rarely
        reaches them (a tenth kept, 200,000 products: recall@10 0.17 at efSearch 400, 0.75 at
        1,600; the scan: 1.0 at 3.8 ms a query on one thread)."""
        share = len(self._alive) / keep.count if keep is not None else 1.0
        if self._kind == "hnsw" and share > 2:
            return self._call(faiss.downcast_index(self._faiss.storage), q, k, keep)
        if self._kind == "ivf":
            widest = self.settings.nlist
            width = min(widest, max(self.nprobe, int(self.nprobe * share)))
        else:
            widest = MAX_EF_SEARCH
            width = min(
                widest, max(self.ef_search, k, int(4 * k * share) if keep is not None else 0)
            )
        scores, rows = self._faiss_call(q, k, keep, width)
        short = np.flatnonzero((rows < 0).any(axis=1))
        while len(short) and self._kind != "exact" and width < widest:
            width = min(widest, width * 4)
            scores[short], rows[short] = self._faiss_call(q[short], k, keep, width)
            short = short[(rows[short] < 0).any(axis=1)]
        if len(short):
            subset = np.flatnonzero(self._alive if keep is None else keep.mask)
            scores[short], rows[short] = self._exact_subset(q[short], k, subset)
        return scores, rows

    def _faiss_call(self, q: np.ndarray, k: int, keep: Filter | None, width: int):
        if self._kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = width
        elif self._kind == "ivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = width
        else:
            params = faiss.SearchParameters()
        return self._call(self._faiss, q, k, keep, params)

    @staticmethod
    def _call(index: faiss.Index, q: np.ndarray, k: int, keep: Filter | None, params=None):
        """index.search, only over the rows `keep` keeps (when given)."""
        params = params or faiss.SearchParameters()
        if keep is not None:  # bits and selector stay referenced (locals) until search returns
            bits = keep.bits()
            selector = faiss.IDSelectorBitmap(len(keep.mask), faiss.swig_ptr(bits))
            params.sel = selector
        scores, rows = index.search(q, k, params=params)
        return scores, rows

    def _exact_subset(self, q: np.ndarray, k: int, subset: np.ndarray):
        sims = q @ self._vectors(subset).T
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
            first = self._rank_space(
                vectors, query, k, self._filter(category, group, None, colour, prefer_colour)
            )
            if len(first) >= k:
                return first
        seen = {hit.product_id for hit in first}
        rest = self._rank_space(
            vectors, query, k + len(first), self._filter(category, group, None, colour)
        )
        return first + [hit for hit in rest if hit.product_id not in seen][: k - len(first)]

    def _rank_space(
        self, vectors: np.ndarray, query: np.ndarray, k: int, keep: Filter | None
    ) -> list[Hit]:
        mask = (self._alive if keep is None else keep.mask).copy()
        mask[len(vectors) :] = False
        rows = np.flatnonzero(mask)
        if len(rows) == 0:
            return []
        scores = vectors[rows] @ np.asarray(query, dtype=np.float32).reshape(-1)
        k = min(k, len(rows))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return self._hits(rows[top], scores[top])

    @property
    def embeddings(self) -> np.ndarray:
        """Every row's embedding, removed rows included (row i = faiss id i); read-only. An
        ivf index decodes them all: a new array of n × dim floats."""
        view = (
            self._emb.view() if self._kind != "ivf" else self._vectors(np.arange(len(self._alive)))
        )
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
        rows = self._rows_of(history)
        unknown = list(dict.fromkeys(p for p, r in zip(history, rows, strict=True) if r < 0))
        if unknown:
            raise UnknownProduct(f"unknown product_ids in history: {unknown}")
        weights = self.recency_decay ** np.arange(len(history))[::-1]
        profile = (weights[:, None] * self._vectors(rows)).sum(axis=0)
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
