"""Drift detection benchmark: detection rate per shift and false-alarm rate of `vitrine drift`.

For each shift (monitoring/shifts.py) and for unshifted traffic, `--windows` windows of
`--window-size` requests are built from held-out test images and pushed through the same code
path as the service's request log (decode_upload → transforms.model_input → the champion →
softmax → compute_image_stats → RequestLog.write), read back with monitoring.window.read_window
and judged by monitoring.detect.compute_signals + decide, with params.yaml's thresholds: the
detector `vitrine drift` runs, minus only EmbeddingsDrift's t-SNE picture.

Honest pools: the test images in the reference sample that `vitrine drift` compares against
are never sent; the rest is split in two halves, `--part calibration` (for tuning thresholds)
and `--part evaluation` (the figures), with different seeds. Baseline, measured on the same
windows: a predictions-only monitor (the category and confidence signals alone).

    VITRINE_HOME=... python benchmarks/drift.py [--part calibration] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.config import configure_environment, load_params, state_paths  # noqa: E402
from components.model.training import predict_batches  # noqa: E402
from components.model.transforms import model_input  # noqa: E402
from components.serving.logs import RequestLog
from components.serving.uploads import UploadLimits, compute_image_stats, decode_upload
from monitoring import detect, drift, shifts  # noqa: E402
from monitoring.window import read_window  # noqa: E402

BASELINE_SIGNALS = {"category", "confidence"}  # a predictions-only monitor


def half(key: str) -> str:
    return "calibration" if hashlib.sha256(key.encode()).digest()[0] % 2 == 0 else "evaluation"


def log_window(images: list, model, version: str, categories: list[str], folder: Path) -> None:
    """The service's request path for a batch of uploads, into a request log at `folder`."""
    log, limits = RequestLog(folder), UploadLimits()
    decoded = [decode_upload(shifts.encode_png(im), "image/png", limits) for im in images]
    pixels = [model_input(im, model) for im in decoded]
    probs, emb = predict_batches(model, np.stack(pixels))
    for i, image in enumerate(decoded):
        best = int(probs[i].argmax())
        log.write(
            "/classify",
            version,
            emb[i],
            categories[best],
            float(probs[i][best]),
            compute_image_stats(image, pixels[i]),
        )


def judge(folder: Path, version: str, ref_frame, ref_shares: dict, settings) -> tuple:
    """(verdict, baseline verdict) for the logged window, as `vitrine drift` reads it."""
    window = read_window(folder, version, *_forever())
    rows, emb = drift.seeded_sample(
        window.rows, window.emb, settings.max_current_rows, settings.seed
    )
    signals, _ = detect.compute_signals(ref_frame, detect.to_frame(rows, emb), settings, False)
    shares = (detect.category_shares(rows["category"]), ref_shares)
    verdict = detect.decide(signals, len(window.rows), settings.min_samples, shares)
    base = [s for s in signals if s.name in BASELINE_SIGNALS]
    return verdict, detect.decide(base, len(window.rows), settings.min_samples, shares)


def _forever() -> tuple:
    from datetime import UTC, datetime

    return datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)


def load_setup(part: str) -> dict:
    paths = state_paths()
    configure_environment(paths)
    params = load_params()
    registry = drift.open_registry(paths, params)
    version = registry.alias_version("champion")
    if version is None:
        sys.exit(f"no champion in {paths.home}: run `make run` first (or set VITRINE_HOME)")
    ref_rows, ref_emb, note = drift.load_reference(registry, version, paths, params)
    settings = params.monitoring
    ref_rows, ref_emb = drift.seeded_sample(
        ref_rows, ref_emb, settings.reference_rows, settings.seed
    )
    catalogue = params.data.catalogue_path()
    test = shifts.held_out_products(catalogue)
    test = test[~test["product_id"].isin(set(ref_rows["product_id"]))]
    test = test[[half(p) == part for p in test["product_id"]]]
    unknown = [
        im for i, im in enumerate(shifts.withheld_category_images()) if half(f"d{i}") == part
    ]
    return {
        "params": params,
        "settings": settings,
        "version": version,
        "note": note,
        "model": registry.load_model(version).eval(),
        "ref_frame": detect.to_frame(ref_rows, ref_emb),
        "ref_shares": detect.category_shares(ref_rows["category"]),
        "pool": shifts.open_images(catalogue, test["path"].tolist()),
        "unknown": unknown,
    }


def run(part: str, windows: int, size: int, seed: int) -> dict:
    s = load_setup(part)
    print(
        f"champion v{s['version']}; reference: {s['note']}; {part} pool "
        f"{len(s['pool'])} images + {len(s['unknown'])} unknown-category images"
    )
    if len(s["pool"]) < size:
        sys.exit(f"the {part} pool has {len(s['pool'])} images, fewer than --window-size {size}")
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for k, shift in enumerate(shifts.SHIFTS):
        hits = base_hits = 0
        scores: dict[str, list[float]] = {}
        for w in range(windows):
            rng = np.random.default_rng([seed, k, w])
            picks = rng.choice(len(s["pool"]), size, replace=False)
            images = shifts.shifted_images(shift, [s["pool"][i] for i in picks], s["unknown"], rng)
            with tempfile.TemporaryDirectory() as tmp:
                log_window(images, s["model"], s["version"], s["params"].data.categories, Path(tmp))
                verdict, base = judge(
                    Path(tmp), s["version"], s["ref_frame"], s["ref_shares"], s["settings"]
                )
            hits += bool(verdict.drifted)
            base_hits += bool(base.drifted)
            for sig in verdict.signals:
                scores.setdefault(sig.name, []).append(sig.score)
        results[shift] = {
            "rate": hits / windows,
            "baseline_rate": base_hits / windows,
            "scores": scores,
        }
        print(
            f"  {shift:<13} detected {hits:>2}/{windows} (baseline {base_hits:>2}/{windows})"
            f"  [{time.perf_counter() - started:.0f} s]",
            flush=True,
        )
    return results


def print_calibration(results: dict, settings) -> None:
    """Per signal: the unshifted windows' worst score (max; min for p-values) and each shift's
    median, to set thresholds between them (params.yaml monitoring)."""
    names = list(results["none"]["scores"])
    print(
        f"\n{'signal':<12}{'none worst':>10}" + "".join(f"{s[:10]:>11}" for s in shifts.SHIFTS[1:])
    )
    for name in names:
        method = (
            settings.embeddings.method if name == "embeddings" else settings.columns[name].method
        )
        worst = min if method in detect.P_VALUE_METHODS else max
        row = f"{name:<12}{worst(results['none']['scores'][name]):>10.4f}"
        row += "".join(f"{np.median(results[s]['scores'][name]):>11.4f}" for s in shifts.SHIFTS[1:])
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window-size", type=int, default=1000)
    parser.add_argument("--part", choices=["evaluation", "calibration"], default="evaluation")
    parser.add_argument(
        "--seed", type=int, default=None, help="default: 1 evaluation, 2 calibration"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else (1 if args.part == "evaluation" else 2)
    results = run(args.part, args.windows, args.window_size, seed)
    shifted = [s for s in shifts.SHIFTS if s != "none"]
    rates = {s: results[s]["rate"] for s in shifted}
    base = {s: results[s]["baseline_rate"] for s in shifted}
    false_alarm, base_false = results["none"]["rate"], results["none"]["baseline_rate"]
    mean, base_mean = float(np.mean(list(rates.values()))), float(np.mean(list(base.values())))
    print(f"\n{'shift':<14}{'detection':>10}{'baseline':>10}")
    for s in shifted:
        print(f"{s:<14}{rates[s]:>10.2f}{base[s]:>10.2f}")
    print(f"{'false alarms':<14}{false_alarm:>10.2f}{base_false:>10.2f}")
    ratio = mean / base_mean if base_mean else float("inf")
    print(
        f"mean detection {mean:.3f} vs predictions-only baseline {base_mean:.3f}: "
        f"{ratio:.2f}x; goal >= 0.95 per shift, <= 0.05 false alarms"
    )
    if args.part == "calibration":
        print_calibration(results, load_params().monitoring)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "detection_rate": rates,
                    "false_alarm_rate": false_alarm,
                    "windows": args.windows,
                    "window_size": args.window_size,
                    "part": args.part,
                    "seed": seed,
                    "baseline": {
                        "name": "predictions only (category + confidence signals)",
                        "detection_rate": base,
                        "false_alarm_rate": base_false,
                    },
                    "mean_detection_ratio_to_baseline": ratio,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
