"""Training the learned segmenter (components/model/segmenter.py): shopper-style renderings of
training products with their true masks (shopper.render_with_mask), a share recoloured, and a
fixed optimisation budget. Training-side only: the service loads trained segmenters and never
imports this module (nor the renderer)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from components.config import SegmenterParams
from components.model import shopper
from components.model.segmenter import SIDE, WIDTH, Segmenter, TinySegmenter, to_input, to_tensor


def _as_image(item: Any) -> Image.Image:
    """A catalogue image from a path, a uint8 array (H×W, H×W×1 or H×W×3) or a PIL image."""
    if isinstance(item, (str, Path)):
        with Image.open(item) as image:
            image.load()
            return image.copy()
    if isinstance(item, np.ndarray):
        return Image.fromarray(item.squeeze(-1) if item.ndim == 3 and item.shape[2] == 1 else item)
    return item


def training_views(
    images: Sequence[Any],
    n: int,
    seed: int,
    busy_share: float = 0.4,
    colour_share: float = 0.5,
    side: int = SIDE,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 n×side×side×3 inputs, uint8 n×side×side target shares 0-255): n shopper-style
    renderings of `images` (paths, arrays or PIL images; distinct while n allows), `busy_share`
    of them on clutter, the rest spread over the other settings; `colour_share` of them with
    the product recoloured (shopper.LOOKS: tinted or colour-mapped, half each)."""
    rng = np.random.default_rng(seed)
    others = [s for s in shopper.SETTINGS if s != "busy_background"]
    odds = [busy_share] + [(1 - busy_share) / len(others)] * len(others)
    shifts = rng.choice(["busy_background", *others], size=n, p=odds)
    looks = rng.choice(
        shopper.LOOKS, size=n, p=[1 - colour_share, colour_share / 2, colour_share / 2]
    )
    rows = rng.choice(len(images), size=n, replace=n > len(images))
    x = np.empty((n, side, side, 3), np.uint8)
    y = np.empty((n, side, side), np.uint8)
    for k, (row, shift, look) in enumerate(zip(rows, shifts, looks, strict=True)):
        view = shopper.shift_rng(seed, f"segmenter-{shift}-{look}", int(row) * 7919 + k)
        photo, mask = shopper.render_with_mask(_as_image(images[row]), shift, view, look)
        x[k] = to_input(np.asarray(photo), side)
        share = Image.fromarray(mask.astype(np.float32), "F").resize((side, side), Image.BOX)
        y[k] = np.clip(np.asarray(share) * 255 + 0.5, 0, 255).astype(np.uint8)
    return x, y


def fit(
    x: np.ndarray,
    y: np.ndarray,
    budget_seconds: float,
    seed: int = 0,
    max_steps: int | None = None,
    width: int = WIDTH,
    log: Callable[[str], None] | None = None,
) -> tuple[TinySegmenter, dict]:
    """Adam, batches of 32, random horizontal flips, learning rate cosine over the budget (the
    time or `max_steps`, whichever ends first); soft targets (the product's share of each
    cell), binary cross-entropy. Runs on the caller's torch threads."""
    torch.manual_seed(seed)
    net, rng = TinySegmenter(width), np.random.default_rng(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    start, steps, losses = time.perf_counter(), 0, []
    while (done := time.perf_counter() - start) < budget_seconds and steps < (max_steps or 2**62):
        progress = max(done / budget_seconds, steps / max_steps if max_steps else 0.0)
        for group in optimiser.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + np.cos(np.pi * progress))
        pick = rng.integers(0, len(x), 32)
        xb, yb = to_tensor(x[pick]), torch.from_numpy(y[pick]).float() / 255.0
        if rng.random() < 0.5:
            xb, yb = xb.flip(3), yb.flip(2)
        loss = nn.functional.binary_cross_entropy_with_logits(net(xb), yb)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        steps += 1
        if log and steps % 500 == 0:
            log(f"segmenter step {steps}  {done:.0f} s  loss {np.mean(losses[-500:]):.4f}")
    summary = {
        "steps": steps,
        "samples": steps * 32,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": float(np.mean(losses[-200:])) if losses else float("nan"),
        "weights": sum(p.numel() for p in net.parameters()),
    }
    return net.eval(), summary


def train_segmenter(
    images: Sequence[Any],
    budget_seconds: float,
    seed: int = 0,
    *,
    views: int = 16000,
    busy_share: float = 0.4,
    colour_share: float = 0.5,
    side: int = SIDE,
    width: int = WIDTH,
    max_steps: int | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Segmenter, dict]:
    """A Segmenter trained on `views` renderings of `images` (training-split products only:
    paths, arrays or PIL images) for `budget_seconds` of optimisation (rendering not counted)
    or `max_steps`, whichever ends first; and a summary (steps, loss, render time)."""
    if side % 4:
        raise ValueError(f"segmenter side must be a multiple of 4, got {side}")
    start = time.perf_counter()
    x, y = training_views(images, views, seed, busy_share, colour_share, side)
    render_seconds = round(time.perf_counter() - start, 1)
    net, summary = fit(x, y, budget_seconds, seed, max_steps, width, log)
    segmenter = Segmenter(net, side, width)
    return segmenter, {
        **summary,
        "views": views,
        "render_seconds": render_seconds,
        "digest": segmenter.digest,
    }


def train_from_params(
    images: Sequence[Any],
    settings: SegmenterParams,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> tuple[Segmenter, dict]:
    """`train_segmenter` with params.yaml's train.segmenter settings (the train stage and
    benchmarks/train.py train it alike)."""
    return train_segmenter(
        images,
        settings.budget_seconds,
        seed,
        views=settings.views,
        busy_share=settings.busy_share,
        colour_share=settings.colour_share,
        side=settings.side,
        max_steps=settings.max_steps,
        log=log,
    )
