"""The catalogue validation stage on a tiny real catalogue: one row per kind of defect."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import FASHION_MNIST_CATEGORIES, ValidationParams
from components.data.catalogue import MANIFEST_COLUMNS, load_fashion_mnist, png_bytes
from components.data.validation import (
    REASONS,
    QuarantineTooLarge,
    SchemaError,
    ValidationResult,
    check_quarantine_share,
    difference_hash,
    find_near_duplicates,
    validate_catalogue,
    write_validation_outputs,
)
from tests.conftest import FMNIST_DIR

FMNIST = FMNIST_DIR
CATEGORIES = FASHION_MNIST_CATEGORIES


def _row(
    product_id: str,
    rel: str,
    blob: bytes | None,
    label: int = 0,
    split: str = "train",
    size: tuple[int, int] = (28, 28),
) -> dict:
    digest = hashlib.sha256(blob).hexdigest() if blob is not None else ""
    values = (product_id, rel, label, "x", "x", digest, size[0], size[1], split, "test")
    return dict(zip(MANIFEST_COLUMNS, values, strict=True))


def _write(root: Path, rel: str, blob: bytes) -> bytes:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(blob)
    return blob


@pytest.fixture(scope="module")
def fmnist_images() -> np.ndarray:
    images, _ = load_fashion_mnist(FMNIST)["test"]
    return images[:40]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, fmnist_images) -> tuple[Path, pd.DataFrame]:
    """8 good real images plus one row per defect; the expected reason is the product_id."""
    root = tmp_path_factory.mktemp("catalogue")
    rows, good = [], fmnist_images[:8]
    for i, image in enumerate(good):
        split = "test" if i % 2 else "train"
        rel = f"images/good-{i}.png"
        rows.append(_row(f"good-{i}", rel, _write(root, rel, png_bytes(image)), split=split))
    full = png_bytes(fmnist_images[20])
    near = fmnist_images[0].astype(np.int16)
    near[0, 0] = np.clip(near[0, 0] + 1, 0, 255)  # one pixel off: other bytes, same dHash
    bad = {
        "missing_file": ("images/missing.png", full, None),
        "empty_file": ("images/empty.png", b"", None),
        "not_an_image": ("images/text.png", b"this is not a png, just text\n" * 20, None),
        "truncated": ("images/cut.png", full[: len(full) // 2], None),
        "blank": ("images/blank.png", png_bytes(np.full((28, 28), 200, np.uint8)), None),
        "exact_duplicate": ("images/copy.png", png_bytes(good[1]), None),
        "near_duplicate": ("images/near.png", png_bytes(near.astype(np.uint8)), None),
        "sha256_mismatch": ("images/mismatch.png", png_bytes(fmnist_images[21]), b"other"),
        "too_small": ("images/small.png", png_bytes(fmnist_images[22][:12, :12]), None),
        "unknown_label": ("images/unknown.png", png_bytes(fmnist_images[23]), None),
        "duplicate_product_id": ("images/dupid.png", png_bytes(fmnist_images[24]), None),
        "missing_product_id": ("images/noid.png", png_bytes(fmnist_images[25]), None),
        "invalid_split": ("images/split.png", png_bytes(fmnist_images[26]), None),
        "too_large": ("images/large.png", png_bytes(fmnist_images[27]), None),
    }
    for reason, (rel, blob, hash_of) in bad.items():
        if reason != "missing_file":
            _write(root, rel, blob)
        row = _row(reason, rel, hash_of if hash_of is not None else blob)
        row["source"] = reason
        if reason == "missing_file":
            row.update(path="", sha256="", width=0, height=0)
        if reason == "too_small":
            row.update(width=12, height=12)
        if reason == "too_large":
            row.update(width=9000)
        if reason == "unknown_label":
            row.update(label=-1)
        if reason == "duplicate_product_id":
            row.update(product_id="good-3")
        if reason == "missing_product_id":
            row.update(product_id=None)
        if reason == "invalid_split":
            row.update(split="validation")
        rows.append(row)
    return root, pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


@pytest.fixture(scope="module")
def result(catalogue, tmp_path_factory) -> ValidationResult:
    root, manifest = catalogue
    docs = tmp_path_factory.mktemp("docs")
    return validate_catalogue(manifest, root, CATEGORIES, ValidationParams(), docs_dir=docs)


def test_every_defect_is_quarantined_with_its_own_reason(result):
    q = result.quarantine
    got = dict(zip(q["source"], q["reason"], strict=True))  # source = the defect planted
    assert len(got) == len(q)
    assert set(got) == set(REASONS)
    for planted, reason in got.items():
        assert reason == planted, q.set_index("source").loc[planted, "detail"]
    assert q.loc[q["source"] == "duplicate_product_id", "product_id"].item() == "good-3"


def test_good_rows_accepted_and_counts_conserved(result, catalogue):
    _, manifest = catalogue
    acc, q = result.accepted, result.quarantine
    assert sorted(acc["product_id"]) == [f"good-{i}" for i in range(8)]
    assert list(acc.columns) == list(manifest.columns)
    assert set(acc.index).isdisjoint(q.index)
    assert sorted([*acc.index, *q.index]) == list(manifest.index)
    counts = result.report["counts"]
    assert counts == {"ingested": len(manifest), "accepted": 8, "quarantined": len(q)}
    assert result.report["quarantine_share"] == pytest.approx(len(q) / len(manifest))
    assert sum(result.report["quarantined_by_reason"].values()) == len(q)


def test_all_reasons_and_details_are_recorded(result):
    q = result.quarantine.set_index("source")
    assert set(q.loc["missing_file", "reasons"].split(";")) >= {"missing_file", "too_small"}
    assert q.loc["missing_file", "reasons"].startswith("missing_file;")
    assert q.loc["unknown_label", "detail"].startswith("unknown_label: label=-1")
    assert "good-1" in q.loc["exact_duplicate", "detail"]
    assert "good-0" in q.loc["near_duplicate", "detail"]
    assert all(q["detail"].str.len() > 0)


def test_report_carries_the_ge_suite_results(result):
    report = json.loads(json.dumps(result.report))
    suite = report["suite"]
    assert suite["expect_column_values_to_be_between(label)"] == {
        "success": False,
        "unexpected_count": 1,
    }
    assert suite["expect_column_values_to_be_in_set(split)"]["unexpected_count"] == 1
    assert suite["expect_table_columns_to_match_set"]["success"] is True
    assert suite["expect_column_values_to_be_unique(product_id)"]["unexpected_count"] == 2
    assert report["suite_success"] is False
    assert (Path(report["data_docs"]) / "index.html").is_file()


def test_exact_duplicate_keeps_the_test_split_copy(tmp_path, fmnist_images):
    blob = _write(tmp_path, "a.png", png_bytes(fmnist_images[5]))
    _write(tmp_path, "b.png", blob)
    manifest = pd.DataFrame(
        [
            _row("train-copy", "a.png", blob, split="train"),
            _row("test-copy", "b.png", blob, split="test"),
        ]
    )
    out = validate_catalogue(manifest, tmp_path, CATEGORIES, ValidationParams())
    assert list(out.accepted["product_id"]) == ["test-copy"]
    assert list(out.quarantine["reason"]) == ["exact_duplicate"]


def test_near_duplicate_distance_is_configurable(tmp_path, fmnist_images):
    rows = [
        _row(f"p{i}", f"{i}.png", _write(tmp_path, f"{i}.png", png_bytes(im)))
        for i, im in enumerate(fmnist_images[:30])
    ]
    manifest = pd.DataFrame(rows)
    coarse = validate_catalogue(manifest, tmp_path, CATEGORIES, ValidationParams(), hash_size=8)
    loose = validate_catalogue(
        manifest,
        tmp_path,
        CATEGORIES,
        ValidationParams(near_duplicate_max_distance=64),
        hash_size=8,
    )  # a 64-bit hash is always within 64 bits of another: everything but the first is a copy
    fine = validate_catalogue(manifest, tmp_path, CATEGORIES, ValidationParams())
    assert coarse.report["near_duplicate"]["hash_bits"] == 64
    assert len(coarse.quarantine) < 29
    assert len(loose.accepted) == 1 and len(loose.quarantine) == 29
    assert fine.report["near_duplicate"]["hash_bits"] == 256  # the params.yaml default
    assert len(fine.quarantine) <= len(coarse.quarantine)


def test_find_near_duplicates_matches_brute_force():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, 40)]
    hashes = base + [h ^ (1 << int(rng.integers(0, 64))) ^ (1 << 5) for h in base[:20]]
    order = list(range(len(hashes)))
    for distance in (0, 1, 2, 3, 10):
        got = find_near_duplicates(hashes, order, distance, 64)
        kept: list[int] = []
        want = {}
        for pos in order:
            match = next(
                (k for k in kept if (hashes[pos] ^ hashes[k]).bit_count() <= distance), None
            )
            if match is None:
                kept.append(pos)
            else:
                want[pos] = match
        assert set(got) == set(want), distance
        assert all((hashes[p] ^ hashes[k]).bit_count() <= distance for p, k in got.items())


def test_difference_hash_is_64_bits_and_tracks_gradients():
    ramp = Image.fromarray(np.tile(np.arange(0, 252, 9, dtype=np.uint8), (28, 1)))
    assert difference_hash(ramp) == 2**64 - 1
    assert difference_hash(ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) == 0


def test_missing_manifest_column_is_a_schema_error(tmp_path, catalogue):
    _, manifest = catalogue
    with pytest.raises(SchemaError, match="sha256"):
        validate_catalogue(
            manifest.drop(columns=["sha256"]), tmp_path, CATEGORIES, ValidationParams()
        )


def test_check_quarantine_share_raises_only_above_the_threshold(result):
    share = result.report["quarantine_share"]
    check_quarantine_share(result, share)
    check_quarantine_share(result, 1.0)
    with pytest.raises(QuarantineTooLarge) as err:
        check_quarantine_share(result, share - 0.01)
    message = str(err.value)
    assert f"{share:.1%}" in message and f"{share - 0.01:.1%}" in message
    assert "missing_file" in message


def test_write_validation_outputs(result, tmp_path):
    paths = write_validation_outputs(result, tmp_path / "out")
    assert {"accepted", "quarantine", "report", "data_docs"} <= set(paths)
    accepted = pd.read_parquet(paths["accepted"])
    quarantine = pd.read_parquet(paths["quarantine"])
    assert len(accepted) == len(result.accepted) and len(quarantine) == len(result.quarantine)
    assert {"reason", "reasons", "detail"} <= set(quarantine.columns)
    report = json.loads(paths["report"].read_text())
    assert report["counts"]["ingested"] == len(accepted) + len(quarantine)
    assert any(paths["data_docs"].rglob("*.html"))
