"""`vitrine drift`: the champion's request-log window against its reference, as a report.

Reads the champion's version and reference through components.release.registry.Registry, the sampled
request log (<state>/requests/requests-YYYYMMDD.jsonl) for the window, runs the Evidently
detector (monitoring/detect.py), writes report.html / report.json (+ Evidently's own HTML and
JSON) under <state>/reports/<timestamp>/, regenerates reports/index.html and logs the folder
to MLflow. The Prefect `monitor` flow calls `run_drift` too.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Params, StatePaths
from components.data.catalogue import CatalogueError
from components.model import reference as ref_io
from components.release.registry import Registry, RegistryUnavailable, open_registry
from monitoring import detect, report
from monitoring.window import DriftError, read_window

MONITORING_EXPERIMENT = "vitrine-monitoring"


@dataclass
class DriftResult:
    drifted: bool | None  # None: no verdict
    exit_code: int  # 0 no drift, 1 drift, 2 no verdict or error
    headline: str
    report_html: Path | None = None
    report_json: Path | None = None
    details: dict = field(default_factory=dict)


def load_reference(
    registry: Registry, version: str, paths: StatePaths, params: Params
) -> tuple[pd.DataFrame, np.ndarray, str]:
    """The version's registered reference (cached under <state>/references/), or, for a version
    registered before references existed, one rebuilt with its model from the catalogue's test
    split by the same code as registration (said so in the report)."""
    cache = paths.home / "references" / f"v{version}" / ref_io.REFERENCE_FILE
    note_file = cache.with_suffix(".note")
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        if registry.has_artifact(version, ref_io.REFERENCE_ARTIFACT):
            with tempfile.TemporaryDirectory() as tmp:
                folder = registry.download_artifacts(version, ref_io.REFERENCE_ARTIFACT, Path(tmp))
                shutil.copy(folder / ref_io.REFERENCE_FILE, cache)
                if (folder / ref_io.DETECT_REFERENCE_FILE).exists():  # a version that detects
                    shutil.copy(folder / ref_io.DETECT_REFERENCE_FILE, cache.parent)
            note_file.write_text(f"registered with version {version} (its evaluation split)")
        else:
            rebuild_reference(registry, version, params, cache)
            note_file.write_text(
                f"version {version} was registered without a reference: rebuilt with its model "
                "from the catalogue's test split by the same code as registration"
            )
    rows, emb = ref_io.read_reference(cache)
    return rows, emb, note_file.read_text() if note_file.exists() else ""


def load_detect_reference(paths: StatePaths, version: str) -> pd.DataFrame | None:
    """What the version's detector found on its held-out scenes (items, item_area per scene),
    registered with its reference (load_reference caches it); None for a version without."""
    path = paths.home / "references" / f"v{version}" / ref_io.DETECT_REFERENCE_FILE
    return pd.read_parquet(path) if path.exists() else None


def rebuild_reference(registry: Registry, version: str, params: Params, out: Path) -> None:
    from components.data.catalogue import read_manifest

    manifest = read_manifest(params.data.catalogue_path())
    test = manifest[manifest["split"] == "test"].sort_values("product_id")
    model = registry.load_model(version).eval()
    rows = ref_io.build_reference(model, test, params.data.catalogue_path(), params.data.categories)
    rows.to_parquet(out, index=False)


def seeded_sample(
    rows: pd.DataFrame, emb: np.ndarray, n: int, seed: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """At most n rows, the same ones for the same seed (reproducible reports and benchmark)."""
    if len(rows) <= n:
        return rows.reset_index(drop=True), emb
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    return rows.iloc[keep].reset_index(drop=True), emb[keep]


def run_drift(paths: StatePaths, params: Params, since: datetime | None = None) -> DriftResult:
    """Compare the champion's recent requests with its reference; write and log the report.

    Exit code 0 no drift, 1 drift, 2 no verdict (too few samples) or an error; a failure
    changes nothing in the registry or the service.
    """
    until = datetime.now(UTC)
    since = since or until - timedelta(hours=params.monitoring.window_hours)
    try:
        registry = open_registry(paths, params)
        version = registry.alias_version("champion")
        if version is None:
            raise DriftError("no champion yet: run `vitrine run` (or `make run`) first")
        window = read_window(paths.home / "requests", version, since, until)
        settings = params.monitoring
        if len(window.rows) < settings.min_samples:
            verdict = detect.decide([], len(window.rows), settings.min_samples)
            return _result(verdict, report.publish(paths, registry, version, window, verdict))
        ref_rows, ref_emb, note = load_reference(registry, version, paths, params)
        if ref_emb.shape[1] != window.emb.shape[1]:
            raise DriftError(
                f"version {version}'s reference has {ref_emb.shape[1]}-d embeddings "
                f"but its requests {window.emb.shape[1]}-d"
            )
        ref_rows, ref_emb = seeded_sample(ref_rows, ref_emb, settings.reference_rows, settings.seed)
        cur_rows, cur_emb = seeded_sample(
            window.rows, window.emb, settings.max_current_rows, settings.seed
        )
        signals, snapshot = detect.compute_signals(
            detect.to_frame(ref_rows, ref_emb),
            detect.to_frame(cur_rows, cur_emb),
            settings,
            metadata={"model_version": version},
        )
        signals += detect.detected_item_signals(
            load_detect_reference(paths, version), window.rows, settings
        )
        shares = (
            detect.category_shares(cur_rows["category"]),
            detect.category_shares(ref_rows["category"]),
        )
        verdict = detect.decide(signals, len(window.rows), settings.min_samples, shares)
        compared = report.Compared(
            ref_rows,
            ref_emb,
            cur_rows,
            cur_emb,
            note,
            snapshot,
            settings.sample_images,
            params.data.catalogue_path(),
            settings,
        )
        published = report.publish(paths, registry, version, window, verdict, compared)
        return _result(verdict, published)
    except (DriftError, RegistryUnavailable, CatalogueError, OSError) as error:
        return DriftResult(None, 2, f"ERROR: {error}")


def _result(verdict: detect.Verdict, published: tuple[Path, Path, dict]) -> DriftResult:
    html, json_path, details = published
    return DriftResult(
        verdict.drifted, verdict.exit_code, verdict.headline, html, json_path, details
    )
