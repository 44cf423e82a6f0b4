"""Drift monitoring of the served champion: the only package that imports Evidently.

`run_drift` (monitoring/drift.py) is what `vitrine drift` and the Prefect `monitor` flow call;
`detect` holds the Evidently signals and the single decision function the benchmark shares.
Imported lazily, so `vitrine simulate` (monitoring.shifts / simulate) does not pay for
Evidently, MLflow and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitoring.drift import DriftResult, run_drift

__all__ = ["DriftResult", "run_drift"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from monitoring import drift

        return getattr(drift, name)
    raise AttributeError(f"module 'monitoring' has no attribute {name!r}")
