"""The GE suite and image checks on a real Fashion-MNIST catalogue, ingested by the real code.

ingest_fashion_mnist writes all 70,000 PNGs in ~50 s on 2 cores, too slow beside the
suite, so the fixture hands it a real 5,000-image stratified slice of Debian's files
(VITRINE_DATA_FULL=1 ingests and validates everything: ~2 min).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import FASHION_MNIST_CATEGORIES, ValidationParams
from components.data.catalogue import ingest_fashion_mnist, load_fashion_mnist
from components.data.validation import check_quarantine_share, validate_catalogue
from tests.conftest import FMNIST_DIR

pytestmark = pytest.mark.data

FMNIST = FMNIST_DIR
SLICE = 5000


def write_idx_slice(out: Path, share: float, seed: int = 0) -> None:
    """The same gzip'd IDX files as Debian's, holding a random `share` of each split."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = load_fashion_mnist(FMNIST)[split]
        keep = np.sort(rng.choice(len(images), size=round(len(images) * share), replace=False))
        header = struct.pack(">IIII", 2051, len(keep), 28, 28)
        with gzip.open(out / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + images[keep].tobytes())
        with gzip.open(out / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, len(keep)) + labels[keep].tobytes())


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    tmp = tmp_path_factory.mktemp("fmnist")
    source = FMNIST
    if os.environ.get("VITRINE_DATA_FULL") != "1":
        source = tmp / "source"
        write_idx_slice(source, SLICE / 70000)
    manifest = ingest_fashion_mnist(source, tmp / "catalogue", FASHION_MNIST_CATEGORIES)
    return tmp / "catalogue", manifest


def test_real_catalogue_passes_the_suite(catalogue, tmp_path):
    root, manifest = catalogue
    params = ValidationParams()
    docs = tmp_path / "docs"
    result = validate_catalogue(manifest, root, FASHION_MNIST_CATEGORIES, params, docs_dir=docs)
    report = result.report
    assert report["counts"]["ingested"] == len(manifest) >= SLICE
    assert len(result.accepted) + len(result.quarantine) == len(manifest)
    assert report["suite_success"], report["suite"]  # the manifest itself is clean
    # real, intact files: only look-alike images may be quarantined
    assert set(report["rows_with_reason"]) <= {"near_duplicate", "exact_duplicate"}
    check_quarantine_share(result, params.max_quarantine_share)
    assert report["quarantine_share"] < 0.1
    # duplicates are resolved in favour of the frozen test split
    test_dups = result.quarantine[result.quarantine["split"] == "test"]
    assert all("product fm-test-" in detail for detail in test_dups["detail"])
    assert (docs / "index.html").is_file()
