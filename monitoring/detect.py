"""Drift signals computed by Evidently, and THE decision function over them.

`compute_signals` runs one Evidently Report: EmbeddingsDrift on the embeddings (method and
threshold from params.monitoring.embeddings) and ValueDrift on each monitored request-log field
(predicted category, confidence, brightness, contrast, width, height, aspect). `decide` turns
the signals into the verdict, exit code and one-line headline. `vitrine drift` and
benchmarks/drift.py call both, so the benchmark measures the detector on-call relies on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.legacy.metrics.data_drift import embeddings_drift
from evidently.metrics import EmbeddingsDrift, ValueDrift
from evidently.metrics.embeddings import (
    DistanceDriftMethod,
    MMDDriftMethod,
    ModelDriftMethod,
    RatioDriftMethod,
)
from evidently.tests import lte

from components.config import MonitoringParams

EMBEDDINGS = "embedding"
NUMERIC = ("confidence", "brightness", "contrast", "width", "height", "aspect")
P_VALUE_METHODS = {"ks", "chisquare", "z", "cramer_von_mises", "anderson", "mannw", "t_test"}
METHODS = {
    "mmd": MMDDriftMethod,
    "model": ModelDriftMethod,
    "distance": DistanceDriftMethod,
    "ratio": RatioDriftMethod,
}


@dataclass(frozen=True)
class Signal:
    """One drift test: its Evidently score, threshold and outcome."""

    name: str  # "embeddings" or a request-log column
    method: str
    score: float
    threshold: float
    drifted: bool

    @property
    def severity(self) -> float:
        """How far past its threshold (ratio), comparable across methods for ordering."""
        if self.method in P_VALUE_METHODS:
            return self.threshold / max(self.score, 1e-12)
        return self.score / self.threshold

    def describe(self) -> str:
        if self.method in P_VALUE_METHODS:
            op = "<" if self.drifted else ">="
            return f"{self.name} ({self.method} p {self.score:.2g} {op} {self.threshold:g})"
        op = ">" if self.drifted else "<="
        return f"{self.name} ({self.method} {self.score:.3g} {op} {self.threshold:.3g})"


@dataclass
class Verdict:
    drifted: bool | None  # None: no verdict (too few samples)
    exit_code: int  # 0 no drift, 1 drift, 2 no verdict / error
    headline: str
    signals: list[Signal] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "signals": [asdict(s) for s in self.signals]}


def embedding_method(settings: MonitoringParams):
    """The Evidently drift method configured in params.monitoring.embeddings."""
    emb = settings.embeddings
    return METHODS[emb.method](threshold=emb.threshold, pca_components=emb.pca_components)


def category_shares(categories: pd.Series) -> dict[str, float]:
    return {str(k): float(v) for k, v in categories.value_counts(normalize=True).items()}


def decide(
    signals: list[Signal],
    n_current: int,
    min_samples: int,
    shares: tuple[dict[str, float], dict[str, float]] | None = None,
) -> Verdict:
    """The verdict: drift when any signal drifted; no verdict below `min_samples` requests.

    The headline lists the drifted signals, embeddings first, then by how far past their
    threshold; a drifted category signal is told as the prediction share that moved most
    (`shares` = (current, reference) shares per predicted category).
    """
    if n_current < min_samples:
        return Verdict(
            None,
            2,
            f"NO VERDICT: too few samples: {n_current} requests of the "
            f"champion in the window, need at least {min_samples}",
        )
    drifted = [s for s in signals if s.drifted]
    if not drifted:
        return Verdict(False, 0, "no drift", signals)
    drifted.sort(key=lambda s: (s.name != "embeddings", -s.severity))
    parts = [
        _describe_category(s, shares) if s.name == "category" else s.describe() for s in drifted
    ]
    return Verdict(True, 1, "DRIFT: " + ", ".join(parts), signals)


def _describe_category(signal: Signal, shares: tuple[dict, dict] | None) -> str:
    if not shares:
        return signal.describe()
    current, reference = shares
    moved = max(
        set(current) | set(reference),
        key=lambda c: abs(current.get(c, 0.0) - reference.get(c, 0.0)),
    )
    test = signal.describe().removeprefix(f"{signal.name} ")
    return (
        f"prediction share of {moved!r} {current.get(moved, 0.0):.2f} vs "
        f"{reference.get(moved, 0.0):.2f} {test}"
    )


def to_frame(rows: pd.DataFrame, emb: np.ndarray) -> pd.DataFrame:
    """Request-log fields plus one column per embedding dimension, as Evidently wants them."""
    cols = {name: rows[name].astype(float).to_numpy() for name in NUMERIC}
    cols["category"] = rows["category"].astype(str).to_numpy()
    frame = pd.DataFrame(cols)
    emb_cols = pd.DataFrame(emb, columns=[f"emb_{i}" for i in range(emb.shape[1])])
    return pd.concat([frame, emb_cols], axis=1)


@contextlib.contextmanager
def tsne_points(n: int) -> Iterator[None]:
    """EmbeddingsDrift draws a t-SNE picture of up to 2,500 points per side, which takes minutes
    on 2 cores and plays no part in the score: cap it for the report's picture."""
    saved = embeddings_drift.SAMPLE_CONSTANT
    embeddings_drift.SAMPLE_CONSTANT = n
    try:
        yield
    finally:
        embeddings_drift.SAMPLE_CONSTANT = saved


def build_report(settings: MonitoringParams, n_dims: int, embeddings: bool) -> tuple:
    emb_cols = [f"emb_{i}" for i in range(n_dims)]
    definition = DataDefinition(
        numerical_columns=list(NUMERIC) + (emb_cols if embeddings else []),
        categorical_columns=["category"],
        embeddings={EMBEDDINGS: emb_cols} if embeddings else None,
    )
    metrics: list = []
    if embeddings:
        threshold = settings.embeddings.threshold
        metrics.append(
            EmbeddingsDrift(
                embeddings_name=EMBEDDINGS,
                tests=[lte(threshold)],
                drift_method=embedding_method(settings),
            )
        )
    for name, column in settings.columns.items():
        metrics.append(ValueDrift(column=name, method=column.method, threshold=column.threshold))
    return Report(metrics, include_tests=True), definition


def compute_signals(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    settings: MonitoringParams,
    render: bool = True,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Signal], object | None]:
    """Signals of `current` vs `reference` (frames from `to_frame`) and the Evidently snapshot.

    render=True (vitrine drift): one Report with EmbeddingsDrift + ValueDrift, whose snapshot
    becomes the HTML/JSON report. render=False (the benchmark): the same ValueDrift Report, and
    the embedding score from the same Evidently drift method called directly, skipping only
    EmbeddingsDrift's t-SNE picture. Both give identical scores (tests/unit/test_drift.py).
    `metadata` goes into the snapshot (the model version: the workspace's dashboards filter
    by it)."""
    n_dims = sum(c.startswith("emb_") for c in reference.columns)
    report, definition = build_report(settings, n_dims, embeddings=render)
    cols = list(reference.columns) if render else [*NUMERIC, "category"]
    with tsne_points(settings.tsne_points):
        snapshot = report.run(
            current_data=Dataset.from_pandas(current[cols], data_definition=definition),
            reference_data=Dataset.from_pandas(reference[cols], data_definition=definition),
            metadata=metadata or {},
        )
    signals = read_signals(snapshot.dict(), settings)
    if not render:
        emb_cols = [f"emb_{i}" for i in range(n_dims)]
        score, drifted, method = embedding_method(settings)(
            current[emb_cols].copy(), reference[emb_cols].copy()
        )
        threshold = settings.embeddings.threshold
        signals.insert(0, Signal("embeddings", method, float(score), threshold, bool(drifted)))
    return signals, (snapshot if render else None)


DETECTED = ("items", "item_area")  # what the request log keeps of a /detect answer


def detected_item_signals(
    reference: pd.DataFrame, current: pd.DataFrame, settings: MonitoringParams
) -> list[Signal]:
    """What /detect finds in the window (items per photo, the share of the photo they cover)
    against what the champion's detector found on its held-out scenes (the evaluate stage's
    detect reference), one Evidently ValueDrift each: signals `detected_items` and
    `detected_item_area`. Nothing below params monitoring.detected_items.min_samples /detect
    requests, or without a reference (a version without a detector)."""
    config = settings.detected_items
    current = current.dropna(subset=list(DETECTED))
    if reference is None or len(current) < config.min_samples:
        return []
    definition = DataDefinition(numerical_columns=list(DETECTED))
    metrics = [
        ValueDrift(column=name, method=config.method, threshold=config.threshold)
        for name in DETECTED
    ]
    frames = [
        Dataset.from_pandas(f[list(DETECTED)].astype(float), data_definition=definition)
        for f in (current, reference)
    ]
    data = (
        Report(metrics, include_tests=True)
        .run(current_data=frames[0], reference_data=frames[1])
        .dict()
    )
    failed = {t["metric_config"]["metric_id"]: t["status"] == "FAIL" for t in data["tests"]}
    return [
        Signal(
            f"detected_{metric['config']['column']}",
            config.method,
            float(metric["value"]),
            config.threshold,
            failed.get(metric["id"], False),
        )
        for metric in data["metrics"]
    ]


def read_signals(data: dict, settings: MonitoringParams) -> list[Signal]:
    """Scores from the snapshot's metrics, drift outcomes from its tests (FAIL = drift)."""
    failed = {t["metric_config"]["metric_id"]: t["status"] == "FAIL" for t in data["tests"]}
    signals = []
    for metric in data["metrics"]:
        config, value = metric["config"], float(metric["value"])
        if "EmbeddingsDrift" in config["type"]:
            name, method = "embeddings", settings.embeddings.method
            threshold = settings.embeddings.threshold
        else:
            name = config["column"]
            method, threshold = settings.columns[name].method, settings.columns[name].threshold
        signals.append(Signal(name, method, value, threshold, failed.get(metric["id"], False)))
    return signals
