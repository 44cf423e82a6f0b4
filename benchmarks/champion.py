"""A champion of N products for the serving benchmark, built by the loop's own stages.

The model has the default architecture (params.yaml's train section: the same layers, input
size and embedding size as `make run`'s champion), so a request costs what it costs in
production; it is trained for a short budget only, because serving speed does not depend on
how good the weights are. Its index holds the first N products of the Fashion-MNIST catalogue
(a stratified slice, as data.limit does for `make run`). One catalogue folder is shared by
every size; each size has its own state folder under --root and is reused when present.

    python benchmarks/champion.py --root /tmp/vitrine-bench --size 6000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.config import DEFAULT_PARAMS, load_params, state_paths  # noqa: E402
from components.data import catalogue, sources  # noqa: E402
from components.release.registry import open_registry  # noqa: E402
from components.stages import evaluate, labels, register, train, validate  # noqa: E402
from components.stages.context import RunContext  # noqa: E402


def champion_env(root: Path, size: int) -> dict[str, str]:
    """VITRINE_HOME and VITRINE_PARAMS of the size-N champion under `root` (built if missing)."""
    home = root / f"champion-{size}"
    params_path = home / "params.yaml"
    paths = state_paths(home / "state")
    env = {"VITRINE_HOME": str(paths.home), "VITRINE_PARAMS": str(params_path)}
    if (home / "ready").exists():
        return env
    home.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["data"].update(catalogue_dir=str(root / "catalogue"), limit=size)
    raw["labels"].update(model="mlp", folds=2)  # out-of-fold labels: seconds, not minutes
    raw["train"].update(epochs=1, progressive_sizes=[], max_batches_per_epoch=40)
    # the default variants (onnx, int8) are built, so VITRINE_VARIANT=int8 can be benchmarked too
    raw["registry"]["calibration_images"] = 256
    raw["evaluation"]["latency_images"] = 32
    params_path.write_text(yaml.safe_dump(raw))
    params = load_params(params_path)
    ctx = RunContext(params, paths, work=home / "run", repo=home)
    started = time.perf_counter()
    if not (ctx.catalogue_dir / catalogue.MANIFEST).exists():
        catalogue.ingest_catalogue(
            "fashion-mnist",
            ctx.catalogue_dir,
            params.data.categories,
            fashion_mnist_dir=sources.fashion_mnist_dir(params.data, paths),
            test_fraction=params.data.test_fraction,
        )
    for stage in (validate, labels, train, evaluate):
        stage.run(ctx)
    registry = open_registry(paths, params)
    version = register.run(ctx, registry, cause=f"benchmark champion of {size} products")["version"]
    registry.promote(version, bootstrap_without_approval=True, floors_passed=True)
    (home / "ready").write_text(version)
    print(
        f"champion of {size} products: version {version} in {time.perf_counter() - started:.0f} s"
    )
    return env


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/tmp/vitrine-bench"))
    parser.add_argument("--size", type=int, required=True)
    args = parser.parse_args()
    print(champion_env(args.root.resolve(), args.size))
