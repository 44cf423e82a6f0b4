"""Benchmark the compressed variants of a registered model against its fp32 torch model.

For the champion (or --version) in $VITRINE_HOME: the fp32 torch model as registered (the
baseline), its ONNX export, the served int8 variant (ONNX Runtime static int8, QDQ, calibrated
on --calibration-images train-split images) and, for the record of why it is not served,
dynamic int8 both ways (ONNX Runtime quantize_dynamic on every op; torch quantize_dynamic on
the Linear layers). Every variant is measured with the loop's own functions on the loop's
frozen test split (the registered index's `split == "test"` rows, queried against its
`split == "train"` embeddings, as the service searches): accuracy, macro-F1, Recall@1, CPU
latency at batch 1 and batch 32 (evaluation.measure_latency, median over --rounds interleaved
rounds because the machine is shared), size on disk, agreement with fp32 predictions, and
ratios to fp32 measured in the same run.

    VITRINE_HOME=/tmp/fresh/.vitrine python benchmarks/compress.py --json bench-compress.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from components.config import configure_environment, load_params, state_paths
from components.model import compress, evaluation
from components.model.training import predict_batches
from components.model.transforms import load_uint8
from components.release.registry import Registry, open_registry

BASELINE = "fp32"


def load_split(registry: Registry, version: str, model: nn.Module, catalogue: Path, tmp: Path):
    """(test images, test labels, test ids, catalogue embeddings, catalogue labels, train paths)
    from the version's own registered index."""
    index = registry.download_artifacts(version, "index", tmp)
    products = pd.read_parquet(index / "products.parquet")
    emb = np.load(index / "embeddings.npy")
    train = (products["split"] == "train").to_numpy()
    test = products[~train]
    size, channels = model.image_size, model.in_channels
    images = np.stack([load_uint8(catalogue / p, size, channels) for p in test["path"]])
    train_paths = [catalogue / p for p in products.loc[train, "path"]]
    return (
        images,
        test["label"].to_numpy(),
        test["product_id"].tolist(),
        emb[train],
        products.loc[train, "label"].to_numpy(),
        train_paths,
    )


def build_variants(model: nn.Module, calibration: np.ndarray, folder: Path) -> dict:
    """name → (runnable model, file measured for size on disk)."""
    fp32_file = folder / "model.pt"
    torch.save(model, fp32_file)
    onnx_path = compress.export_onnx(model, folder / compress.FILES["onnx"])
    int8 = compress.quantize_int8(onnx_path, folder / compress.FILES["int8"], calibration)
    dynamic = compress.quantize_int8_dynamic(onnx_path, folder / "model.int8-dynamic.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        torch_dynamic = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    torch.save(torch_dynamic, folder / "model.int8-dynamic-torch.pt")
    meta = compress.model_meta(model)
    return {
        BASELINE: (model, fp32_file),
        "onnx": (compress.OnnxModel(onnx_path, "onnx", meta), onnx_path),
        "int8": (compress.OnnxModel(int8, "int8", meta), int8),
        "int8-dynamic-ort": (compress.OnnxModel(dynamic, "int8-dynamic", meta), dynamic),
        "int8-dynamic-torch": (torch_dynamic, folder / "model.int8-dynamic-torch.pt"),
    }


def measure_quality(model: nn.Module, split: tuple, categories: list[str], ks: list[int]) -> dict:
    images, labels, _, cat_emb, cat_labels, _ = split
    probs, emb = predict_batches(model, images, 256)
    metrics, _ = evaluation.classification_metrics(labels, probs, categories)
    metrics.update(evaluation.retrieval_metrics(emb, labels, cat_emb, cat_labels, ks))
    return {"metrics": metrics, "predicted": probs.argmax(axis=1), "embedding": emb}


def measure_latencies(variants: dict, images: np.ndarray, n: int, rounds: int) -> dict:
    """Median over interleaved rounds of (ms/image at batch 1, ms/image at batch 32)."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (model, _) in variants.items():
            samples[name].append(evaluation.measure_latency(model, images, n))
    return {
        name: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
        for name, runs in samples.items()
    }


def row(
    quality: dict, base: dict, latency: tuple, base_latency: tuple, size: int, base_size: int
) -> dict:
    m, b = quality["metrics"], base["metrics"]
    cosine = np.sum(quality["embedding"] * base["embedding"], axis=1)
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "recall_at_1": m["recall_at_1"],
        "latency_ms_b1": latency[0],
        "latency_ms_b32": latency[1] * 32,
        "latency_ms_per_image_b32": latency[1],
        "size_bytes": size,
        "agreement_with_fp32": float(np.mean(quality["predicted"] == base["predicted"])),
        "min_embedding_cosine_to_fp32": float(cosine.min()),
        "accuracy_ratio": m["accuracy"] / b["accuracy"],
        "recall_at_1_ratio": m["recall_at_1"] / b["recall_at_1"],
        "speedup_b1": base_latency[0] / latency[0],
        "speedup_b32": base_latency[1] / latency[1],
        "size_ratio": size / base_size,
    }


def print_table(result: dict) -> None:
    head = (
        f"{'variant':20s} {'acc':>7s} {'R@1':>7s} {'b1 ms':>7s} {'b32 ms':>7s} "
        f"{'size KB':>8s} {'acc×':>6s} {'R@1×':>6s} {'b1 ×':>6s} {'b32 ×':>6s} {'size×':>6s} "
        f"{'agree':>6s}"
    )
    print(head)
    for name, r in result["variants"].items():
        print(
            f"{name:20s} {r['accuracy']:7.4f} {r['recall_at_1']:7.4f} {r['latency_ms_b1']:7.3f} "
            f"{r['latency_ms_b32']:7.2f} {r['size_bytes'] / 1024:8.1f} {r['accuracy_ratio']:6.4f} "
            f"{r['recall_at_1_ratio']:6.4f} {r['speedup_b1']:6.2f} {r['speedup_b32']:6.2f} "
            f"{r['size_ratio']:6.3f} {r['agreement_with_fp32']:6.4f}"
        )
    print(
        "ratios are to fp32 torch measured in this run (× > 1 = faster for latency columns); "
        "b32 ms = one batch of 32"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", help="model version (default: the champion)")
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=None,
        help="train-split images calibrating int8 (default: params.yaml)",
    )
    parser.add_argument("--latency-images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = state_paths()
    configure_environment(paths)
    params = load_params()
    registry = open_registry(paths, params)
    version = args.version or registry.alias_version("champion")
    if version is None:
        raise SystemExit(f"no champion in {paths.home}: run `make run` or pass --version")
    model = registry.load_model(version).eval()
    catalogue = params.data.catalogue_path()
    with tempfile.TemporaryDirectory(prefix="vitrine-bench-compress-") as tmp:
        split = load_split(registry, version, model, catalogue, Path(tmp) / "index")
        rng = np.random.default_rng(params.train.seed)
        n_cal = args.calibration_images or params.registry.calibration_images
        picked = sorted(rng.choice(len(split[5]), size=min(n_cal, len(split[5])), replace=False))
        calibration = np.stack(
            [load_uint8(split[5][i], model.image_size, model.in_channels) for i in picked]
        )
        variants = build_variants(model, calibration, Path(tmp))
        ks = params.evaluation.retrieval_k
        quality = {
            name: measure_quality(m, split, params.data.categories, ks)
            for name, (m, _) in variants.items()
        }
        latency = measure_latencies(variants, split[0], args.latency_images, args.rounds)
        sizes = {name: path.stat().st_size for name, (_, path) in variants.items()}
    result = {
        "version": version,
        "backbone": model.backbone_name,
        "baseline": BASELINE,
        "n_test": len(split[1]),
        "n_catalogue": len(split[4]),
        "calibration_images": len(picked),
        "threads": torch.get_num_threads(),
        "served_int8": "int8 (onnxruntime static QDQ)",
        "variants": {
            name: row(
                quality[name],
                quality[BASELINE],
                latency[name],
                latency[BASELINE],
                sizes[name],
                sizes[BASELINE],
            )
            for name in variants
        },
    }
    print(
        f"model version {version} ({model.backbone_name}), {result['n_test']} test images vs "
        f"{result['n_catalogue']} catalogue embeddings, {result['threads']} threads"
    )
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
