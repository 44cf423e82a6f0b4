"""Validate the catalogue: a Great Expectations suite on the manifest plus image checks.

Rows are never deleted: every manifest row lands in exactly one of `accepted` or
`quarantine`; a quarantined row carries its primary `reason` (the first in REASONS that
applies), every reason (`reasons`, ';'-joined) and a human `detail`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageFile

from components.config import ValidationParams
from components.data.catalogue import MANIFEST_COLUMNS

# The order of precedence: a quarantined row's primary `reason` is the first that applies.
REASONS = (
    "missing_file",
    "empty_file",
    "not_an_image",
    "truncated",
    "missing_product_id",
    "duplicate_product_id",
    "unknown_label",
    "invalid_split",
    "sha256_mismatch",
    "too_small",
    "too_large",
    "blank",
    "exact_duplicate",
    "near_duplicate",
)
DHASH_SIZE = 8  # 8 → a 64-bit difference hash on the 9×8 grayscale resize
PARALLEL_MIN_ROWS = 4000
DOCS_SITE = "vitrine_validation"


class SchemaError(ValueError):
    """The manifest lacks required columns: the whole catalogue is unusable."""


class QuarantineTooLarge(RuntimeError):
    """Too large a share of the catalogue was quarantined to go on training."""


@dataclass
class ValidationResult:
    accepted: pd.DataFrame
    quarantine: pd.DataFrame
    report: dict


class ImageProbe(NamedTuple):
    status: str  # 'ok' or one of missing_file, empty_file, not_an_image, truncated, too_large
    sha256: str = ""
    std: float = 0.0
    dhash: int = 0
    detail: str = ""


def difference_hash(gray: Image.Image, hash_size: int = DHASH_SIZE) -> int:
    """dHash: resize to (hash_size+1)×hash_size, one bit per 'brighter than left neighbour'."""
    small = gray.resize((hash_size + 1, hash_size), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.int16)
    bits = np.packbits(pixels[:, 1:] > pixels[:, :-1])
    return int.from_bytes(bits.tobytes(), "big")


def probe_image(path: Path, hash_size: int = DHASH_SIZE) -> ImageProbe:
    """Read, hash and fully decode one file (ImageFile.LOAD_TRUNCATED_IMAGES must be off)."""
    if not path.is_file():
        return ImageProbe("missing_file", detail=f"{path.name} does not exist")
    blob = path.read_bytes()
    if not blob:
        return ImageProbe("empty_file", detail=f"{path.name} has 0 bytes")
    digest = hashlib.sha256(blob).hexdigest()
    try:
        image = Image.open(io.BytesIO(blob))
    except Image.DecompressionBombError as exc:
        return ImageProbe("too_large", digest, detail=str(exc))
    except Exception as exc:
        return ImageProbe("not_an_image", digest, detail=f"PIL cannot identify it ({exc})")
    with image:
        try:
            image.load()
        except Exception as exc:
            return ImageProbe("truncated", digest, detail=f"decoding fails ({exc})")
        gray = image.convert("L")
    std = float(np.asarray(gray, dtype=np.float32).std())
    return ImageProbe("ok", digest, std, difference_hash(gray, hash_size))


def probe_images(paths: list[str], hash_size: int = DHASH_SIZE) -> list[ImageProbe]:
    """probe_image over many files; in a worker process or in this one."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        return [
            probe_image(Path(p), hash_size)
            if p
            else ImageProbe("missing_file", detail="no image path in the manifest")
            for p in paths
        ]
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def probe_catalogue(rel_paths: list[str], catalogue_dir: Path, hash_size: int) -> list[ImageProbe]:
    """One pass over every image, split across the CPU cores for large catalogues.

    Workers are spawned (not forked: safe beside Prefect's threads), so a calling script
    needs the usual `if __name__ == "__main__":` guard.
    """
    paths = [str(catalogue_dir / p) if p else "" for p in rel_paths]
    workers = min(os.cpu_count() or 1, 8)
    if len(paths) < PARALLEL_MIN_ROWS or workers < 2:
        return probe_images(paths, hash_size)
    size = -(-len(paths) // (workers * 4))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        parts = pool.map(probe_images, chunks, [hash_size] * len(chunks))
        return [probe for part in parts for probe in part]


def build_suite_expectations(categories: list[str], params: ValidationParams) -> list:
    """The catalogue's GE expectations; each failing one maps to a reason (see _suite_reasons)."""
    import great_expectations.expectations as gxe

    between = gxe.ExpectColumnValuesToBeBetween
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=MANIFEST_COLUMNS, exact_match=False),
        gxe.ExpectColumnValuesToNotBeNull(column="product_id"),
        gxe.ExpectColumnValuesToBeUnique(column="product_id"),
        between(column="label", min_value=0, max_value=len(categories) - 1),
        gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
        between(column="width", min_value=params.min_width, max_value=params.max_width),
        between(column="height", min_value=params.min_height, max_value=params.max_height),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "test"]),
    ]


def run_suite(manifest: pd.DataFrame, expectations: list, docs_dir: Path | None) -> list:
    """Run the suite on the whole dataframe (COMPLETE results); build Data Docs if asked."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (
        context.data_sources.add_pandas("catalogue")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("manifest")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="catalogue", expectations=expectations))
    definition = gx.ValidationDefinition(name="catalogue", data=batch, suite=suite)
    definition = context.validation_definitions.add(definition)
    result = definition.run(batch_parameters={"dataframe": manifest}, result_format="COMPLETE")
    if docs_dir is not None:
        backend = {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)}
        site = {
            "class_name": "SiteBuilder",
            "store_backend": backend,
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
        context.add_data_docs_site(DOCS_SITE, site)
        context.build_data_docs(site_names=[DOCS_SITE])
    return list(result.results)


def _expectation_name(res) -> str:
    config = res.expectation_config
    column = config.kwargs.get("column")
    return f"{config.type}({column})" if column else config.type


def _suite_reasons(manifest: pd.DataFrame, results: list) -> list[dict[str, str]]:
    """Per row position: {reason: detail} from the failed expectations' unexpected indexes."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if any(
        r.expectation_config.type == "expect_table_columns_to_match_set" and not r.success
        for r in results
    ):
        raise SchemaError(f"manifest is missing column(s): {', '.join(missing)}")
    found: list[dict[str, str]] = [{} for _ in range(len(manifest))]
    for res in results:
        if res.success:
            continue
        kind, column = res.expectation_config.type, res.expectation_config.kwargs.get("column")
        rows = res.result.get("unexpected_index_list") or []
        if kind == "expect_column_values_to_be_unique":
            later = manifest["product_id"].duplicated(keep="first").to_numpy()
            rows = [r for r in rows if later[r]]
        for r in rows:
            value = manifest[column].iat[r]
            value = value.item() if isinstance(value, np.generic) else value
            reason = _reason_for(kind, column, value, res.expectation_config.kwargs)
            found[r][reason] = f"{column}={value!r} fails {kind}"
    return found


def _reason_for(kind: str, column: str, value, kwargs: dict) -> str:
    if kind == "expect_column_values_to_be_between" and column in ("width", "height"):
        return "too_small" if value < kwargs["min_value"] else "too_large"
    return {
        ("expect_column_values_to_not_be_null", "product_id"): "missing_product_id",
        ("expect_column_values_to_be_unique", "product_id"): "duplicate_product_id",
        ("expect_column_values_to_be_between", "label"): "unknown_label",
        ("expect_column_values_to_match_regex", "sha256"): "sha256_mismatch",
        ("expect_column_values_to_be_in_set", "split"): "invalid_split",
    }[(kind, column)]


def _image_reasons(
    manifest: pd.DataFrame, probes: list[ImageProbe], found: list[dict], params: ValidationParams
) -> None:
    """Add per-file reasons (missing/empty/not an image/truncated, sha256, blank) to `found`."""
    expected = manifest["sha256"].to_numpy()
    for r, probe in enumerate(probes):
        if probe.status != "ok":
            found[r][probe.status] = probe.detail
            continue
        if probe.sha256 != expected[r]:
            found[r]["sha256_mismatch"] = f"file hashes to {probe.sha256[:12]}…, not the manifest's"
        if probe.std <= params.blank_std_max:
            found[r]["blank"] = f"pixel std {probe.std:.2f} <= {params.blank_std_max}"


def find_near_duplicates(
    hashes: list[int], order: list[int], max_distance: int, bits: int
) -> dict[int, int]:
    """{position: kept position within max_distance} visiting `order`; the first seen is kept.

    Multi-index hashing: split the hash into max_distance+1 chunks; two hashes within the
    distance share at least one chunk exactly, so only rows in a shared bucket are compared.
    """
    n_chunks = max_distance + 1
    width = bits // n_chunks
    spans = [(i * width, width if i < n_chunks - 1 else bits - i * width) for i in range(n_chunks)]
    if max_distance >= bits:
        spans = [(0, 0)]  # every hash is within reach: one bucket, compare with every kept row
    buckets: list[dict[int, list[int]]] = [{} for _ in spans]
    duplicates: dict[int, int] = {}
    for pos in order:
        h = hashes[pos]
        keys = [(h >> lo) & ((1 << w) - 1) for lo, w in spans]
        match = next(
            (
                other
                for c, key in enumerate(keys)
                for other in buckets[c].get(key, ())
                if (h ^ hashes[other]).bit_count() <= max_distance
            ),
            None,
        )
        if match is not None:
            duplicates[pos] = match
            continue
        for c, key in enumerate(keys):
            buckets[c].setdefault(key, []).append(pos)
    return duplicates


def _duplicate_reasons(
    manifest: pd.DataFrame,
    probes: list[ImageProbe],
    found: list[dict],
    params: ValidationParams,
    hash_size: int,
) -> None:
    """Among rows clean so far, keep the first image (test split first) of each (near-)copy."""
    clean = [r for r in range(len(manifest)) if not found[r]]
    is_test = (manifest["split"] == "test").to_numpy()
    order = sorted(clean, key=lambda r: (not is_test[r], r))
    ids = manifest["product_id"].to_numpy()
    first_by_sha: dict[str, int] = {}
    unique = []
    for r in order:
        kept = first_by_sha.setdefault(probes[r].sha256, r)
        if kept != r:
            found[r]["exact_duplicate"] = f"same bytes as product {ids[kept]}"
        else:
            unique.append(r)
    hashes = [p.dhash for p in probes]
    near = find_near_duplicates(hashes, unique, params.near_duplicate_max_distance, hash_size**2)
    for r, kept in near.items():
        distance = (hashes[r] ^ hashes[kept]).bit_count()
        found[r]["near_duplicate"] = f"dHash within {distance} bits of product {ids[kept]}"


def _split_rows(manifest: pd.DataFrame, found: list[dict[str, str]]):
    """(accepted, quarantine) frames; quarantine gains reason, reasons and detail."""
    bad = np.array([bool(f) for f in found], dtype=bool)
    accepted = manifest.loc[~bad].copy()
    quarantine = manifest.loc[bad].copy()
    faults = [dict(sorted(f.items(), key=lambda kv: REASONS.index(kv[0]))) for f in found if f]
    quarantine["reason"] = [next(iter(f)) for f in faults]
    quarantine["reasons"] = [";".join(f) for f in faults]
    quarantine["detail"] = ["; ".join(f"{k}: {v}" for k, v in f.items()) for f in faults]
    return accepted, quarantine


def _build_report(
    accepted: pd.DataFrame,
    quarantine: pd.DataFrame,
    results: list,
    params: ValidationParams,
    hash_size: int,
) -> dict:
    ingested = len(accepted) + len(quarantine)
    max_distance = params.near_duplicate_max_distance
    all_reasons = Counter(r for rs in quarantine["reasons"] for r in rs.split(";"))
    suite = {
        _expectation_name(res): {
            "success": bool(res.success),
            "unexpected_count": int(res.result.get("unexpected_count") or 0),
        }
        for res in results
    }
    return {
        "counts": {"ingested": ingested, "accepted": len(accepted), "quarantined": len(quarantine)},
        "quarantine_share": len(quarantine) / ingested if ingested else 0.0,
        "quarantined_by_reason": {
            k: int(v) for k, v in quarantine["reason"].value_counts().items()
        },
        "rows_with_reason": {k: all_reasons[k] for k in REASONS if all_reasons[k]},
        "suite_success": all(v["success"] for v in suite.values()),
        "suite": suite,
        "near_duplicate": {"hash_bits": hash_size**2, "max_distance": max_distance},
    }


def validate_catalogue(
    manifest: pd.DataFrame,
    catalogue_dir: Path,
    categories: list[str],
    params: ValidationParams,
    docs_dir: Path | None = None,
    *,
    hash_size: int | None = None,
) -> ValidationResult:
    """GE suite on the manifest + one pass of image checks; split rows into accepted/quarantine."""
    hash_size = hash_size or params.near_duplicate_hash_size
    frame = manifest.reset_index(drop=True)
    results = run_suite(frame, build_suite_expectations(categories, params), docs_dir)
    found = _suite_reasons(frame, results)
    probes = probe_catalogue(frame["path"].fillna("").tolist(), Path(catalogue_dir), hash_size)
    _image_reasons(frame, probes, found, params)
    _duplicate_reasons(frame, probes, found, params, hash_size)
    accepted, quarantine = _split_rows(frame, found)
    accepted.index = manifest.index[accepted.index]
    quarantine.index = manifest.index[quarantine.index]
    report = _build_report(accepted, quarantine, results, params, hash_size)
    if docs_dir is not None:
        report["data_docs"] = str(docs_dir)
    return ValidationResult(accepted, quarantine, report)


def write_validation_outputs(result: ValidationResult, out_dir: Path) -> dict[str, Path]:
    """quarantine.parquet, accepted.parquet and validation_report.json (+ data_docs if built)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "accepted": out_dir / "accepted.parquet",
        "quarantine": out_dir / "quarantine.parquet",
        "report": out_dir / "validation_report.json",
    }
    result.accepted.to_parquet(paths["accepted"], index=False)
    result.quarantine.to_parquet(paths["quarantine"], index=False)
    paths["report"].write_text(json.dumps(result.report, indent=2, sort_keys=True))
    docs = result.report.get("data_docs")
    if docs and Path(docs).is_dir():
        paths["data_docs"] = Path(docs)
    return paths


def check_quarantine_share(result: ValidationResult, max_share: float) -> None:
    """Raise QuarantineTooLarge when more than max_share of the catalogue was quarantined."""
    share = result.report["quarantine_share"]
    if share <= max_share:
        return
    counts = result.report["counts"]
    top = sorted(result.report["quarantined_by_reason"].items(), key=lambda kv: -kv[1])[:3]
    reasons = ", ".join(f"{k} ({v})" for k, v in top)
    raise QuarantineTooLarge(
        f"{share:.1%} of the catalogue quarantined ({counts['quarantined']} of "
        f"{counts['ingested']} rows), above the threshold of {max_share:.1%}; "
        f"top reasons: {reasons}. Fix the source or raise validation.max_quarantine_share."
    )
