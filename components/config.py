"""params.yaml as typed pydantic models, plus where vitrine keeps its state.

Nothing runs at import time: call `load_params()` and `state_paths()` explicitly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = PROJECT_ROOT / "params.yaml"

# The headline metrics (components/model/evaluation.py computes them): tagged on every
# registered version and shown by `vitrine status`; the run summary adds SUMMARY_METRICS.
HEADLINE_METRICS = ("accuracy", "macro_f1", "recall_at_1")
SUMMARY_METRICS = (*HEADLINE_METRICS, "recall_at_10", "map_at_10", "latency_ms", "detect_map50")

FASHION_MNIST_CATEGORIES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# Prefect refuses flow-run heartbeats more often than this (its flows.heartbeat_frequency)
HEARTBEAT_FLOOR_SECONDS = 30


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataParams(_Strict):
    source: str = "fashion-mnist"
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")
    catalogue_dir: Path = Path("data/catalogue")
    test_fraction: float = Field(0.15, gt=0, lt=1)
    limit: int | None = Field(None, gt=0)
    seed: int = 0
    categories: list[str] = Field(default_factory=lambda: list(FASHION_MNIST_CATEGORIES))

    def catalogue_path(self, root: Path = PROJECT_ROOT) -> Path:
        """The catalogue folder: `catalogue_dir` as given when absolute, else under `root`."""
        path = Path(self.catalogue_dir)
        return path if path.is_absolute() else root / path


class ValidationParams(_Strict):
    min_width: int = 16
    min_height: int = 16
    max_width: int = 8192
    max_height: int = 8192
    blank_std_max: float = 2.0
    near_duplicate_hash_size: int = Field(16, ge=4, le=32)  # dHash of (n+1)×n pixels: n² bits
    near_duplicate_max_distance: int = Field(0, ge=0, le=1024)
    max_quarantine_share: float = Field(0.2, ge=0, le=1)


class LabelParams(_Strict):
    policy: Literal["drop", "relabel", "keep"] = "drop"
    # below this many training rows the cleaning model is too weak to act on (on 1,275 rows
    # with 20% injected flips it finds them with F1 0.60-0.77, docs/model-quality.md): drop
    # and relabel become a review queue, every row is kept and label_issues.parquet lists the
    # flagged ones with the suggested label
    review_below_rows: int = Field(10_000, ge=0)
    relabel_min_confidence: float = Field(0.9, ge=0, le=1)
    folds: int = Field(5, ge=2)
    # the cleaning model (components/data/labels.py): "early" = one compact CNN trained on
    # every row for early_row_passes / rows epochs (at most early_max_epochs), scored on its
    # own rows before it memorises their noise (3 minutes on 60k rows); "cnn" = the compact
    # CNN out of fold (folds x cnn_epochs: 12 minutes on 60k rows); "mlp" = PCA on pixels +
    # a small MLP, out of fold (seconds); "auto" = early
    model: Literal["auto", "mlp", "cnn", "early"] = "auto"
    pca_components: int = Field(64, ge=2)
    cnn_width: int = Field(32, ge=4)
    cnn_epochs: int = Field(8, ge=1)
    early_row_passes: int = Field(300_000, ge=1)
    early_max_epochs: int = Field(40, ge=1)
    # cleanlab's rule for which rows to flag (cleanlab.filter.find_label_issues `filter_by`)
    filter_by: Literal[
        "both",
        "prune_by_noise_rate",
        "prune_by_class",
        "confident_learning",
        "predicted_neq_given",
        "low_normalized_margin",
        "low_self_confidence",
    ] = "prune_by_noise_rate"


SHOPPER_SHIFTS = (  # components/model/shopper.py renders these (kept here: config is the base)
    "white_background",
    "light_background",
    "textured_background",
    "busy_background",
    "colour_tint",
    "colour_photo",
    "phone",
    "jpeg",
    "blur_noise",
    "occlusion",
    "rotation",
)
ShopperShift = Literal[SHOPPER_SHIFTS]  # type: ignore[valid-type]


class SegmenterParams(_Strict):
    """A learned busy-background mask for canonical preprocessing (components/model/segmenter.py):
    trained by the train stage on training-split products, before the classifier, and carried by
    the model. Off: canonical preprocessing uses the busy_mask heuristic."""

    enabled: bool = False
    budget_seconds: float = Field(480.0, gt=0)  # optimisation seconds (rendering not counted)
    max_steps: int | None = Field(None, ge=1)  # tests shrink this; null = the time budget only
    views: int = Field(16000, ge=32)  # shopper-style renderings of training products
    busy_share: float = Field(0.4, ge=0, le=1)  # of them on clutter, the rest on other settings
    colour_share: float = Field(0.5, ge=0, le=1)  # of them with the product recoloured
    side: int = Field(64, ge=16, le=256)  # the network's input side (px); a multiple of 4

    @field_validator("side")
    @classmethod
    def _side_multiple_of_4(cls, side: int) -> int:
        if side % 4:
            raise ValueError("the segmenter's input side must be a multiple of 4 (64, 32, ...)")
        return side


class TrainParams(_Strict):
    backbone: Literal["cnn", "efficientnet_lite0"] = "cnn"
    # the compact CNN: conv width and number of conv blocks per stage, a 2x2 max-pool between
    # stages, global average pooling after the last (its width = the feature size)
    cnn_widths: list[int] = Field(default_factory=lambda: [32, 64, 128])
    cnn_depths: list[int] = Field(default_factory=lambda: [2, 2, 1])
    image_size: int = Field(28, ge=16)
    embedding_dim: int = Field(128, ge=8)
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.003, gt=0)
    # a pretrained trunk (efficientnet_lite0) fine-tunes at lr × this; its new heads at lr
    pretrained_lr_scale: float = Field(0.1, gt=0, le=1)
    weight_decay: float = Field(0.0005, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    patience: int = Field(3, ge=1)
    class_weights: Literal["auto", "none"] = "auto"
    imbalance_ratio: float = Field(1.5, ge=1)
    augment: bool = True
    # shopper's photo: `canonical` finds the product against its background and brings it to the
    # catalogue's look (components/model/transforms.py); `plain` pads and resizes only
    preprocess: Literal["plain", "canonical"] = "plain"
    # share of training images swapped for a shopper-style rendering (components/model/shopper.py)
    shopper_share: float = Field(0.0, ge=0, le=1)
    # how often each shift is drawn for a row's view, relative (a shift not named: 1; 0: never)
    shopper_weights: dict[ShopperShift, float] = Field(default_factory=dict)
    # canonical only: a learned product mask on busy backgrounds instead of busy_mask
    segmenter: SegmenterParams = Field(default_factory=SegmenterParams)
    # side in pixels of a square cutout augmentation; 0 = off (8 measured 0.9388 vs 0.9399, docs/defaults.md)
    cutout: int = Field(0, ge=0)
    # progressive resizing: sides (px) of the earlier epochs, e.g. [20, 24]. The epochs split
    # evenly into one phase per side plus a last (longest) phase at image_size; [] = off
    progressive_sizes: list[int] = Field(default_factory=list)
    # auto: bf16 autocast where the CPU has bf16 instructions (AVX512-BF16 / AMX), else fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True  # NHWC activations while training (oneDNN's fast conv layout)
    # auto: the GPU where torch sees CUDA, else the CPU; cuda without one fails the stage
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    max_batches_per_epoch: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_depth_per_stage(self) -> TrainParams:
        widths, depths = self.cnn_widths, self.cnn_depths
        if not widths or len(widths) != len(depths):
            raise ValueError(f"cnn_widths {widths} and cnn_depths {depths}: one of each per stage")
        if min(widths) < 4 or min(depths) < 1:
            raise ValueError(f"cnn_widths must be >= 4 and cnn_depths >= 1, got {widths}, {depths}")
        smallest = min([self.image_size, *self.progressive_sizes])
        if self.backbone == "cnn" and 2 ** (len(widths) - 1) > smallest:
            raise ValueError(
                f"cnn_widths: {len(widths)} stages pool a {smallest} px input to nothing"
            )
        return self

    @field_validator("shopper_weights")
    @classmethod
    def _weights_not_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"shopper weights must be >= 0, got {weights}")
        if weights and all(weights.get(s, 1.0) == 0 for s in SHOPPER_SHIFTS):
            raise ValueError("shopper weights: at least one shift must have a weight above 0")
        return weights

    @field_validator("progressive_sizes")
    @classmethod
    def _sizes_at_least_8(cls, sizes: list[int]) -> list[int]:
        if any(side < 8 for side in sizes):
            raise ValueError(f"progressive sizes must be at least 8 px, got {sizes}")
        return sizes


class ShopperEvaluationParams(_Strict):
    """The shopper-style evaluation set: test products rendered under each shift."""

    images: int = Field(1000, ge=10)  # test products (seeded, stratified), each under every shift
    seed: int = 0
    shifts: list[ShopperShift] = Field(default_factory=lambda: list(SHOPPER_SHIFTS))


class EvaluationParams(_Strict):
    retrieval_k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    latency_images: int = Field(256, ge=1)
    shopper: ShopperEvaluationParams = Field(default_factory=ShopperEvaluationParams)


class ShopperGatePolicy(_Strict):
    """Per-shift floors (one number for every shift, or {shift: floor}) and the largest drop
    versus the champion, absolute, on the same shopper-style set."""

    min_accuracy: float | dict[ShopperShift, float] = 0.0
    min_recall_at_1: float | dict[ShopperShift, float] = 0.0
    max_regression: dict[Literal["accuracy", "macro_f1", "recall_at_1"], float] = Field(
        default_factory=lambda: {"accuracy": 0.02, "recall_at_1": 0.02}
    )

    def floor(self, metric: str, shift: str) -> float:
        bound = self.min_accuracy if metric == "accuracy" else self.min_recall_at_1
        return bound.get(shift, 0.0) if isinstance(bound, dict) else bound


class DetectGatePolicy(_Strict):
    """The detector's floor (mAP@0.5 on the held-out scenes) and the largest drop versus the
    champion's detector on the same scenes, absolute."""

    min_map50: float = Field(0.0, ge=0, le=1)
    max_regression: float = Field(0.03, ge=0, le=1)


TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql")


class RegistryParams(_Strict):
    model_name: str = "vitrine-product"
    # the MLflow tracking server every command, flow and the service use (docs/scale.md);
    # null = the state folder's SQLite. VITRINE_TRACKING_URI overrides it.
    tracking_uri: str | None = None
    # compressed variants built, measured and stored with every registered version (compress.py)
    variants: list[Literal["onnx", "int8"]] = Field(default_factory=lambda: ["onnx", "int8"])
    calibration_images: int = Field(512, ge=1)  # train-split images that calibrate int8

    @field_validator("tracking_uri")
    @classmethod
    def _known_scheme(cls, uri: str | None) -> str | None:
        scheme = (uri or "").split(":", 1)[0].split("+", 1)[0]
        if uri is not None and scheme not in TRACKING_SCHEMES:
            raise ValueError(
                f"expected a URI starting {', '.join(s + ':' for s in TRACKING_SCHEMES)}"
            )
        return uri


class GatePolicy(_Strict):
    min_accuracy: float = 0.85
    min_recall_at_1: float = 0.80
    max_regression: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 0.005, "macro_f1": 0.005, "recall_at_1": 0.01}
    )
    max_latency_ms: float = 25.0
    significance_alpha: float = Field(0.05, gt=0, lt=1)
    max_compression_loss: float = Field(0.005, ge=0)  # a variant's accuracy drop vs its fp32
    shopper: ShopperGatePolicy = Field(default_factory=ShopperGatePolicy)
    detect: DetectGatePolicy = Field(default_factory=DetectGatePolicy)


ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class PromotionParams(_Strict):
    bootstrap_without_approval: bool = True
    require_ab: bool = False  # promote only after a finished online A/B period (serving.ab)
    # the name vitrine's own processes (retrain, gate, promote) act under: never an owner
    loop_account: str = "vitrine"
    # the model owners: only an `approved_by` naming one of them counts (their MLflow accounts:
    # `vitrine users add NAME --owner`); declared after loop_account, which it is checked against
    owners: list[str] = Field(default_factory=list)

    @field_validator("loop_account")
    @classmethod
    def _loop_account_name(cls, value: str) -> str:
        if not ACCOUNT_NAME.fullmatch(value):
            raise ValueError("an account name: letters, digits and . _ @ - (at most 64)")
        return value

    @field_validator("owners")
    @classmethod
    def _owner_names(cls, owners: list[str], info: ValidationInfo) -> list[str]:
        bad = [name for name in owners if not ACCOUNT_NAME.fullmatch(str(name))]
        if bad:
            raise ValueError(
                f"{bad[0]!r} is not an account name (letters, digits and . _ @ -, at most 64)"
            )
        if len(set(owners)) != len(owners):
            raise ValueError("each owner once")
        loop = info.data.get("loop_account")
        if loop in owners:
            raise ValueError(
                f"{loop!r} is the loop's own account (loop_account): it cannot approve"
            )
        return owners


class TextSearchParams(_Strict):
    enabled: bool = True
    ridge_alpha: float = Field(0.01, gt=0)
    max_titles: int = Field(1000, ge=0)  # distinct catalogue titles encoded for training


class ABParams(_Strict):
    mode: Literal["off", "route", "shadow"] = "off"
    challenger_share: float = Field(0.1, ge=0, le=1)  # route: share of client ids sent to it
    min_requests: int = Field(500, ge=1)  # per arm, for the A/B period to count as finished
    min_hours: float = Field(0.0, ge=0)  # and at least this long since the first request
    max_error_rate_increase: float = Field(0.01, ge=0)  # challenger minus champion, absolute
    max_p95_latency_ratio: float = Field(1.5, gt=0)  # challenger p95 / champion p95


class ServingParams(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    sample_rate: float = Field(1.0, ge=0, le=1)  # share of requests written to the request log
    cache_size: int = Field(1024, ge=0)  # LRU entries keyed by (version, image sha256)
    max_upload_bytes: int = Field(10 << 20, ge=1024)
    max_pixels: int = Field(36_000_000, ge=1)
    max_batch_size: int = Field(64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU where torch sees CUDA
    cuda_batch_size: int = Field(256, ge=1)  # the micro-batcher's max_batch_size on a GPU
    threads: int = Field(1, ge=0)  # torch / FAISS / ONNX Runtime threads per call; 0 = every core
    workers: int = Field(0, ge=0)  # BentoML worker processes (`vitrine serve`); 0 = one per core
    poll_seconds: float = Field(30.0, ge=0)  # 0 = no polling of the champion alias
    variant: Literal["fp32", "onnx", "int8"] = "fp32"  # an accepted compressed variant, or fp32
    ab: ABParams = Field(default_factory=ABParams)


# Evidently stattest names; p-value tests (ks, chisquare, …) drift below threshold
ColumnMethod = Literal[
    "wasserstein",
    "jensenshannon",
    "psi",
    "kl_div",
    "hellinger",
    "ks",
    "chisquare",
    "z",
    "energy_distance",
    "cramer_von_mises",
    "anderson",
    "mannw",
    "t_test",
]


class ColumnDriftParams(_Strict):
    method: ColumnMethod = "ks"  # a p-value test: valid at any window size, any model
    threshold: float = Field(0.001, gt=0)


class EmbeddingDriftParams(_Strict):
    method: Literal["mmd", "model", "distance", "ratio"] = "mmd"  # Evidently EmbeddingsDrift
    threshold: float = Field(0.01, gt=0)  # drift when the method's score is above it
    pca_components: int | None = Field(None, ge=2)


# request-log fields compared with the reference
MONITORED_COLUMNS = (
    "category",
    "confidence",
    "brightness",
    "contrast",
    "width",
    "height",
    "aspect",
)


def _default_columns() -> dict[str, ColumnDriftParams]:
    columns = {"category": ColumnDriftParams(method="chisquare", threshold=0.001)}
    for name in MONITORED_COLUMNS[1:]:
        columns[name] = ColumnDriftParams()
    return columns


class DetectedItemsDriftParams(_Strict):
    """Drift of what /detect finds (items per photo, the share of the photo they cover) against
    the champion's detector on its held-out scenes (monitoring/detect.py)."""

    min_samples: int = Field(50, ge=10)  # fewer /detect requests in the window: not compared
    method: ColumnMethod = "ks"
    threshold: float = Field(0.001, gt=0)


class MonitoringParams(_Strict):
    """Drift of the service's request log against the champion's reference (monitoring/)."""

    window_hours: float = Field(24.0, gt=0)  # `vitrine drift` without --since
    min_samples: int = Field(200, ge=10)  # fewer requests in the window: no verdict (exit 2)
    reference_rows: int = Field(2000, ge=10)  # seeded sample of the reference compared against
    max_current_rows: int = Field(2000, ge=10)  # seeded sample of a larger window
    seed: int = 0
    embeddings: EmbeddingDriftParams = Field(default_factory=EmbeddingDriftParams)
    columns: dict[str, ColumnDriftParams] = Field(default_factory=_default_columns)
    sample_images: int = Field(8, ge=0, le=64)  # catalogue look-alikes of the most drifted slice
    tsne_points: int = Field(150, ge=50)  # per side, for the report's embedding picture only
    detected_items: DetectedItemsDriftParams = Field(default_factory=DetectedItemsDriftParams)

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, ColumnDriftParams]) -> dict[str, ColumnDriftParams]:
        unknown = sorted(set(value) - set(MONITORED_COLUMNS))
        if unknown:
            raise ValueError(f"unknown monitored columns {unknown}: use {list(MONITORED_COLUMNS)}")
        return value


class ScheduleParams(_Strict):
    """One Prefect deployment's schedule (`vitrine deploy`)."""

    cron: str
    active: bool = True  # false: the deployment exists with its schedule paused

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"cron {value!r} needs 5 fields: minute hour day month weekday")
        return value


class MonitorScheduleParams(ScheduleParams):
    retrain_on_drift: bool = True  # the online update: a drift verdict triggers a retrain run
    # drift persists until a retrained model is approved: no second drift-triggered retrain
    # within this many hours of the last one (nor while any retrain is in flight)
    retrain_cooldown_hours: float = Field(12.0, ge=0)
    # a retrain still "Running" this long after it started is taken as crashed (its worker
    # died and nothing will finish it): it no longer blocks a drift-triggered retrain
    retrain_stale_hours: float = Field(24.0, gt=0)


class SchedulesParams(_Strict):
    """Prefect deployments on the local server; a `process` work pool runs their flow runs."""

    api_url: str = (
        "http://127.0.0.1:4200/api"  # `vitrine ui`'s Prefect server; PREFECT_API_URL wins
    )
    work_pool: str = "vitrine"  # `vitrine worker` executes the pool's runs as subprocesses
    timezone: str = "UTC"
    retrain: ScheduleParams = Field(default_factory=lambda: ScheduleParams(cron="0 2 * * *"))
    monitor: MonitorScheduleParams = Field(
        default_factory=lambda: MonitorScheduleParams(cron="0 * * * *")
    )
    promote: ScheduleParams = Field(default_factory=lambda: ScheduleParams(cron="*/10 * * * *"))
    refresh: ScheduleParams = Field(default_factory=lambda: ScheduleParams(cron="15 * * * *"))
    # a run of these deployments whose host went silent this long (no heartbeat, no end) is
    # marked Crashed by the server (`vitrine deploy`'s automation, docs/scale.md); its runs
    # beat every heartbeat_seconds, so at least 60: one missed beat at Prefect's 30 s floor
    dead_host_seconds: int = Field(120, ge=60)

    @property
    def heartbeat_seconds(self) -> int:
        """How often a deployment run reports it is alive: three beats per dead_host_seconds,
        never under Prefect's floor (flows.heartbeat_frequency >= 30)."""
        return max(HEARTBEAT_FLOOR_SECONDS, self.dead_host_seconds // 3)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r} (IANA name, e.g. UTC)") from exc
        return value


class RefreshParams(_Strict):
    """`vitrine index refresh`: the champion's index brought up to date with the catalogue
    source without retraining (components/stages/refresh.py)."""

    # a refresh that would delist more than this share of the index at once is refused
    max_removed_share: float = Field(default=0.2, ge=0.0, le=1.0)


class DetectParams(_Strict):
    """Several products in one photo (issue 18, docs/detection.md): the detector the detector
    stage trains on scenes composed from training rows, its evaluation on scenes of the frozen
    test split, and what POST /detect answers."""

    enabled: bool = True  # false: versions carry no detector and /detect answers 409
    budget_seconds: float = Field(180.0, gt=0)  # its optimisation time (scene composition apart)
    max_steps: int | None = Field(None, ge=1)  # tests shrink this; null = the time budget only
    scenes: int = Field(6000, ge=8)  # composed training scenes (1-5 training products each)
    side: int = Field(192, ge=64, le=512)  # the network's input side (px); a multiple of 16
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64])
    min_score: float = Field(0.3, gt=0, lt=1)  # a box counts from this heat score
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_items: int = Field(10, ge=1, le=50)  # at most this many items per photo
    eval_scenes: int = Field(300, ge=1)  # held-out scenes of 2-5 test products (evaluate, gate)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # training; auto: bf16 where the CPU has it
    seed: int = 0

    @field_validator("side")
    @classmethod
    def _side_multiple_of_16(cls, side: int) -> int:
        if side % 16:
            raise ValueError("the detector's input side must be a multiple of 16 (192, 256, ...)")
        return side

    @field_validator("widths")
    @classmethod
    def _three_widths(cls, widths: list[int]) -> list[int]:
        if len(widths) != 3 or min(widths) < 4:
            raise ValueError("three conv widths of at least 4, e.g. [16, 32, 64]")
        return widths


class DistributedParams(_Strict):
    """Catalogue-scale work (the index's embeddings and colour tags, the drift reference)
    mapped over shards with Prefect's Dask task runner (flows/retrain.py, docs/scale.md)."""

    enabled: bool = False  # false: one process, as on the embedded default
    scheduler_address: str | None = None  # tcp://HOST:8786 of a running cluster; null = local
    local_workers: int = Field(2, ge=1)  # worker processes of the local cluster
    shard_rows: int = Field(10000, ge=1)  # catalogue rows per task


class Params(_Strict):
    data: DataParams = Field(default_factory=DataParams)
    validation: ValidationParams = Field(default_factory=ValidationParams)
    labels: LabelParams = Field(default_factory=LabelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    gate: GatePolicy = Field(default_factory=GatePolicy)
    promotion: PromotionParams = Field(default_factory=PromotionParams)
    text_search: TextSearchParams = Field(default_factory=TextSearchParams)
    serving: ServingParams = Field(default_factory=ServingParams)
    monitoring: MonitoringParams = Field(default_factory=MonitoringParams)
    schedules: SchedulesParams = Field(default_factory=SchedulesParams)
    refresh: RefreshParams = Field(default_factory=RefreshParams)
    detect: DetectParams = Field(default_factory=DetectParams)
    distributed: DistributedParams = Field(default_factory=DistributedParams)


class ConfigError(ValueError):
    """params.yaml cannot be used: one line naming the file, the key, the value and what is
    allowed (the CLI prints it and exits 2)."""


def load_params(path: Path | str | None = None) -> Params:
    """Read and validate params.yaml (default: the project's own, or $VITRINE_PARAMS)."""
    path = Path(path or os.environ.get("VITRINE_PARAMS") or DEFAULT_PARAMS)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections (data:, train:, ...), got {raw!r:.60}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_error(path, exc)) from None


def describe_error(path: Path, exc: ValidationError) -> str:
    """The first validation error as one line: `file: key = value: what is allowed` (and how
    many more there are)."""
    errors = exc.errors()
    first = errors[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        problem = f"{key}: unknown key"
    elif first["type"] == "missing":
        problem = f"{key}: required"
    else:
        message = first["msg"].removeprefix("Value error, ")
        problem = f"{key} = {first.get('input')!r:.80}: {message}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {problem}{more}"


@dataclass(frozen=True)
class StatePaths:
    """Every piece of state lives under one folder (default .vitrine/, $VITRINE_HOME overrides)."""

    home: Path

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow.db"

    @property
    def embedded_tracking_uri(self) -> str:
        """The state folder's own MLflow store (the default; `vitrine ui`'s default backend)."""
        return f"sqlite:///{self.mlflow_db}"

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def dvc_remote(self) -> Path:
        return self.home / "dvc-remote"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def evidently_workspace(self) -> Path:
        """Evidently's workspace: every drift report's snapshot, served by `evidently ui`."""
        return self.home / "evidently"

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    @property
    def audit_log(self) -> Path:
        return self.home / "audit.jsonl"

    @property
    def product_images(self) -> Path:
        """Images of products an index refresh added or changed, named by content digest
        (components/retrieval/revisions.py); the catalogue folder holds the others."""
        return self.home / "product-images"

    @property
    def auth(self) -> Path:
        """The MLflow server's accounts (`vitrine ui`): its config, user database and the admin
        credentials (admin.json, mode 0600)."""
        return self.home / "auth"


def tracking_uri(paths: StatePaths, params: Params) -> str:
    """The MLflow store vitrine uses: VITRINE_TRACKING_URI, else params registry.tracking_uri,
    else the state folder's SQLite (docs/scale.md)."""
    return (
        os.environ.get("VITRINE_TRACKING_URI")
        or params.registry.tracking_uri
        or paths.embedded_tracking_uri
    )


def state_paths(home: Path | str | None = None) -> StatePaths:
    home = Path(home or os.environ.get("VITRINE_HOME") or PROJECT_ROOT / ".vitrine")
    return StatePaths(home=home.resolve())


TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
}


def configure_environment(paths: StatePaths) -> None:
    """Telemetry off and tool homes under the state folder. Call once at a process's start."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    paths.prefect_home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(paths.prefect_home))
    # Without a server each process starts a temporary Prefect API; its first start migrates a
    # fresh SQLite database, which takes longer than Prefect's 20 s default on a busy 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # MLflow's "Downloading artifacts" bars would interleave with vitrine's own output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # ... as would transformers' "Loading weights" bar when the text model loads (it reads
    # huggingface_hub's switch once, at import)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
