"""`vitrine drift`: the champion's request-log window against its reference, as a report.

Reads the champion's version and reference through components.registry.Registry, the sampled
request log (<state>/requests/requests-YYYYMMDD.jsonl) for the window, runs the Evidently
detector (monitoring/detect.py), writes report.html / report.json (+ Evidently's own HTML and
JSON) under <state>/reports/<timestamp>/, regenerates reports/index.html and logs the folder
to MLflow. The Prefect `monitor` flow calls `run_drift` too.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from components import reference as ref_io
from components.catalogue import CatalogueError
from components.config import PROJECT_ROOT, Params, StatePaths
from components.registry import Registry, RegistryUnavailable
from monitoring import detect, report

MONITORING_EXPERIMENT = "vitrine-monitoring"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass
class DriftResult:
    drifted: bool | None  # None: no verdict
    exit_code: int  # 0 no drift, 1 drift, 2 no verdict or error
    headline: str
    report_html: Path | None = None
    report_json: Path | None = None
    details: dict = field(default_factory=dict)


class DriftError(RuntimeError):
    """A drift check that cannot run; the message says why and what to do."""


@dataclass
class Window:
    rows: pd.DataFrame  # the champion's requests: category, confidence, image statistics
    emb: np.ndarray
    since: datetime
    until: datetime
    other_versions: dict[str, int]  # requests answered by other versions: excluded, counted
    malformed: int  # unreadable log lines, counted


def parse_since(text: str, now: datetime) -> datetime:
    """'90m', '1h', '2d', '1w' before `now`, or an ISO time (UTC when it has no zone)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        return now - timedelta(seconds=float(match[1]) * UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a duration like 30m, 1h, 2d or an ISO time "
            "like 2026-11-22T07:00"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def read_window(folder: Path, version: str, since: datetime, until: datetime) -> Window:
    """The champion's logged requests in [since, until]; other versions' rows are excluded."""
    rows, emb, others, malformed = [], [], {}, 0
    for path in sorted(Path(folder).glob("requests-*.jsonl")):
        day = path.stem.removeprefix("requests-")
        if day.isdigit() and not since.strftime("%Y%m%d") <= day <= until.strftime("%Y%m%d"):
            continue
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                when = datetime.fromisoformat(record["timestamp"])
                if not since <= when <= until:
                    continue
                if str(record["model_version"]) != version:
                    others[str(record["model_version"])] = (
                        others.get(str(record["model_version"]), 0) + 1
                    )
                    continue
                record.setdefault("aspect", record["width"] / record["height"])
                row = {k: record[k] for k in ("category", *detect.NUMERIC)}
                vector = np.asarray(record["embedding"], dtype=np.float32)
            except (ValueError, KeyError, TypeError, ZeroDivisionError):
                malformed += line.strip() != ""
                continue
            rows.append(row)
            emb.append(vector)
    frame = pd.DataFrame(rows, columns=["category", *detect.NUMERIC])
    dims = {len(v) for v in emb}
    if len(dims) > 1:
        raise DriftError(f"the log holds embeddings of sizes {sorted(dims)} for version {version}")
    matrix = np.stack(emb) if emb else np.zeros((0, 0), np.float32)
    return Window(frame, matrix, since, until, others, malformed)


def open_registry(paths: StatePaths, params: Params) -> Registry:
    return Registry(
        paths.tracking_uri, paths.artifacts, params.registry.model_name, paths.audit_log
    )


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
            note_file.write_text(f"registered with version {version} (its evaluation split)")
        else:
            rebuild_reference(registry, version, params, cache)
            note_file.write_text(
                f"version {version} was registered without a reference: rebuilt with its model "
                "from the catalogue's test split by the same code as registration"
            )
    rows, emb = ref_io.read_reference(cache)
    return rows, emb, note_file.read_text() if note_file.exists() else ""


def catalogue_dir(params: Params) -> Path:
    path = Path(params.data.catalogue_dir)
    return path if path.is_absolute() else PROJECT_ROOT / path


def rebuild_reference(registry: Registry, version: str, params: Params, out: Path) -> None:
    from components.catalogue import read_manifest

    manifest = read_manifest(catalogue_dir(params))
    test = manifest[manifest["split"] == "test"].sort_values("product_id")
    model = registry.load_model(version).eval()
    rows = ref_io.build_reference(model, test, catalogue_dir(params), params.data.categories)
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
            detect.to_frame(ref_rows, ref_emb), detect.to_frame(cur_rows, cur_emb), settings
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
            catalogue_dir(params),
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
