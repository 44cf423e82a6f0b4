"""Ingest and read the catalogue: images as files plus manifest.parquet.

The manifest schema (one row per product, nothing ever dropped at ingest):

    product_id  str   unique key of the product
    path        str   image path relative to the catalogue folder ('' when the source file is missing)
    label       int   index into params.data.categories, -1 when the category is unknown
    category    str   the category name as the source gave it
    title       str   free text about the product ('' when the source has none)
    sha256      str   hex digest of the image bytes ('' when the file is missing)
    width       int   pixels (0 when the image does not decode)
    height      int   pixels (0 when the image does not decode)
    split       str   'train' or 'test' (the frozen evaluation split)
    source      str   where the row came from (for a CSV: the image path as written in it)

Bad rows are kept and flagged later by validation; ingest only refuses a source that is
unusable as a whole (a CSV without its required columns).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

MANIFEST = "manifest.parquet"
REQUIRED_CSV_COLUMNS = ("product_id", "image", "label")
MANIFEST_COLUMNS = [
    "product_id",
    "path",
    "label",
    "category",
    "title",
    "sha256",
    "width",
    "height",
    "split",
    "source",
]


class CatalogueError(ValueError):
    """The source cannot be ingested at all (as opposed to a bad row, which is quarantined)."""


def read_idx(path: Path, header: int) -> np.ndarray:
    """Read one gzip'd IDX file of the MNIST family (16-byte header for images, 8 for labels)."""
    return np.frombuffer(gzip.open(path).read(), dtype=np.uint8, offset=header)


def load_fashion_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images N×28×28, labels N), 'test': (…)} from Debian's dataset-fashion-mnist."""
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
        if len(images) != len(labels):
            raise CatalogueError(f"{prefix}: {len(images)} images but {len(labels)} labels")
        out[split] = (images, labels)
    return out


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def ingest_fashion_mnist(root: Path, out_dir: Path, categories: list[str]) -> pd.DataFrame:
    """Write every Fashion-MNIST image as a PNG file and return the manifest."""
    if not (root / "train-images-idx3-ubyte.gz").exists():
        raise CatalogueError(
            f"Fashion-MNIST not found in {root}: install Debian's dataset-fashion-mnist "
            "(`make data` does it)"
        )
    data = load_fashion_mnist(root)
    rows = []
    for split, (images, labels) in data.items():
        folder = out_dir / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(len(images)), desc=f"ingest {split}", unit="img", mininterval=2):
            product_id = f"fm-{split}-{i:05d}"
            rel = f"images/{split}/{product_id}.png"
            blob = png_bytes(images[i])
            (out_dir / rel).write_bytes(blob)
            name = categories[int(labels[i])]
            rows.append(
                (
                    product_id,
                    rel,
                    int(labels[i]),
                    name,
                    name,
                    hashlib.sha256(blob).hexdigest(),
                    28,
                    28,
                    split,
                    "fashion-mnist",
                )
            )
    return _finish(pd.DataFrame(rows, columns=MANIFEST_COLUMNS), out_dir)


def probe_file(path: Path) -> tuple[str, int, int]:
    """sha256 and size of one image file; size 0×0 when it does not open as an image."""
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    try:
        with Image.open(io.BytesIO(blob)) as im:
            width, height = im.size
    except Exception:
        width = height = 0
    return digest, width, height


def _assign_split(product_ids: pd.Series, labels: pd.Series, test_fraction: float) -> pd.Series:
    """Deterministic stratified split: within each label, the lowest hashes go to test."""
    keys = product_ids.map(lambda p: hashlib.sha256(str(p).encode()).hexdigest())
    rank = keys.groupby(labels).rank(method="first", pct=True)
    return pd.Series(np.where(rank <= test_fraction, "test", "train"), index=product_ids.index)


def read_catalogue_csv(csv_path: Path) -> pd.DataFrame:
    """A shop's catalogue CSV as strings; CatalogueError when a required column is missing."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise CatalogueError(f"{csv_path}: cannot read it as a CSV ({exc})") from None
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in table.columns]
    if missing:
        raise CatalogueError(
            f"{csv_path}: missing required column(s) {', '.join(missing)}; "
            f"a catalogue CSV needs {', '.join(REQUIRED_CSV_COLUMNS)}"
        )
    return table


def ingest_csv(csv_path: Path, out_dir: Path, categories: list[str], test_fraction: float):
    """Copy a shop's catalogue (CSV: product_id,image,label[,title,split…]) into out_dir."""
    table = read_catalogue_csv(csv_path)
    index = {name: i for i, name in enumerate(categories)}
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, rec in enumerate(tqdm(table.to_dict("records"), desc="ingest csv", unit="img")):
        src = csv_path.parent / rec["image"]
        label = index.get(rec["label"], -1)
        rel, digest, width, height = "", "", 0, 0
        if src.is_file():
            rel = f"images/{n:06d}{src.suffix.lower()}"
            shutil.copyfile(src, out_dir / rel)
            digest, width, height = probe_file(out_dir / rel)
        title = rec.get("title") or rec["label"]
        rows.append(
            (
                rec["product_id"],
                rel,
                label,
                rec["label"],
                title,
                digest,
                width,
                height,
                rec.get("split", ""),
                rec["image"],
            )
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    unsplit = ~manifest["split"].isin(["train", "test"])
    if unsplit.any():
        manifest.loc[unsplit, "split"] = _assign_split(
            manifest.loc[unsplit, "product_id"], manifest.loc[unsplit, "label"], test_fraction
        )
    return _finish(manifest, out_dir)


def _finish(manifest: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    manifest = manifest.astype({"label": "int64", "width": "int64", "height": "int64"})
    manifest.to_parquet(out_dir / MANIFEST, index=False)
    return manifest


def ingest_catalogue(
    source: str,
    out_dir: Path,
    categories: list[str],
    *,
    fashion_mnist_dir: Path,
    test_fraction: float = 0.15,
) -> pd.DataFrame:
    """Replace out_dir with a fresh catalogue from `source` ('fashion-mnist' or a CSV path).

    The new catalogue is built beside out_dir and swapped in only when complete: a source that
    fails (missing columns, unreadable CSV) leaves the current catalogue as it was.
    """
    if source != "fashion-mnist" and not Path(source).is_file():
        raise CatalogueError(f"catalogue source {source!r} is neither 'fashion-mnist' nor a CSV")
    out_dir = Path(out_dir)
    incoming, retired = (out_dir.with_name(f".{out_dir.name}.{tag}") for tag in ("new", "old"))
    for leftover in (incoming, retired):
        if leftover.exists():
            shutil.rmtree(leftover)
    incoming.mkdir(parents=True)
    try:
        if source == "fashion-mnist":
            manifest = ingest_fashion_mnist(fashion_mnist_dir, incoming, categories)
        else:
            manifest = ingest_csv(Path(source), incoming, categories, test_fraction)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rename(retired)
    incoming.rename(out_dir)
    shutil.rmtree(retired, ignore_errors=True)
    return manifest


def scan_source(
    source: str, catalogue_dir: Path, categories: list[str], test_fraction: float = 0.15
) -> pd.DataFrame:
    """The catalogue source as it is now, read in place (nothing copied, for an index refresh):
    manifest columns with `path` the absolute path of each image file ('' when it is missing)
    and `sha256` the digest of its bytes; width and height are left 0 (probed when a row is
    staged). For 'fashion-mnist', whose Debian files never change, the ingested catalogue."""
    if source == "fashion-mnist":
        manifest = read_manifest(catalogue_dir)
        paths = [str(Path(catalogue_dir) / p) if p else "" for p in manifest["path"]]
        return manifest.assign(path=paths)
    csv_path = Path(source)
    if not csv_path.is_file():
        raise CatalogueError(f"catalogue source {source!r} is neither 'fashion-mnist' nor a CSV")
    table = read_catalogue_csv(csv_path)
    index = {name: i for i, name in enumerate(categories)}
    rows = []
    for rec in tqdm(table.to_dict("records"), desc="scan csv", unit="img", mininterval=2):
        src = csv_path.parent / rec["image"]
        path, digest = ("", "")
        if src.is_file():
            path, digest = str(src), hashlib.sha256(src.read_bytes()).hexdigest()
        title = rec.get("title") or rec["label"]
        label = index.get(rec["label"], -1)
        split = rec.get("split", "")
        rows.append((rec["product_id"], path, label, rec["label"], title, digest, 0, 0, split))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS[:-1]).assign(source=table["image"])
    unsplit = ~manifest["split"].isin(["train", "test"])
    if unsplit.any():
        manifest.loc[unsplit, "split"] = _assign_split(
            manifest.loc[unsplit, "product_id"], manifest.loc[unsplit, "label"], test_fraction
        )
    return manifest.astype({"label": "int64", "width": "int64", "height": "int64"})


def read_manifest(catalogue_dir: Path) -> pd.DataFrame:
    path = catalogue_dir / MANIFEST
    if not path.exists():
        raise CatalogueError(f"no catalogue at {catalogue_dir}: run `vitrine ingest` first")
    return pd.read_parquet(path)


def stratified_slice(manifest: pd.DataFrame, limit: int | None, seed: int = 0) -> pd.DataFrame:
    """At most `limit` rows keeping each (split, label) group's share; deterministic by seed."""
    if limit is None or limit >= len(manifest):
        return manifest
    share = limit / len(manifest)
    parts = [
        group.sample(n=max(1, round(len(group) * share)), random_state=seed)
        for _, group in manifest.groupby(["split", "label"], sort=True)
    ]
    return pd.concat(parts).sort_index()


def load_image_array(catalogue_dir: Path, rel_paths: list[str], size: int) -> np.ndarray:
    """Decode images through the shared preprocessing into uint8 N×size×size×C (C from transforms)."""
    from components.model.transforms import load_uint8  # local import: transforms pulls in torch

    arrays = [
        load_uint8(catalogue_dir / p, size)
        for p in tqdm(rel_paths, desc="decode", unit="img", mininterval=2)
    ]
    return np.stack(arrays)
