"""The on-call drift report: a folder per check under <state>/reports/, an index of them all.

Each folder holds report.html (verdict, signals, per-category breakdown, pictures of the most
drifted slice), report.json (the same facts), and Evidently's own evidently.html /
evidently.json. reports/index.html lists every report newest first with its verdict.
"""

from __future__ import annotations

import html
import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.config import MonitoringParams, StatePaths
from components.release.registry import Registry, RegistryUnavailable
from monitoring import breakdown, workspace

if TYPE_CHECKING:
    from monitoring.detect import Verdict
    from monitoring.window import Window

SAMPLES_NOTE = (
    "The request log keeps no images: shown are the catalogue products nearest (in "
    "the champion's own index) to the requests of this slice farthest from the "
    "reference."
)


@dataclass
class Compared:
    """What the verdict compared: reference and current samples, and Evidently's snapshot."""

    ref_rows: pd.DataFrame
    ref_emb: np.ndarray
    cur_rows: pd.DataFrame
    cur_emb: np.ndarray
    reference_note: str
    snapshot: Any  # evidently Snapshot
    sample_images: int
    catalogue: Path
    settings: MonitoringParams  # the dashboard of the Evidently workspace plots its signals


def new_folder(root: Path, now: datetime) -> Path:
    base = now.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        folder = root / (base if n == 0 else f"{base}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise OSError(f"cannot create a report folder under {root}")


def publish(
    paths: StatePaths,
    registry: Registry,
    version: str,
    window: Window,
    verdict: Verdict,
    compared: Compared | None = None,
) -> tuple[Path, Path, dict]:
    """Write the report folder and the index, log the folder to MLflow; (html, json, details)."""
    now = datetime.now(UTC)
    folder = new_folder(paths.reports, now)
    details = {
        "created_at": now.isoformat(),
        "model_version": version,
        "verdict": {
            "drifted": verdict.drifted,
            "exit_code": verdict.exit_code,
            "headline": verdict.headline,
        },
        "window": {
            "since": window.since.isoformat(),
            "until": window.until.isoformat(),
            "requests": len(window.rows),
            "excluded_other_versions": dict(sorted(window.other_versions.items())),
            "excluded_total": sum(window.other_versions.values()),
            "malformed_lines": window.malformed,
        },
        "signals": [s.__dict__ for s in sorted(verdict.signals, key=_signal_order)],
    }
    samples: list[dict] = []
    if compared is not None:
        samples = _compare_details(details, compared, registry, version)
        compared.snapshot.save_html(str(folder / "evidently.html"))
        compared.snapshot.save_json(str(folder / "evidently.json"))
        try:  # on-call's view over time; the report stands on disk without it
            details["evidently"]["workspace_snapshot"] = workspace.add_snapshot(
                paths.evidently_workspace, compared.snapshot, compared.settings
            )
        except Exception as error:  # noqa: BLE001 - any failure of Evidently's storage
            details["evidently"]["workspace_error"] = f"{type(error).__name__}: {error}"
    (folder / "report.json").write_text(json.dumps(details, indent=2, default=str))
    (folder / "report.html").write_text(render_page(details, samples))
    write_index(paths.reports)
    try:
        details["mlflow_run_id"] = registry.log_report_run(
            "vitrine-monitoring",
            f"drift-{folder.name}",
            folder,
            _metrics(verdict, window),
            {
                "model_version": version,
                "verdict": verdict.headline[:500],
                "drifted": str(verdict.drifted).lower(),
                "report": str(folder),
            },
        )
    except RegistryUnavailable as error:  # the report stands on disk; say it was not logged
        details["mlflow_error"] = str(error)
    (folder / "report.json").write_text(json.dumps(details, indent=2, default=str))
    return folder / "report.html", folder / "report.json", details


def _signal_order(signal: Any) -> tuple:
    """Drifted first, embeddings first, then by how far past the threshold."""
    return (not signal.drifted, signal.name != "embeddings", -signal.severity)


def _metrics(verdict: Verdict, window: Window) -> dict[str, float]:
    metrics = {f"drift_{s.name}": s.score for s in verdict.signals}
    metrics["requests"] = len(window.rows)
    metrics["excluded_other_versions"] = sum(window.other_versions.values())
    if verdict.drifted is not None:
        metrics["drifted"] = float(verdict.drifted)
    return metrics


def _compare_details(details: dict, c: Compared, registry: Registry, version: str) -> list[dict]:
    """Breakdown, most drifted slice and its look-alike catalogue images into `details`."""
    table = breakdown.category_breakdown(c.ref_rows, c.ref_emb, c.cur_rows, c.cur_emb)
    slice_name = str(table.iloc[0]["category"]) if len(table) else None
    details["reference"] = {"rows_compared": len(c.ref_rows), "note": c.reference_note}
    details["window"]["compared"] = len(c.cur_rows)
    details["categories"] = json.loads(table.to_json(orient="records"))
    details["most_drifted_slice"] = slice_name
    samples: list[dict] = []
    if slice_name is not None and c.sample_images:
        picks = breakdown.drifted_requests(
            slice_name, c.ref_rows, c.ref_emb, c.cur_rows, c.cur_emb, c.sample_images
        )
        with tempfile.TemporaryDirectory() as tmp:
            index = registry.download_artifacts(version, "index", Path(tmp))
            samples = breakdown.nearest_products(
                c.cur_emb[picks],
                np.load(index / "embeddings.npy"),
                pd.read_parquet(index / "products.parquet"),
                c.catalogue,
            )
    details["samples"] = [{k: v for k, v in s.items() if k != "image"} for s in samples]
    details["samples_note"] = SAMPLES_NOTE
    details["evidently"] = {"html": "evidently.html", "json": "evidently.json"}
    return samples


STYLE = """body{font:14px system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
h1{font-size:1.3em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;
padding:3px 8px;text-align:left}th{background:#f4f4f4}td.num{text-align:right}.drift{color:#b00;
font-weight:bold}.ok{color:#070;font-weight:bold}.none{color:#a60;font-weight:bold}
figure{display:inline-block;margin:4px;text-align:center;font-size:12px}"""


def _cls(drifted: bool | None) -> str:
    return "none" if drifted is None else "drift" if drifted else "ok"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else html.escape(str(value))


def _num(value: Any) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return " class='num'" if numeric else ""


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td{_num(r.get(c))}>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_page(d: dict, samples: list[dict]) -> str:
    """The on-call page: the verdict first, then what drifted and where."""
    v, w = d["verdict"], d["window"]
    parts = [
        f"<h1 class='{_cls(v['drifted'])}'>{html.escape(v['headline'])}</h1>",
        f"<p>Model version <b>{html.escape(d['model_version'])}</b>; window "
        f"{w['since'][:19]} → {w['until'][:19]} UTC: {w['requests']} requests of this version"
        + (f" ({w['compared']} compared)" if "compared" in w else "")
        + f"; excluded {w['excluded_total']} requests answered by other versions "
        + (html.escape(json.dumps(w["excluded_other_versions"])) if w["excluded_total"] else "")
        + f"; {w['malformed_lines']} unreadable log lines.</p>",
    ]
    if d.get("signals"):
        parts += [
            "<h2>Signals (Evidently)</h2>",
            _table(d["signals"], ["name", "method", "score", "threshold", "drifted"]),
        ]
    if "reference" in d:
        ref = d["reference"]
        parts.append(
            f"<p>Reference: {ref['rows_compared']} rows; {html.escape(ref['note'])}. "
            "Full Evidently report (distributions, embedding picture): "
            "<a href='evidently.html'>evidently.html</a>.</p>"
        )
    if d.get("categories"):
        cols = [
            "category",
            "reference_share",
            "current_share",
            "share_change",
            "reference_confidence",
            "current_confidence",
            "reference_brightness",
            "current_brightness",
            "embedding_shift",
            "current_n",
        ]
        parts += [
            "<h2>Per predicted category (most drifted first)</h2>",
            _table(d["categories"], cols),
        ]
    if samples:
        figs = "".join(
            f"<figure><img src='{s['image']}' width=84 height=84><figcaption>"
            f"{html.escape(s['product_id'])}<br>{html.escape(s['category'])} "
            f"({s['similarity']:.2f})</figcaption></figure>"
            for s in samples
            if s["image"]
        )
        parts += [
            f"<h2>Most drifted slice: {html.escape(str(d['most_drifted_slice']))}</h2>",
            f"<p>{html.escape(d['samples_note'])}</p>{figs}",
        ]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>vitrine drift "
        f"{html.escape(d['created_at'])}</title><style>{STYLE}</style></head><body>"
        f"<p><a href='../index.html'>all reports</a></p>{''.join(parts)}</body></html>"
    )


def write_index(root: Path) -> Path:
    """reports/index.html: every report, newest first, with its verdict."""
    entries = []
    for path in root.glob("*/report.json"):
        try:
            entries.append((path.parent.name, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    entries.sort(key=lambda e: (e[1].get("created_at", ""), e[0]), reverse=True)
    rows = "".join(
        f"<tr><td><a href='{html.escape(name)}/report.html'>{html.escape(d.get('created_at', name))}"
        f"</a></td><td>{html.escape(str(d.get('model_version')))}</td><td>"
        f"{d.get('window', {}).get('requests', '')}</td><td class='{_cls(d['verdict']['drifted'])}'>"
        f"{html.escape(d['verdict']['headline'])}</td></tr>"
        for name, d in entries
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>vitrine drift reports"
        f"</title><style>{STYLE}</style></head><body><h1>Drift reports</h1><table><tr><th>"
        f"report</th><th>version</th><th>requests</th><th>verdict</th></tr>{rows}</table>"
        "</body></html>"
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text(page)
    return root / "index.html"
