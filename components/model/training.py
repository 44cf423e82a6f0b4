"""Train a VitrineNet on uint8 images: seeded, checkpointed every epoch, resumable.

Images come in as uint8 N×H×W×C (the catalogue's stored size; C=1 for Fashion-MNIST). The
model resizes / repeats channels itself (components.model.models), so a 28 px grayscale
catalogue trains either backbone. Determinism: the same seed, data and params give the
same weights, also across a crash and resume (the checkpoint carries the model,
optimizer, scheduler, the shuffling/augmentation generator and torch's global RNG).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from components.config import TrainParams
from components.model.device import resolve_device
from components.model.models import VitrineNet, build_model
from components.model.transforms import augment, to_tensor
from components.threads import limited_threads

CHECKPOINT = "last.pt"
Optimisation = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, nn.Module]


@dataclass
class TrainResult:
    model: VitrineNet  # best weights (by validation accuracy), eval mode
    history: list[dict]  # per epoch: epoch, size, train_loss, val_loss, val_accuracy, seconds, lr
    best_epoch: int
    stopped_early: bool
    resumed_from_epoch: int | None  # the last finished epoch found in the checkpoint
    class_weights: list[float] | None
    train_seconds: float  # wall time of this call
    val_indices: np.ndarray  # rows of the input held out for validation


def count_threads() -> int:
    """Torch threads for training: $OMP_NUM_THREADS when set, else every core."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1


def compute_class_weights(
    labels: np.ndarray, num_classes: int, params: TrainParams
) -> np.ndarray | None:
    """Inverse-frequency weights (mean 1 over present classes) when labels are imbalanced.

    None when params.class_weights == 'none' or max/min class count <= imbalance_ratio.
    Classes absent from `labels` get weight 0 and do not count towards the ratio.
    """
    if params.class_weights == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    if counts[present].max() / counts[present].min() <= params.imbalance_ratio:
        return None
    weights = np.zeros(num_classes)
    weights[present] = 1.0 / counts[present]
    return weights / weights[present].mean()


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified validation split (per class, round(n·fraction), ≥1)."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        k = round(len(rows) * fraction)
        k = min(max(k, 1), len(rows) - 1) if len(rows) > 1 else 0
        picked.append(rng.permutation(rows)[:k])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def predict_batches(
    model: nn.Module, images: np.ndarray, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities N×C, embeddings N×D) in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    device = first.device if first is not None else torch.device("cpu")  # the model's own
    probs, embeddings = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits, emb = model(to_tensor(images[start : start + batch_size]).to(device))
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            embeddings.append(emb.float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(probs), np.concatenate(embeddings)


def fingerprint_run(
    images: np.ndarray, labels: np.ndarray, params: TrainParams, num_classes: int, pretrained: bool
) -> str:
    """A hash of params, data and model setup: a checkpoint resumes only a matching run."""
    digest = hashlib.sha256()
    digest.update(params.model_dump_json().encode())
    digest.update(json.dumps([list(images.shape), num_classes, pretrained]).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def save_checkpoint(state: dict, checkpoint_dir: Path) -> None:
    """Write checkpoint_dir/last.pt atomically (tmp file + os.replace)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / f".{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, checkpoint_dir / CHECKPOINT)


def load_checkpoint(checkpoint_dir: Path, fingerprint: str) -> dict | None:
    """The checkpoint when it exists, reads and matches `fingerprint`; otherwise None."""
    path = checkpoint_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file: start fresh rather than fail the run
        return None
    return state if state.get("fingerprint") == fingerprint else None


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of training's forward pass (None: fp32), and whether the loss needs
    a gradient scaler (fp16's narrow range)."""

    dtype: torch.dtype | None
    grad_scaler: bool = False


def precision_for(
    params: TrainParams, device: torch.device, cuda_bf16: bool | None = None
) -> Precision:
    """CPU: bf16 where the CPU has bf16 instructions (`use_bf16`). CUDA: with precision auto,
    bf16 where the GPU supports it (Ampere on), else fp16 with a gradient scaler; fp32 is
    fp32 everywhere."""
    if device.type != "cuda":
        return Precision(torch.bfloat16 if use_bf16(params) else None)
    if params.precision == "fp32":
        return Precision(None)
    if cuda_bf16 is None:
        cuda_bf16 = torch.cuda.is_bf16_supported()
    if params.precision == "bf16" or cuda_bf16:
        return Precision(torch.bfloat16)
    return Precision(torch.float16, grad_scaler=True)


@dataclass
class Runtime:
    """Where and how a training run computes: the device, the autocast precision and fp16's
    gradient scaler (kept across epochs)."""

    device: torch.device
    precision: Precision
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def for_params(cls, params: TrainParams) -> Runtime:
        device = resolve_device(params.device)
        precision = precision_for(params, device)
        scaler = torch.amp.GradScaler("cuda") if precision.grad_scaler else None
        return cls(device, precision, scaler)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU batch on the device: through pinned memory, copied while the GPU works."""
        if self.device.type == "cpu":
            return x
        return x.pin_memory().to(self.device, non_blocking=True)


def use_bf16(params: TrainParams) -> bool:
    """bf16 autocast: asked for, or `auto` on a CPU with bf16 instructions. Measured on a
    2-core AVX512-BF16 CPU, width-32 CNN, batch 128: 1.22 ms/image fp32, 0.66 bf16, 0.52 bf16
    + channels-last (and 1.01 fp32 + channels-last)."""
    if params.precision == "auto":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return params.precision == "bf16"


def epoch_size(params: TrainParams, epoch: int) -> int:
    """Input side of `epoch` under progressive resizing: the epochs split evenly into one
    phase per side of params.progressive_sizes and a last phase at image_size, which gets
    the remainder (10 epochs, sizes [20, 24]: 3 at 20 px, 3 at 24, 4 at 28)."""
    sizes = [*params.progressive_sizes, params.image_size]
    from_end = (params.epochs - 1 - epoch) * len(sizes) // params.epochs
    return sizes[len(sizes) - 1 - from_end]


@contextlib.contextmanager
def input_side(model: nn.Module, size: int) -> Iterator[None]:
    """Let the model take `size`-pixel batches as they are (it resizes others to its own)."""
    own = model.image_size
    model.image_size = size
    try:
        yield
    finally:
        model.image_size = own


def train_one_epoch(
    model: nn.Module,
    images: np.ndarray,
    labels: torch.Tensor,
    params: TrainParams,
    steps: int,
    opt: Optimisation,
    generator: torch.Generator,
    bar: tqdm,
    size: int,
    views: np.ndarray | None = None,
    runtime: Runtime | None = None,
) -> float:
    """One pass over `steps` shuffled batches at `size` px; returns the mean training loss.

    With `views` (a shopper-style rendering of each row, components/model/shopper.py), each
    image of a batch is swapped for its view with probability params.shopper_share."""
    optimizer, scheduler, criterion = opt
    runtime = runtime or Runtime.for_params(params)
    dtype = runtime.precision.dtype
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total = 0.0
    for step in range(steps):
        rows = order[step * params.batch_size : (step + 1) * params.batch_size].numpy()
        batch = images[rows]
        if views is not None and params.shopper_share > 0:
            swap = (torch.rand(len(rows), generator=generator) < params.shopper_share).numpy()
            batch = np.where(swap[:, None, None, None], views[rows], batch)
        x = to_tensor(batch)
        if params.augment:  # on the CPU, with the run's generator (reproducible anywhere)
            x = augment(x, generator, cutout=params.cutout)
        x = runtime.batch(x)
        if x.shape[-1] != size:  # progressive resizing: antialiased, unlike the model's own
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        autocast = torch.autocast(runtime.device.type, dtype=dtype, enabled=dtype is not None)
        with input_side(model, size), autocast:
            logits, _ = model(x)
        loss = criterion(logits.float(), runtime.batch(labels[rows]))
        optimizer.zero_grad(set_to_none=True)
        if runtime.scaler is not None:  # fp16: scale the loss, unscale before the step
            runtime.scaler.scale(loss).backward()
            runtime.scaler.step(optimizer)
            runtime.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total += loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{total / (step + 1):.4f}", refresh=False)
    return total / max(steps, 1)


def evaluate_split(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) on held-out rows."""
    probs, _ = predict_batches(model, images)
    picked = probs[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    return loss, float((probs.argmax(1) == labels).mean())


def build_optimisation(
    model: nn.Module,
    params: TrainParams,
    steps: int,
    weights: np.ndarray | None,
    device: torch.device | None = None,
) -> Optimisation:
    """AdamW + OneCycleLR over epochs·steps + (weighted, label-smoothed) cross-entropy. A
    pretrained trunk (efficientnet_lite0) learns at params.lr × params.pretrained_lr_scale,
    the new heads at params.lr: fine-tuning keeps what ImageNet taught the trunk."""
    if params.backbone == "cnn":
        groups = [{"params": list(model.parameters()), "lr": params.lr}]
    else:
        trunk = list(model.trunk.parameters())
        in_trunk = {id(p) for p in trunk}
        heads = [p for p in model.parameters() if id(p) not in in_trunk]
        groups = [
            {"params": trunk, "lr": params.lr * params.pretrained_lr_scale},
            {"params": heads, "lr": params.lr},
        ]
    optimizer = torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=params.epochs * steps
    )
    weight = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=params.label_smoothing)
    return optimizer, scheduler, criterion


def restore_run(
    state: dict | None, model: nn.Module, opt: Optimisation, generator: torch.Generator
) -> dict:
    """Load a matching checkpoint into model/optimizer/scheduler/RNGs; return the run record."""
    if state is None:
        return {
            "epoch": -1,
            "best_state": None,
            "best_accuracy": -1.0,
            "best_epoch": -1,
            "bad_epochs": 0,
            "stopped_early": False,
            "history": [],
        }
    model.load_state_dict(state["model"])
    opt[0].load_state_dict(state["optimizer"])
    opt[1].load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["run"]


def fit_epoch(
    model: nn.Module,
    epoch: int,
    train: tuple[np.ndarray, torch.Tensor],
    val: tuple[np.ndarray, np.ndarray],
    params: TrainParams,
    steps: int,
    opt: Optimisation,
    generator: torch.Generator,
    progress: bool | str,
    views: np.ndarray | None = None,
    runtime: Runtime | None = None,
) -> dict:
    """Train one epoch (at its progressive size), validate at full size, and return the
    epoch's history record. `progress`: False silent, True a bar per epoch, a string a bar
    labelled with it (e.g. "fold 2/4")."""
    t0 = time.perf_counter()
    size = epoch_size(params, epoch)
    desc = f"{progress} " if isinstance(progress, str) else ""
    desc += f"epoch {epoch + 1}/{params.epochs}" + (
        f" {size}px" if params.progressive_sizes else ""
    )
    with tqdm(total=steps, desc=desc, unit="batch", disable=not progress) as bar:
        train_loss = train_one_epoch(
            model, *train, params, steps, opt, generator, bar, size, views, runtime
        )
        val_loss, val_acc = evaluate_split(model, *val)
        bar.set_postfix(loss=f"{train_loss:.4f}", val_acc=f"{val_acc:.4f}")
    return {
        "epoch": epoch,
        "size": size,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "seconds": time.perf_counter() - t0,
        "lr": opt[1].get_last_lr()[-1],  # the heads' (a pretrained trunk: × pretrained_lr_scale)
    }


def snapshot_run(
    fingerprint: str, model: nn.Module, opt: Optimisation, generator: torch.Generator, run: dict
) -> dict:
    """Everything a resume needs to continue bit-for-bit."""
    return {
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": opt[0].state_dict(),
        "scheduler": opt[1].state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "run": run,
    }


def train_model(
    images: np.ndarray,
    labels: np.ndarray,
    params: TrainParams,
    num_classes: int,
    checkpoint_dir: Path,
    *,
    progress: bool | str = True,
    pretrained: bool = True,
    on_epoch_end: Callable[[dict], None] | None = None,
    views: np.ndarray | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train with a stratified validation split, early stopping and per-epoch checkpoints
    (a matching checkpoint is resumed unless `resume` is False).

    `on_epoch_end(record)` is called after each epoch's checkpoint is written (e.g. to log
    metrics); an exception from it interrupts the run like a crash would. `views`: one
    shopper-style rendering per row, same shape as `images` (see train_one_epoch).
    """
    if views is not None and views.shape != images.shape:
        raise ValueError(f"views {views.shape} must match images {images.shape}")
    with limited_threads(count_threads()):
        return _train_model(
            images,
            labels,
            params,
            num_classes,
            checkpoint_dir,
            progress,
            pretrained,
            on_epoch_end,
            views,
            resume,
        )


def _train_model(
    images: np.ndarray,
    labels: np.ndarray,
    params: TrainParams,
    num_classes: int,
    checkpoint_dir: Path,
    progress: bool | str,
    pretrained: bool,
    on_epoch_end: Callable[[dict], None] | None,
    views: np.ndarray | None,
    resume: bool,
) -> TrainResult:
    started = time.perf_counter()
    labels, checkpoint_dir = np.asarray(labels, dtype=np.int64), Path(checkpoint_dir)
    fingerprint = fingerprint_run(images, labels, params, num_classes, pretrained)
    if views is not None:
        fingerprint = hashlib.sha256(fingerprint.encode() + views.tobytes()).hexdigest()
    val_idx = split_validation(labels, params.val_fraction, params.seed)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    x_train, y_train = images[train_mask], torch.from_numpy(labels[train_mask])
    train_views = None if views is None else views[train_mask]
    weights = compute_class_weights(labels[train_mask], num_classes, params)

    runtime = Runtime.for_params(params)  # before any work: a missing GPU fails at once
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    model = build_model(params, num_classes, pretrained=pretrained).to(runtime.device)
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps = math.ceil(len(x_train) / params.batch_size)
    steps = min(steps, params.max_batches_per_epoch or steps)
    opt = build_optimisation(model, params, steps, weights, runtime.device)
    found = load_checkpoint(checkpoint_dir, fingerprint) if resume else None
    run = restore_run(found, model, opt, generator)
    resumed_from = None if run["epoch"] < 0 else run["epoch"]

    for epoch in range(run["epoch"] + 1, params.epochs):
        if run["stopped_early"]:
            break
        record = fit_epoch(
            model,
            epoch,
            (x_train, y_train),
            (images[val_idx], labels[val_idx]),
            params,
            steps,
            opt,
            generator,
            progress,
            train_views,
            runtime,
        )
        final_phase = record["size"] == params.image_size
        update_run(run, record, model, params.patience, params.epochs - 1, final_phase)
        save_checkpoint(snapshot_run(fingerprint, model, opt, generator, run), checkpoint_dir)
        if on_epoch_end is not None:
            on_epoch_end(record)

    if run["best_state"] is not None:
        model.load_state_dict(run["best_state"])
    return TrainResult(
        # exported as usual: on the CPU, in the default layout
        model=model.cpu().to(memory_format=torch.contiguous_format).eval(),
        history=list(run["history"]),
        best_epoch=run["best_epoch"],
        stopped_early=run["stopped_early"],
        resumed_from_epoch=resumed_from,
        class_weights=None if weights is None else [float(w) for w in weights],
        train_seconds=time.perf_counter() - started,
        val_indices=val_idx,
    )


def update_run(
    run: dict,
    record: dict,
    model: nn.Module,
    patience: int,
    last_epoch: int,
    final_phase: bool = True,
) -> None:
    """Append the epoch record; keep the best weights; decide early stopping (which counts
    only epochs of the final, full-size phase of progressive resizing)."""
    run["epoch"] = record["epoch"]
    run["history"].append(record)
    if record["val_accuracy"] > run["best_accuracy"]:
        run["best_accuracy"] = record["val_accuracy"]
        run["best_epoch"] = record["epoch"]
        run["best_state"] = copy.deepcopy(model.state_dict())
        run["bad_epochs"] = 0
    elif final_phase:
        run["bad_epochs"] += 1
        run["stopped_early"] = run["bad_epochs"] >= patience and record["epoch"] < last_epoch
