"""Drift monitoring: the verdict logic, the request-log window, shifts and the report index."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import MonitoringParams, Params, state_paths
from components.serving.logs import RequestLog
from monitoring import detect, drift, report, shifts
from monitoring.detect import Signal, decide
from monitoring.window import parse_since, read_window

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def sig(name: str, method: str, score: float, threshold: float, drifted: bool) -> Signal:
    return Signal(name, method, score, threshold, drifted)


@pytest.mark.parametrize(
    ("signals", "n", "drifted", "code", "headline"),
    [
        (
            [
                sig("embeddings", "mmd", 0.001, 0.01, False),
                sig("brightness", "ks", 0.4, 0.001, False),
            ],
            500,
            False,
            0,
            "no drift",
        ),
        (
            [
                sig("embeddings", "mmd", 0.031, 0.015, True),
                sig("brightness", "ks", 0.4, 0.001, False),
            ],
            500,
            True,
            1,
            "DRIFT: embeddings (mmd 0.031 > 0.015)",
        ),
        (
            [
                sig("brightness", "ks", 1e-9, 0.001, True),
                sig("embeddings", "mmd", 0.031, 0.015, True),
                sig("contrast", "ks", 1e-30, 0.001, True),
            ],
            500,
            True,
            1,
            "DRIFT: embeddings (mmd 0.031 > 0.015), contrast (ks p 1e-30 < 0.001), "
            "brightness (ks p 1e-09 < 0.001)",
        ),
        (
            [sig("embeddings", "mmd", 0.5, 0.01, True)],
            199,
            None,
            2,
            "NO VERDICT: too few samples: 199 requests of the champion in the window, "
            "need at least 200",
        ),
        (
            [sig("confidence", "wasserstein", 0.3, 0.1, True)],
            200,
            True,
            1,
            "DRIFT: confidence (wasserstein 0.3 > 0.1)",
        ),
    ],
)
def test_decide_table(signals, n, drifted, code, headline):
    verdict = decide(signals, n, 200)
    assert (verdict.drifted, verdict.exit_code, verdict.headline) == (drifted, code, headline)


def test_category_drift_is_told_as_the_prediction_share_that_moved_most():
    signals = [
        sig("embeddings", "mmd", 0.031, 0.015, True),
        sig("category", "chisquare", 1e-9, 0.001, True),
    ]
    shares = ({"Bag": 0.31, "Coat": 0.09, "Dress": 0.6}, {"Bag": 0.10, "Coat": 0.2, "Dress": 0.7})
    verdict = decide(signals, 1000, 200, shares)
    assert verdict.headline == (
        "DRIFT: embeddings (mmd 0.031 > 0.015), prediction share of "
        "'Bag' 0.31 vs 0.10 (chisquare p 1e-09 < 0.001)"
    )


def write_log(folder, version: str, n: int, when: datetime | None = None, dim: int = 4) -> None:
    log = RequestLog(folder)
    stats = {"width": 28, "height": 28, "aspect": 1.0, "brightness": 0.3, "contrast": 0.2}
    for i in range(n):
        log.write("/classify", version, np.full(dim, i / max(n, 1)), "Bag", 0.9, stats)
    if when is not None:  # move the records to another time (and its day's file, like the log)
        for path in folder.glob("requests-*.jsonl"):
            lines = [json.loads(x) for x in path.read_text().splitlines()]
            for rec in lines:
                rec["timestamp"] = when.isoformat()
            path.unlink()
            log.path_for(when).write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_read_window_excludes_other_versions_and_counts_them(tmp_path):
    write_log(tmp_path, "3", 5)
    write_log(tmp_path, "2", 2)
    with next(tmp_path.glob("requests-*.jsonl")).open("a") as out:
        out.write('{"timestamp": "not a time"}\n{broken json\n')
        old = {
            "timestamp": datetime.now(UTC).isoformat(),
            "model_version": "3",
            "endpoint": "/tags",
            "category": "Coat",
            "confidence": 0.5,
            "width": 40,
            "height": 20,
            "brightness": 0.1,
            "contrast": 0.1,
            "embedding": [0, 0, 0, 1],
        }
        out.write(json.dumps(old) + "\n")  # a record from before `aspect` was logged
    now = datetime.now(UTC)
    window = read_window(tmp_path, "3", now - timedelta(hours=1), now)
    assert len(window.rows) == 6 and window.emb.shape == (6, 4)
    assert window.other_versions == {"2": 2} and window.malformed == 2
    assert window.rows["aspect"].tolist()[-1] == 2.0
    later = read_window(tmp_path, "3", now + timedelta(minutes=1), now + timedelta(hours=1))
    assert len(later.rows) == 0


def test_read_window_keeps_only_the_time_window(tmp_path):
    write_log(tmp_path / "old", "1", 3, when=NOW - timedelta(days=2))
    write_log(tmp_path / "old", "1", 0)
    window = read_window(tmp_path / "old", "1", NOW - timedelta(days=3), NOW)
    assert len(window.rows) == 3
    assert len(read_window(tmp_path / "old", "1", NOW - timedelta(days=1), NOW).rows) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", NOW - timedelta(hours=1)),
        ("30m", NOW - timedelta(minutes=30)),
        ("2d", NOW - timedelta(days=2)),
        ("2026-11-22T07:00", datetime(2026, 11, 22, 7, tzinfo=UTC)),
        ("2026-11-22T07:00:00+01:00", datetime(2026, 11, 22, 6, tzinfo=UTC)),
    ],
)
def test_parse_since(text, expected):
    assert parse_since(text, NOW) == expected


def test_parse_since_refuses_nonsense():
    with pytest.raises(ValueError, match="duration like 30m"):
        parse_since("yesterday-ish", NOW)


def test_no_champion_is_an_error_with_exit_2(tmp_path):
    result = drift.run_drift(state_paths(tmp_path / "state"), Params())
    assert (result.drifted, result.exit_code) == (None, 2)
    assert result.headline.startswith("ERROR: no champion yet")


def pooled(images: np.ndarray) -> np.ndarray:
    """A real, cheap 'embedding' of Fashion-MNIST images: 7×7 average pooling, L2-normalised."""
    x = images.reshape(len(images), 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(images), -1)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def frames(images: np.ndarray, labels: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    grey = images.astype(float) / 255.0
    rows = pd.DataFrame(
        {
            "category": [f"c{int(y)}" for y in labels],
            "confidence": grey.max(axis=(1, 2)),
            "brightness": grey.mean(axis=(1, 2)),
            "contrast": grey.std(axis=(1, 2)),
            "width": 28,
            "height": 28,
            "aspect": 1.0,
        }
    )
    return rows, pooled(images)


def test_detector_on_real_images_and_both_paths_agree(fmnist):
    images, labels = fmnist["test"]
    settings = MonitoringParams(tsne_points=50)
    ref = detect.to_frame(*frames(images[:400], labels[:400]))
    same = detect.to_frame(*frames(images[400:700], labels[400:700]))
    dark = (images[400:700] * 0.6).astype(np.uint8)
    darker = detect.to_frame(*frames(dark, labels[400:700]))
    quiet, _ = detect.compute_signals(ref, same, settings, render=False)
    assert decide(quiet, 300, settings.min_samples).headline == "no drift"
    light, _ = detect.compute_signals(ref, darker, settings, render=False)
    full, snapshot = detect.compute_signals(ref, darker, settings, render=True)
    assert snapshot is not None
    assert [(s.name, s.drifted) for s in light] == [(s.name, s.drifted) for s in full]
    assert np.allclose([s.score for s in light], [s.score for s in full])
    verdict = decide(full, 300, settings.min_samples)
    assert verdict.exit_code == 1 and "brightness (ks p" in verdict.headline


def test_shifts_change_real_images_and_keep_their_size(fmnist):
    image = Image.fromarray(fmnist["test"][0][0])
    rng = np.random.default_rng(0)
    for shift in shifts.SHIFTS:
        out = shifts.apply_shift(image, shift, rng)
        assert out.size == image.size and out.mode == image.mode
        changed = not np.array_equal(np.asarray(out), np.asarray(image))
        assert changed == (shift not in ("none", "new-category")), shift
    dark = shifts.apply_shift(image, "darken", rng)
    assert np.asarray(dark).mean() < 0.9 * np.asarray(image).mean()
    with pytest.raises(ValueError, match="unknown shift"):
        shifts.apply_shift(image, "sepia", rng)


def test_new_category_mixes_in_real_digits(fmnist):
    unknown = list(shifts.withheld_category_images())
    assert len(unknown) == 1797 and unknown[0].size == (28, 28)
    sources = [Image.fromarray(a) for a in fmnist["test"][0][:400]]
    out = shifts.shifted_images("new-category", sources, unknown, np.random.default_rng(1))
    digits = sum(any(o is u for u in unknown) for o in out)
    assert 0.15 * 400 < digits < 0.35 * 400  # NEW_CATEGORY_SHARE = 0.25


def test_index_lists_reports_newest_first_with_their_verdicts(tmp_path):
    for name, created, headline, drifted in [
        ("a", "2026-11-22T07:00:00+00:00", "no drift", False),
        ("b", "2026-11-22T09:00:00+00:00", "DRIFT: brightness (ks p 1e-09 < 0.001)", True),
        ("c", "2026-11-22T08:00:00+00:00", "NO VERDICT: too few samples", None),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(
            json.dumps(
                {
                    "created_at": created,
                    "model_version": "3",
                    "window": {"requests": 5},
                    "verdict": {"headline": headline, "drifted": drifted, "exit_code": 0},
                }
            )
        )
    page = report.write_index(tmp_path).read_text()
    assert page.index("DRIFT: brightness") < page.index("NO VERDICT") < page.index("no drift")
    assert "b/report.html" in page


def test_monitoring_params_refuse_unknown_columns():
    with pytest.raises(ValueError, match="unknown monitored columns"):
        MonitoringParams(columns={"colour": {"method": "ks", "threshold": 0.01}})


def detected_frame(rng: np.random.Generator, n: int, items: tuple[int, int], area: float):
    counts = rng.integers(items[0], items[1] + 1, n)
    return pd.DataFrame({"items": counts, "item_area": np.clip(rng.normal(area, 0.05, n), 0.01, 1)})


def test_what_detect_finds_is_compared_with_the_detectors_held_out_scenes():
    settings = MonitoringParams()
    rng = np.random.default_rng(0)
    reference = detected_frame(rng, 300, (2, 5), 0.35)  # 2-5 products, about a third covered
    same = detected_frame(rng, 120, (2, 5), 0.35).assign(category="Bag")  # window rows
    single = detected_frame(rng, 120, (1, 1), 0.12)  # shoppers now send one small product
    quiet = detect.detected_item_signals(reference, same, settings)
    assert [s.name for s in quiet] == ["detected_items", "detected_item_area"]
    assert not any(s.drifted for s in quiet), quiet
    moved = detect.detected_item_signals(reference, single, settings)
    assert all(s.drifted for s in moved) and all(s.score < 0.001 for s in moved), moved
    # other endpoints' rows (no items) are not /detect requests: too few left, no signal
    others = pd.concat([single.head(20), pd.DataFrame({"items": [np.nan] * 200})])
    assert detect.detected_item_signals(reference, others, settings) == []
    assert detect.detected_item_signals(None, single, settings) == []  # no detector


def test_the_window_keeps_what_detect_found_and_nothing_for_other_endpoints(tmp_path):
    log = RequestLog(tmp_path)
    stats = {"width": 512, "height": 384, "aspect": 1.3333, "brightness": 0.6, "contrast": 0.2}
    log.write("/classify", "4", np.ones(4), "Bag", 0.9, stats)
    log.write("/detect", "4", np.ones(4), "Coat", 0.8, stats | {"items": 3, "item_area": 0.41})
    now = datetime.now(UTC)
    rows = read_window(tmp_path, "4", now - timedelta(hours=1), now).rows
    assert rows["endpoint"].tolist() == ["/classify", "/detect"]
    assert np.isnan(rows["items"].iloc[0]) and rows["items"].iloc[1] == 3
    assert rows["item_area"].iloc[1] == pytest.approx(0.41)
