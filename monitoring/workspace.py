"""On-call's view over time: every drift report's Evidently snapshot also goes into an
Evidently workspace in the state folder (`evidently/`), in one project whose dashboard plots
each signal's drift score run after run. `vitrine ui` serves it with Evidently's own UI
(`evidently ui --workspace <state>/evidently`); the per-report HTML and reports/index.html stay.

The dashboard is made when the project is created: a counter of the latest embedding score,
then one line panel per signal (the embeddings, each monitored column), each titled with its
method and the threshold above which (or, for p-value tests, below which) it drifts. The
verdict of each run is in the snapshot's tests, shown on its page in the UI."""

from __future__ import annotations

from pathlib import Path

from components.config import MonitoringParams
from monitoring.detect import EMBEDDINGS

PROJECT = "vitrine drift"
DESCRIPTION = (
    "vitrine drift: the champion's live requests against its reference, one snapshot per "
    "`vitrine drift` run (scheduled monitor runs included)"
)


def panels(settings: MonitoringParams) -> list:
    """The dashboard: the latest embedding score, then each signal's score over time."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import counter_panel, line_plot_panel

    embeddings = PanelMetric(
        legend="embeddings",
        metric="EmbeddingsDrift",
        metric_labels={"embeddings_name": EMBEDDINGS},
    )
    method, threshold = settings.embeddings.method, settings.embeddings.threshold
    made = [
        counter_panel("latest embedding drift score", [embeddings], size="half"),
        line_plot_panel(
            "embeddings", [embeddings], f"{method}; drift above {threshold}", size="half"
        ),
    ]
    for column, rule in settings.columns.items():
        value = PanelMetric(legend=column, metric="ValueDrift", metric_labels={"column": column})
        made.append(
            line_plot_panel(column, [value], f"{rule.method}; threshold {rule.threshold}", "half")
        )
    return made


def project(root: Path, settings: MonitoringParams):
    """(workspace, the vitrine drift project): created with its dashboard on first use."""
    from evidently.ui.workspace import Workspace

    workspace = Workspace.create(str(root))
    found = workspace.search_project(PROJECT)
    if found:
        return workspace, found[0]
    created = workspace.create_project(PROJECT, description=DESCRIPTION)
    for panel in panels(settings):
        created.dashboard.add_panel(panel)
    return workspace, created


def add_snapshot(root: Path, snapshot, settings: MonitoringParams) -> str:
    """Add one drift run's snapshot (its scores and tests; not the sampled rows); its id."""
    workspace, drift_project = project(root, settings)
    return str(workspace.add_run(drift_project.id, snapshot, include_data=False).id)
