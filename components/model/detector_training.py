"""Training the product detector (components/model/detector.py) on scenes composed from the
TRAINING rows (components/model/scenes.py), within a time budget: the train stage's side of
issue 18. Kept apart from the detector so the service does not ship the scene composer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from components.model import detector as det
from components.model.scenes import compose_scenes
from components.model.training import use_bf16


@dataclass(frozen=True)
class DetectorSettings:
    budget_seconds: float = 240.0  # training time (scene composition not included)
    max_steps: int | None = None  # tests shrink this
    scenes: int = 8000  # composed training scenes
    side: int = 192  # the network's input side (px)
    widths: tuple[int, int, int] = (16, 32, 64)
    batch_size: int = 32
    lr: float = 3e-3
    min_score: float = 0.3  # a box is an item from this heat score
    bf16: bool = False  # bf16 autocast + channels-last (a CPU with bf16 instructions)

    @classmethod
    def of(cls, params) -> DetectorSettings:
        """From params.yaml's `detect` section (components/config.py DetectParams)."""
        return cls(
            budget_seconds=params.budget_seconds,
            max_steps=params.max_steps,
            scenes=params.scenes,
            side=params.side,
            widths=tuple(params.widths),
            min_score=params.min_score,
            bf16=use_bf16(params),  # detect.precision, read as training reads train.precision
        )


MAX_PRODUCTS = 20000  # training rows scenes are composed from (a seeded sample above)
MAX_PRODUCT_SIDE = 192  # px: a product is at most half a 512 x 384 scene's shorter side


def scene_products(paths: list[Path], labels: list[int], seed: int) -> tuple[list, list[int]]:
    """(images, labels) scenes are composed from: a seeded sample of at most MAX_PRODUCTS of the
    given rows, each decoded and reduced to at most MAX_PRODUCT_SIDE px (a shop's large
    photos would otherwise hold gigabytes for pixels no scene uses)."""
    picks = np.arange(len(paths))
    if len(paths) > MAX_PRODUCTS:
        picks = np.sort(
            np.random.default_rng([seed, 0xDE7]).choice(len(paths), MAX_PRODUCTS, False)
        )
    images = []
    for i in picks:
        with Image.open(paths[i]) as image:
            image.draft("RGB", (MAX_PRODUCT_SIDE, MAX_PRODUCT_SIDE))  # JPEG: decode reduced
            image.thumbnail((MAX_PRODUCT_SIDE, MAX_PRODUCT_SIDE))
            images.append(image.copy())  # any mode: shopper.product_layers converts
    return images, [int(labels[i]) for i in picks]


def training_arrays(
    images: list[Image.Image], labels: list[int], settings: DetectorSettings, seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(letterboxed scenes uint8 N×side×side×3, [heat, size, offset, centre] stacked)."""
    size = (settings.side, settings.side * 3 // 4)
    scenes = compose_scenes(images, labels, settings.scenes, seed, size=size)
    inputs, parts = [], []
    for scene in tqdm(scenes, desc="detector scenes", unit="scene", mininterval=2):
        image, scale = det.letterbox(scene.photo, settings.side)
        inputs.append(image)
        parts.append(det.targets(scene.boxes * scale, settings.side))
    return np.stack(inputs), [np.stack(p) for p in zip(*parts, strict=True)]


def flipped(x: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """The batch mirrored left to right, and its targets with it (a centre's offset across its
    cell becomes one minus itself)."""
    heat, size, offset, centre = targets
    offset = offset.flip(-1).clone()
    offset[:, 0] = torch.where(centre.flip(-1), 1 - offset[:, 0], offset[:, 0])
    return x.flip(-1), [heat.flip(-1), size.flip(-1), offset, centre.flip(-1)]


def train_detector(
    images: list[Image.Image],
    labels: list[int],
    settings: DetectorSettings,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[det.Detector, dict]:
    """A detector trained on `settings.scenes` scenes of `images` (training rows) for
    `settings.budget_seconds` (or max_steps); half the batches mirrored. Returns it and a
    summary (steps, seconds, the last losses)."""
    torch.manual_seed(seed)
    x_all, target_arrays = training_arrays(images, labels, settings, seed)
    targets = [torch.from_numpy(t) for t in target_arrays]
    net = det.TinyDetector(settings.widths)
    layout = torch.channels_last if settings.bf16 else torch.contiguous_format
    net = net.to(memory_format=layout)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16)
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    start, step, losses = time.perf_counter(), 0, []
    limit = settings.max_steps if settings.max_steps is not None else float("inf")
    bar = tqdm(
        total=round(settings.budget_seconds), desc="detector training", unit="s", mininterval=2
    )
    while time.perf_counter() - start < settings.budget_seconds and step < limit:
        bar.n = min(bar.total, round(time.perf_counter() - start))
        if step % 20 == 0 and losses:
            bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
        bar.update(0)
        share = (time.perf_counter() - start) / settings.budget_seconds
        for group in optimiser.param_groups:  # constant, then down to a tenth in the last 30%
            group["lr"] = settings.lr * (1.0 if share < 0.7 else max(0.1, (1 - share) / 0.3))
        idx = rng.choice(len(x_all), settings.batch_size, replace=len(x_all) < settings.batch_size)
        x, batch_targets = det.to_batch(x_all[idx]), [t[idx] for t in targets]
        if rng.random() < 0.5:
            x, batch_targets = flipped(x, batch_targets)
        with autocast:
            outputs = net(x.contiguous(memory_format=layout))
        value = det.loss(tuple(o.float() for o in outputs), *batch_targets)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        losses.append(float(value.detach()))
        step += 1
        if step % 100 == 0:
            log(f"detector step {step}: loss {np.mean(losses[-100:]):.3f}")
    bar.close()
    summary = {
        "steps": step,
        "bf16": settings.bf16,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
    }
    net = net.to(memory_format=torch.contiguous_format)  # served in fp32, one photo at a time
    return det.Detector(net.eval(), settings.side, settings.min_score), summary
