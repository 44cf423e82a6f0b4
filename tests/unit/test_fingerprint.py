"""A rerun is a no-op only on the same data and params (components/stages/register.py)."""

from __future__ import annotations

import pandas as pd

from components.config import Params, state_paths
from components.data.catalogue import MANIFEST, MANIFEST_COLUMNS
from components.stages.context import RunContext
from components.stages.register import run_fingerprint


def context(tmp_path, rows: list[dict], **params) -> RunContext:
    catalogue = tmp_path / "catalogue"
    catalogue.mkdir(exist_ok=True)
    frame = pd.DataFrame([{c: row.get(c, "") for c in MANIFEST_COLUMNS} for row in rows])
    frame.to_parquet(catalogue / MANIFEST)
    values = Params().model_dump()
    values["data"]["catalogue_dir"] = str(catalogue)
    for section, update in params.items():
        values[section].update(update)
    return RunContext(Params(**values), state_paths(tmp_path / "state"), tmp_path, tmp_path)


ROWS = [
    {"product_id": "p1", "label": 0, "sha256": "aa", "split": "train"},
    {"product_id": "p2", "label": 1, "sha256": "bb", "split": "test"},
]


def test_the_fingerprint_follows_data_and_params_but_not_schedules(tmp_path):
    base = run_fingerprint(context(tmp_path, ROWS))
    assert run_fingerprint(context(tmp_path, ROWS)) == base
    relabelled = [ROWS[0], {**ROWS[1], "label": 2}]
    new_photo = [ROWS[0], {**ROWS[1], "sha256": "cc"}]
    for rows in (relabelled, new_photo, ROWS[:1]):
        assert run_fingerprint(context(tmp_path, rows)) != base
    assert run_fingerprint(context(tmp_path, ROWS, train={"epochs": 7})) != base
    assert run_fingerprint(context(tmp_path, ROWS, gate={"min_accuracy": 0.5})) != base
    later = {"retrain": {"cron": "0 5 * * *", "active": False}}
    assert run_fingerprint(context(tmp_path, ROWS, schedules=later)) == base
