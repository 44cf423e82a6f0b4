"""What a GPU buys: training images/s and the /search compute path's latency, per device.

Runs on every device this machine has (the CPU always, CUDA where torch sees it) and prints
each figure with its ratio to the CPU's, measured in the same run (the baseline). On a machine
without CUDA it measures the CPU and says so, ready for a GPU host.

- train: images/s of training steps (forward, loss, backward, optimiser) of `--backbone` at
  `--image-size`, batches of `--batch-size`, the precision the training stage would pick on
  that device (components/model/training.py precision_for: bf16/fp16 autocast on CUDA,
  fp16 with a gradient scaler where bf16 is missing) and pinned-memory copies, after warm-up.
- search: one shopper photo's compute path as a service worker runs it (bentos/predictor.py
  predict_batch: the model on the photo, on the device; then CatalogueIndex.search of the
  embedding over `--products` catalogue vectors), p50 and p95 over `--queries` photos; and the
  same at the micro-batcher's largest batch for the device (serving.max_batch_size /
  serving.cuda_batch_size), per photo. HTTP and decoding are the same on every device and are
  not part of it (benchmarks/serve.py measures them).

    python benchmarks/gpu.py --json bench-gpu.json
    python benchmarks/gpu.py --backbone efficientnet_lite0 --image-size 224 --json bench-gpu-lite0.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bentos.loader import serving_example
from components.config import load_params
from components.model.device import resolve_device
from components.model.models import build_model, compile_for_inference, serving_layout
from components.model.training import precision_for
from components.model.transforms import to_tensor
from components.retrieval.index import CatalogueIndex
from components.serving.runtime import set_call_threads


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1000)


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(resolve_device("cuda", key="benchmark"))
    return found


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(args, params, device: torch.device) -> dict:
    """Training images/s on `device`, as the training stage computes."""
    model = build_model(params, 10, pretrained=False).to(device).train()
    precision = precision_for(params, device)
    scaler = torch.amp.GradScaler("cuda") if precision.grad_scaler else None
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    channels = 3 if params.backbone == "efficientnet_lite0" else 1
    shape = (args.batch_size, args.image_size, args.image_size, channels)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = torch.from_numpy(rng.integers(0, 10, args.batch_size))
    cpu_batch = to_tensor(pixels)

    def step() -> None:
        x, y = cpu_batch, labels
        if device.type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
        autocast = (
            torch.autocast(device.type, dtype=precision.dtype)
            if precision.dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits, _ = model(x)
            loss = F.cross_entropy(logits.float(), y)
        optimiser.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        else:
            loss.backward()
            optimiser.step()

    for _ in range(args.warmup):
        step()
    synchronise(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronise(device)
    seconds = time.perf_counter() - start
    dtype = str(precision.dtype).removeprefix("torch.") if precision.dtype else "float32"
    return {"images_per_s": args.steps * args.batch_size / seconds, "precision": dtype}


def search_latency(args, params, device: torch.device, serving) -> dict:
    """p50/p95 ms of model + index search for one photo, and per photo in a full batch: the
    service's threads per call (serving.threads) and, on the CPU, its compiled model."""
    set_call_threads(serving.threads)
    model = serving_layout(build_model(params, 10, pretrained=False).eval()).to(device)
    if device.type == "cpu":
        model = compile_for_inference(model, serving_example(model))
    rng = np.random.default_rng(1)
    dim = model.embedding_dim
    vectors = rng.standard_normal((args.products, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    products = pd.DataFrame(
        {"product_id": [f"p{i}" for i in range(args.products)], "category": "Bag"}
    )
    index = CatalogueIndex.build(vectors, products)
    channels = 3 if params.backbone == "efficientnet_lite0" else 1
    shape = (args.queries, args.image_size, args.image_size, channels)
    photos = rng.integers(0, 256, shape, dtype=np.uint8)

    def answer(batch: np.ndarray) -> None:
        x = to_tensor(batch)
        if device.type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
        with torch.inference_mode():
            _, emb = model(x)
            emb = emb.float().cpu().numpy()
        index.search_batch(emb, 10)

    for photo in photos[: args.warmup]:
        answer(photo[None])
    single = []
    for photo in photos:
        start = time.perf_counter()
        answer(photo[None])
        single.append(time.perf_counter() - start)
    batch = serving.cuda_batch_size if device.type == "cuda" else serving.max_batch_size
    batch = min(batch, args.queries)
    answer(photos[:batch])
    start = time.perf_counter()
    rounds = max(1, args.queries // batch)
    for r in range(rounds):
        answer(photos[r * batch : (r + 1) * batch])
    per_photo = (time.perf_counter() - start) / (rounds * batch)
    return {
        "p50_ms": percentile_ms(single, 50),
        "p95_ms": percentile_ms(single, 95),
        "batch": batch,
        "batched_ms_per_photo": per_photo * 1000,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", choices=["cnn", "efficientnet_lite0"], default=None)
    p.add_argument("--image-size", type=int, default=None, help="default: train.image_size")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--products", type=int, default=70_000, help="catalogue vectors searched")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    all_params = load_params()
    overrides = {"backbone": args.backbone} if args.backbone else {}
    if args.image_size:
        overrides["image_size"] = args.image_size
    params = all_params.train.model_copy(update=overrides)
    args.image_size, args.batch_size = params.image_size, args.batch_size or params.batch_size
    print(
        f"{params.backbone} at {args.image_size} px, train batches of {args.batch_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; devices: "
        f"{', '.join(d.type for d in devices())}"
        + ("" if torch.cuda.is_available() else " (no CUDA here: the CPU figures only)")
    )
    results = {}
    for device in devices():  # training first: the service's one thread a call comes after
        results[device.type] = {"train": train_rate(args, params, device)}
    for device in devices():
        results[device.type]["search"] = search_latency(args, params, device, all_params.serving)
    cpu = results["cpu"]
    for name, row in results.items():
        t, s = row["train"], row["search"]
        row["ratio_to_cpu"] = {
            "train_images_per_s": t["images_per_s"] / cpu["train"]["images_per_s"],
            "search_p50": s["p50_ms"] / cpu["search"]["p50_ms"],
            "batched_ms_per_photo": s["batched_ms_per_photo"]
            / cpu["search"]["batched_ms_per_photo"],
        }
        r = row["ratio_to_cpu"]
        print(
            f"{name:>4}: train {t['images_per_s']:9.1f} images/s ({t['precision']}, "
            f"{r['train_images_per_s']:.2f}x cpu) | search p50 {s['p50_ms']:.2f} ms, p95 "
            f"{s['p95_ms']:.2f} ms ({r['search_p50']:.2f}x cpu's time) | batch of {s['batch']}: "
            f"{s['batched_ms_per_photo']:.3f} ms a photo ({r['batched_ms_per_photo']:.2f}x)"
        )
    out = {
        "backbone": params.backbone,
        "image_size": args.image_size,
        "train_batch_size": args.batch_size,
        "products": args.products,
        "cuda_available": torch.cuda.is_available(),
        "baseline": "cpu",
        "devices": results,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
