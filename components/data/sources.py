"""'Recent data' for a scheduled or drift-triggered retrain: the catalogue as its source is now.

The request log keeps no images and no labels (embeddings, predictions and image statistics
only), so served requests cannot be trained on. What a retrain can fold in is the shop's
catalogue as it stands: products added, relabelled or removed in the source (`data.source`: a
catalogue CSV and its image files, or Debian's Fashion-MNIST files). `stages.ingest.refresh` re-
ingests the source into the DVC-tracked data/catalogue (a new data version, pushed to the local
remote) only when its fingerprint differs from the one recorded at the last ingest, so an
unchanged source costs a few stat() calls and the retrain keeps its data version.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

from components.config import DataParams, StatePaths
from components.data import catalogue

SOURCES_FILE = "catalogue-sources.json"  # in the state folder: catalogue dir -> source record
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def fashion_mnist_dir(data: DataParams, paths: StatePaths) -> Path:
    """Debian's folder, or the copy `make dataset` unpacks into the state folder without root."""
    root = Path(data.fashion_mnist_dir)
    unpacked = paths.home / "debian" / root.relative_to(root.anchor)
    return unpacked if not root.exists() and unpacked.exists() else root


def _stat_line(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def source_fingerprint(source: str, fmnist_dir: Path) -> str:
    """sha256 over the source's name and contents: the CSV's bytes plus size and mtime of every
    image it names, or size and mtime of the four Fashion-MNIST files."""
    digest = hashlib.sha256(source.encode())
    if source == "fashion-mnist":
        lines = [_stat_line(fmnist_dir / name) for name in FASHION_MNIST_FILES]
    else:
        csv_path = Path(source)
        if not csv_path.is_file():
            raise catalogue.CatalogueError(f"catalogue source {source!r} is not a file")
        blob = csv_path.read_bytes()
        digest.update(blob)
        reader = csv.DictReader(blob.decode("utf-8", errors="replace").splitlines())
        lines = [_stat_line(csv_path.parent / row["image"]) for row in reader if row.get("image")]
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def _read_sources(paths: StatePaths) -> dict:
    path = paths.home / SOURCES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def recorded_source(paths: StatePaths, catalogue_dir: Path) -> dict | None:
    return _read_sources(paths).get(str(Path(catalogue_dir).resolve()))


def record_source(paths: StatePaths, catalogue_dir: Path, source: str, fingerprint: str) -> None:
    """Remember which source (and which state of it) the catalogue was ingested from."""
    sources = _read_sources(paths)
    sources[str(Path(catalogue_dir).resolve())] = {
        "source": source,
        "fingerprint": fingerprint,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    paths.home.mkdir(parents=True, exist_ok=True)
    tmp = paths.home / f".{SOURCES_FILE}.tmp"
    tmp.write_text(json.dumps(sources, indent=2))
    tmp.replace(paths.home / SOURCES_FILE)


def refresh_reason(
    data: DataParams, paths: StatePaths, catalogue_dir: Path
) -> tuple[str, str | None]:
    """(the source to follow, why the catalogue must be re-ingested or None when current).

    The source followed is the one the catalogue was last ingested from (`vitrine ingest
    --source` wins over `data.source`, as it does for every run); `data.source` when none is
    recorded. A catalogue ingested before sources were recorded is taken as current (and
    recorded): re-ingesting 70,000 images on a guess would cost minutes and a new data version.
    """
    recorded = recorded_source(paths, catalogue_dir)
    source = recorded["source"] if recorded else data.source
    source = source if source == "fashion-mnist" else str(Path(source).resolve())
    if not (Path(catalogue_dir) / catalogue.MANIFEST).exists():
        return source, "no catalogue yet"
    fingerprint = source_fingerprint(source, fashion_mnist_dir(data, paths))
    if recorded is None:
        record_source(paths, catalogue_dir, source, fingerprint)
        return source, None
    if recorded["fingerprint"] != fingerprint:
        return source, f"source {source} changed since its ingest at {recorded['recorded_at']}"
    return source, None
