"""Serving helpers with no BentoML import: upload decoding and checks, the sha256 LRU cache,
the micro-batcher for model calls, the sampled request log and the Prometheus metrics.

bentos/service.py wires these together; each is unit-tested here without a server.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import queue
import random
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # PIL's JPEG plugin also opens phones' MPO files
IMAGE_TYPES = {
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/bmp",
    "image/x-bmp",
    "image/x-ms-bmp",
}
SNIFFED_TYPES = {"", "application/octet-stream"}  # no declared type: the bytes decide


class BadImage(ValueError):
    """An upload the service refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 36_000_000  # e.g. 6000×6000; more is refused before decoding


def decode_upload(data: bytes, content_type: str | None, limits: UploadLimits) -> Image.Image:
    """Decoded first frame of an uploaded JPEG / PNG / WebP / GIF / BMP, or BadImage.

    Refuses: empty (400), over max_bytes (413), a declared non-image content type (415), bytes
    that are not one of the formats (415), over max_pixels or a decompression bomb (413), a
    truncated or corrupt file (400). Colour modes are left to transforms.image_to_uint8.
    """
    if not data:
        raise BadImage("empty upload: send an image file")
    if len(data) > limits.max_bytes:
        raise BadImage(
            f"upload of {len(data)} bytes exceeds the {limits.max_bytes}-byte limit", 413
        )
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in IMAGE_TYPES | SNIFFED_TYPES:
        raise BadImage(
            f"unsupported content type {declared!r}: send an image (JPEG, PNG, WebP, GIF or BMP)",
            415,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImage(f"too many pixels: {error}", 413) from error
        except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
            raise BadImage("not a decodable JPEG, PNG, WebP, GIF or BMP image", 415) from error
        width, height = image.size
        if width * height > limits.max_pixels:
            raise BadImage(f"too many pixels: {width}×{height} exceeds {limits.max_pixels}", 413)
        if width < 1 or height < 1:
            raise BadImage(f"image has no pixels ({width}×{height})")
        try:
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImage(f"too many pixels: {error}", 413) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise BadImage(f"truncated or corrupt {image.format} image: {error}") from error
    return image


_thread_state = threading.local()
CALL_THREADS = [0]  # threads per torch / FAISS call in the service; 0 = leave the defaults


def set_call_threads(threads: int) -> None:
    """The service's threads per model / FAISS call (params serving.threads)."""
    import faiss
    import torch

    CALL_THREADS[0] = threads
    torch.set_num_threads(threads)  # torch's count is process-wide
    faiss.omp_set_num_threads(threads)  # OpenMP's is per calling thread: see in_call_thread


def in_call_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a worker thread, with FAISS's OpenMP thread count set for it.

    OpenMP keeps the count per calling thread: a worker thread that never set it starts a
    team of every core on its first FAISS search, and that team's idle workers spin at a
    barrier after each search, taking a core from the event loop (seen: 4.6 s of CPU in one
    spinning thread while 500 requests were served)."""
    threads = CALL_THREADS[0]
    if threads and getattr(_thread_state, "threads", None) != threads:
        import faiss

        faiss.omp_set_num_threads(threads)
        _thread_state.threads = threads
    return fn(*args, **kwargs)


def settle_heap() -> None:
    """Put what is alive now (the loaded bundles: model, index records, text model) out of the
    garbage collector's reach. A full collection walks every tracked object: with the
    70,000-product catalogue loaded one took 418 ms, stalling every request in flight (the p99
    at concurrency 16). Called after each load; its own collection is the one pause a swap costs.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compute_image_stats(image: Image.Image, pixels: np.ndarray) -> dict[str, float]:
    """Original size and aspect (width / height) plus brightness and contrast (mean and std of
    the preprocessed pixels, 0..1). The drift reference of every model version is computed with
    this same function (components/reference.py), so served and reference statistics agree."""
    grey = pixels.astype(np.float64).mean(axis=-1) if pixels.ndim == 3 else pixels
    return {
        "width": int(image.size[0]),
        "height": int(image.size[1]),
        "aspect": round(image.size[0] / image.size[1], 4),
        "brightness": round(float(grey.mean() / 255.0), 4),
        "contrast": round(float(grey.std() / 255.0), 4),
    }


def parse_k(value: Any, low: int = 1, high: int = 100) -> int:
    """An integer k in [low, high] from a form / query / JSON value, else ValueError."""
    try:
        k = int(str(value).strip())
    except ValueError:
        raise ValueError(f"k must be an integer in {low}..{high}, got {value!r}") from None
    if not low <= k <= high:
        raise ValueError(f"k must be an integer in {low}..{high}, got {k}")
    return k


class LRUCache:
    """A thread-safe LRU map with hit / miss counts."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class MicroBatcher:
    """Concurrent submissions → one call of `run_batch(items) -> results` per batch.

    A worker thread takes whatever is queued (up to max_batch_size), waiting at most
    max_wait_ms for more after the first item: with max_wait_ms=0 a lone request runs at once
    and requests arriving while a batch runs form the next batch (adaptive under load).
    """

    def __init__(
        self,
        run_batch: Callable[[list], list],
        max_batch_size: int = 64,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run_batch, self.max_batch_size = run_batch, max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="vitrine-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _collect(self, first: tuple) -> tuple[list[tuple], bool]:
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                remaining = deadline - time.monotonic()
                entry = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if entry is None:
                return batch, True
            batch.append(entry)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                results = self.run_batch([item for item, _ in batch])
                for (_, future), result in zip(batch, results, strict=True):
                    future.set_result(result)
            except Exception as error:  # every caller of the batch sees the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)


class RequestLog:
    """Sampled JSON-lines request log: <folder>/requests-YYYYMMDD.jsonl, no raw images."""

    def __init__(self, folder: Path, sample_rate: float = 1.0, seed: int | None = None):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in 0..1, got {sample_rate}")
        self.folder, self.sample_rate = Path(folder), sample_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def path_for(self, when: datetime) -> Path:
        return self.folder / f"requests-{when:%Y%m%d}.jsonl"

    def write(
        self,
        endpoint: str,
        model_version: str,
        embedding: np.ndarray,
        category: str,
        confidence: float,
        stats: dict[str, float],
    ) -> bool:
        """Append one record if sampled; True when written."""
        with self._lock:
            if self.sample_rate < 1.0 and self._rng.random() >= self.sample_rate:
                return False
            now = datetime.now(UTC)
            record = {
                "timestamp": now.isoformat(),
                "model_version": model_version,
                "endpoint": endpoint,
                "category": category,
                "confidence": round(float(confidence), 6),
                **stats,
                "embedding": [round(float(v), 6) for v in np.asarray(embedding).ravel()],
            }
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.path_for(now).open("a") as out:
                out.write(json.dumps(record) + "\n")
            return True


def read_request_log(folder: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(Path(folder).glob("requests-*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServingMetrics:
    """vitrine_* metrics in a registry of their own (BentoML keeps its default one)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created gauges: half the exposition, no information
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "vitrine_requests",
            "Requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "vitrine_request_errors",
            "4xx / 5xx answers by endpoint and class",
            ["endpoint", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "vitrine_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vitrine_model_batch_size",
            "Images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.cache = Counter(
            "vitrine_cache_lookups", "sha256 cache lookups by result", ["result"], registry=r
        )
        self.reloads = Counter(
            "vitrine_reloads", "Champion reload attempts by outcome", ["outcome"], registry=r
        )
        self.arm_requests = Counter(
            "vitrine_ab_requests",
            "A/B requests by arm, version, status",
            ["arm", "version", "status"],
            registry=r,
        )
        self.arm_latency = Histogram(
            "vitrine_ab_latency_seconds",
            "A/B latency by arm",
            ["arm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "vitrine_model_info", "1 for the model version being served", ["version"], registry=r
        )

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, "client" if status < 500 else "server").inc()

    def observe_arm(self, arm: str, version: str, status: int, seconds: float) -> None:
        self.arm_requests.labels(arm, version, str(status)).inc()
        self.arm_latency.labels(arm).observe(seconds)

    def set_model_version(self, version: str, previous: str | None = None) -> None:
        if previous is not None:  # clear() is not supported in multi-process mode
            self.model_info.labels(previous).set(0)
        self.model_info.labels(version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


ENDPOINTS = (
    "/",
    "/classify",
    "/tags",
    "/search",
    "/search_text",
    "/recommend",
    "/embed",
    "/explain",
    "/healthz",
    "/readyz",
    "/metrics",
    "/admin/reload",
)


def endpoint_label(path: str) -> str:
    """A bounded metrics label for a request path (product ids are not labels)."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/products/"):
        return "/products/{id}/image" if path.endswith("/image") else "/products/{id}"
    return "other"
