"""A fresh index without retraining: `vitrine index refresh` of --changed products on the
70,000-product default catalogue, against a full re-index by the same model in the same run.

Setup (timed, not the figure): every Fashion-MNIST product (60,000 train + 10,000 test) is
written out as a shop's CSV catalogue of PNG files and ingested; a CNN with params.yaml's
`train` settings is trained briefly on it (--train-batches: the model's quality does not change
a refresh's work, only its embeddings); a temporary state folder with its own SQLite MLflow
store registers it with the index of all 70,000 products and makes it the champion.

Baseline (timed): a full re-index, what a refresh without increments costs: every product
embedded and colour-tagged by the same model (components/stages/refresh.describe_rows, the
refresh's own code), the index built and saved.

Measured: the shop's next export changes --changed products, 40% re-photographed (another
photo of the same category, mirrored), 40% new products, 20% delisted; then the `refresh`
flow as `vitrine index refresh` runs it (Prefect's temporary API included): the source
scanned, the 8,000 new and changed rows staged, validated (Great Expectations and image
checks), embedded and tagged, the index updated and saved, and revision 1 published to the
registry. Goal (issue 17, item 8): <= 120 s on 2 cores.

    python benchmarks/refresh.py --json bench-refresh.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

GOAL_SECONDS = 120.0


def write_shop(folder: Path, fmnist: dict, categories: list[str]) -> Path:
    """The default catalogue as a shop's CSV with one PNG file per product."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for split, (images, labels) in fmnist.items():
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            name = f"img/{split}-{i:05d}.png"
            Image.fromarray(image).save(folder / name, compress_level=1)
            category = categories[int(label)]
            rows.append((f"fm-{split}-{i:05d}", name, category, category, split))
    table = pd.DataFrame(rows, columns=["product_id", "image", "label", "title", "split"])
    table.to_csv(folder / "catalogue.csv", index=False)
    return folder / "catalogue.csv"


def next_export(folder: Path, changed: int, seed: int) -> dict[str, int]:
    """Rewrite the CSV as the shop's next export: re-photographed, new and delisted products."""
    table = pd.read_csv(folder / "catalogue.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    n_photo, n_new = int(changed * 0.4), int(changed * 0.4)
    n_gone = changed - n_photo - n_new
    picked = rng.choice(len(table), n_photo + n_new + n_gone, replace=False)
    photo, new, gone = np.split(picked, [n_photo, n_photo + n_new])
    (folder / "img" / "next").mkdir()
    by_category = table.groupby("label").indices
    for row in photo:  # another product's photo of the same category, mirrored: a new image
        donors = by_category[table.at[row, "label"]]
        donor = table.at[int(rng.choice(donors)), "image"]
        name = f"img/next/{table.at[row, 'product_id']}.png"
        Image.open(folder / donor).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / name)
        table.at[row, "image"] = name
    added = table.iloc[new].copy()
    for i, row in enumerate(added.index):  # new products: mirrored and shifted photos
        name = f"img/next/new-{i:05d}.png"
        with Image.open(folder / table.at[row, "image"]) as source:
            mirrored = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            np_image = np.roll(np.asarray(mirrored), int(rng.integers(1, 4)), axis=1)
        Image.fromarray(np_image).save(folder / name)
        added.at[row, "image"] = name
    added["product_id"] = [f"new-{i:05d}" for i in range(len(added))]
    table = pd.concat([table.drop(index=gone), added], ignore_index=True)
    table.to_csv(folder / "catalogue.csv", index=False)
    return {"rephotographed": n_photo, "new": n_new, "delisted": n_gone}


def champion(ctx, model) -> tuple[str, float]:
    """Register `model` with the index of the whole catalogue as champion; returns the version
    and the seconds of the full re-index (the baseline)."""
    from components.data.catalogue import read_manifest
    from components.model.transforms import to_tensor
    from components.release.registry import open_registry
    from components.retrieval.index import CatalogueIndex
    from components.stages import refresh
    from components.stages.evaluate import build_index

    manifest = read_manifest(ctx.catalogue_dir).sort_values("product_id").reset_index(drop=True)
    model_path = ctx.stage_dir("train") / "model.pt"
    start = time.perf_counter()
    described = refresh.describe_rows(ctx, model_path, manifest)
    index_dir = build_index(ctx, manifest, described)
    CatalogueIndex.load(index_dir).save(index_dir.with_name("rebuilt"))  # built and saved
    baseline = time.perf_counter() - start
    registry = open_registry(ctx.paths, ctx.params)
    example = to_tensor(
        np.zeros((1, model.image_size, model.image_size, model.in_channels), np.uint8)
    )
    with registry.start_run("bench-refresh"):
        version = registry.log_and_register_model(
            model, example.numpy(), {"index": index_dir}, {"cause": "benchmark"}
        )
    registry.record_verdict(version, {"passed": True, "reasons": []})
    registry.promote(version, bootstrap_without_approval=True, floors_passed=True)
    return version, baseline


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--changed", type=int, default=10_000)
    parser.add_argument("--train-batches", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vitrine-bench-refresh-"))
    os.environ["VITRINE_HOME"] = str(tmp / "state")
    from components.config import (
        DEFAULT_PARAMS,
        configure_environment,
        load_params,
        state_paths,
    )

    configure_environment(state_paths())  # telemetry off, Prefect's home in the state folder
    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    categories = params["data"]["categories"]
    import torch

    from components.data.catalogue import ingest_catalogue, load_fashion_mnist, read_manifest
    from components.data.sources import fashion_mnist_dir
    from components.model import training
    from components.stages.context import RunContext, load_images

    setup = time.perf_counter()
    fmnist = load_fashion_mnist(fashion_mnist_dir(load_params().data, state_paths()))
    csv = write_shop(tmp / "shop", fmnist, categories)
    params["data"].update(source=str(csv), catalogue_dir=str(tmp / "catalogue"))
    params["train"].update(max_batches_per_epoch=args.train_batches, epochs=1, shopper_share=0.0)
    params["train"]["segmenter"]["enabled"] = False
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    os.environ["VITRINE_PARAMS"] = str(tmp / "params.yaml")
    ctx = RunContext(load_params(tmp / "params.yaml"), state_paths(), work=tmp / "run")
    ingest_catalogue(str(csv), ctx.catalogue_dir, categories, fashion_mnist_dir=Path("."))
    manifest = read_manifest(ctx.catalogue_dir)
    train = manifest[manifest["split"] == "train"]
    result = training.train_model(
        load_images(ctx, train),
        train["label"].to_numpy(),
        ctx.params.train,
        num_classes=len(categories),
        checkpoint_dir=tmp / "checkpoints",
        progress=False,
    )
    torch.save(result.model.eval(), ctx.stage_dir("train") / "model.pt")
    version, baseline = champion(ctx, result.model.eval())
    setup = time.perf_counter() - setup
    print(f"setup {setup:.0f} s; full re-index of {len(manifest):,} products: {baseline:.1f} s")

    changes = next_export(tmp / "shop", args.changed, args.seed)
    from flows.refresh import refresh

    start = time.perf_counter()
    outcome = refresh()
    wall = time.perf_counter() - start
    if not outcome.get("published"):
        raise SystemExit(f"the refresh published nothing: {outcome}")
    row = {
        "products": len(manifest),
        "changed": args.changed,
        "changes": changes,
        "refresh_seconds": round(wall, 1),
        "refresh_stage_seconds": outcome["seconds"],
        "published": {k: outcome[k] for k in ("revision", "size", "added", "changed", "removed")},
        "quarantined": outcome["quarantined_by_reason"],
        "baseline": {"full_reindex_seconds": round(baseline, 1)},
        "speedup": round(baseline / wall, 2),
        "goal_seconds": GOAL_SECONDS,
        "goal_met": wall <= GOAL_SECONDS,
        "version": version,
        "threads": torch.get_num_threads(),
    }
    print(
        f"refresh of {args.changed:,} changed products: {wall:.1f} s wall (the flow's own work "
        f"{outcome['seconds']} s); full re-index {baseline:.1f} s: x{row['speedup']}; "
        f"goal <= {GOAL_SECONDS:.0f} s: {'met' if row['goal_met'] else 'NOT met'}"
    )
    print(json.dumps(row["published"]), json.dumps(row["quarantined"]))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
