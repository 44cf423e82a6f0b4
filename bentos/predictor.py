"""Inference without BentoML: a photo's bytes → (class probabilities, embedding) from the
bundle's model, through the sha256 LRU cache and one adaptive micro-batcher shared by every
request (components/serving/runtime.py). bentos/service.py only routes HTTP to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from components.serving.runtime import LRUCache, MicroBatcher
from components.serving.uploads import UploadLimits, compute_image_stats, decode_upload, sha256_hex


@dataclass(frozen=True)
class Analysis:
    """What the model says of one photo, and what the request log keeps of it."""

    pixels: np.ndarray  # the model's input, preprocessed like training
    probs: np.ndarray
    embedding: np.ndarray
    category: str
    confidence: float
    stats: dict[str, float]  # size, brightness, contrast: the drift monitor's columns
    image: Any = None  # the decoded upload (PIL), for what needs its own pixels (colour tags)

    def logged(self) -> dict:
        """The request log's fields (components/serving/logs.py RequestLog.write)."""
        return {
            "embedding": self.embedding,
            "category": self.category,
            "confidence": self.confidence,
            "stats": self.stats,
        }

    def top(self, categories: list[str], n: int = 3) -> list[dict]:
        return [
            {"category": categories[i], "probability": round(float(self.probs[i]), 6)}
            for i in np.argsort(-self.probs)[:n]
        ]


class Predictor:
    def __init__(
        self,
        categories: list[str],
        limits: UploadLimits,
        cache_size: int,
        max_batch_size: int,
        metrics: Any = None,  # components.serving.metrics.ServingMetrics: batch sizes, cache
    ):
        self.categories, self.limits, self.metrics = categories, limits, metrics
        Image.MAX_IMAGE_PIXELS = limits.max_pixels  # PIL's decompression-bomb guard
        self.cache = LRUCache(cache_size)
        self.text_cache = LRUCache(1024)  # query text -> MiniLM embedding
        on_batch = metrics.batch_size.observe if metrics else None
        self.batcher = MicroBatcher(
            self.predict_batch, max_batch_size=max_batch_size, on_batch=on_batch
        )

    def close(self) -> None:
        self.batcher.close()

    @staticmethod
    def predict_batch(items: list[tuple[Any, np.ndarray]]) -> list[tuple]:
        """One model call per bundle present in the batch (two only during a swap)."""
        import torch

        from components.model.device import device_of
        from components.model.transforms import to_tensor

        results: list[tuple] = [()] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (bundle, _) in enumerate(items):
            groups.setdefault(id(bundle), []).append(i)
        for rows in groups.values():
            model = items[rows[0]][0].model
            x, device = to_tensor(np.stack([items[i][1] for i in rows])), device_of(model)
            if device.type != "cpu":  # serving.device cuda: copied through pinned memory
                x = x.pin_memory().to(device, non_blocking=True)
            with torch.inference_mode():
                logits, emb = model(x)
                probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
                emb = emb.float().cpu()
            for j, i in enumerate(rows):
                results[i] = (probs[j], emb[j].numpy())
        return results

    def analyse(self, bundle: Any, data: bytes, content_type: str | None) -> Analysis:
        """Decode, preprocess like training, then (probs, embedding) from cache or the batcher."""
        from components.model.transforms import model_input

        image = decode_upload(data, content_type, self.limits)
        pixels = model_input(image, bundle.model)
        key = (bundle.version, sha256_hex(data))
        cached = self.cache.get(key)
        if self.metrics:
            self.metrics.cache.labels("hit" if cached is not None else "miss").inc()
        if cached is None:
            cached = self.batcher.run((bundle, pixels), timeout=30)
            self.cache.put(key, cached)
        probs, embedding = cached
        best = int(np.argmax(probs))
        return Analysis(
            pixels,
            probs,
            embedding,
            self.categories[best],
            float(probs[best]),
            compute_image_stats(image, pixels),
            image,
        )

    def detect(
        self, bundle: Any, data: bytes, content_type: str | None, max_items: int, nms_iou: float
    ) -> tuple[Image.Image, list]:
        """(the decoded photo, its detected items best first: components/model/detection.py
        Item) by the bundle's detector and the bundle's own classifier on each crop; a 409 for
        a version without a detector."""
        from components.model.detection import detect_items
        from components.model.detector import detector_of

        detector = detector_of(bundle.torch_model)  # the version's fp32 model carries it
        if detector is None:
            from bentos.http import ApiError

            raise ApiError(
                409,
                f"model version {bundle.version} has no detector (trained with detect.enabled "
                "false, or before detection existed): retrain to detect",
            )
        image = decode_upload(data, content_type, self.limits)
        return image, detect_items(detector, bundle.model, image, max_items, nms_iou)

    def encode_text(self, query: str) -> np.ndarray:
        """The query's MiniLM embedding (components/retrieval/text.py), cached by its text."""
        from components.retrieval import text as textsearch

        key = query.lower()
        vector = self.text_cache.get(key)
        if vector is None:
            vector = textsearch.encode_texts([query])[0]
            self.text_cache.put(key, vector)
        return vector

    def explain(self, bundle: Any, data: bytes, content_type: str | None) -> Any:
        """Grad-CAM of the photo's predicted category (components/model/explain.py), on the
        version's fp32 weights (a compressed variant has no gradients)."""
        from components.model.explain import explain_image

        image = decode_upload(data, content_type, self.limits)
        return explain_image(bundle.torch_model or bundle.model, image, self.categories)
