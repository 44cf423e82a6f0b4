"""Keeping the served model current: the champion's `Bundle` (and, with A/B on, the
challenger's), loaded from the MLflow registry off the request path and swapped in one
assignment. A failed load keeps the old bundle and is reported in /readyz."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from components.serving.runtime import settle_heap

log = logging.getLogger("vitrine.service")
# The text space is N x 384 float32 in each worker: up to this, about 1.3M products. Above,
# the version serves image search only and /search_text answers 409 saying why.
TEXT_SPACE_MAX_BYTES = 2_000_000_000


@dataclass(frozen=True)
class Bundle:
    """One registered version: its model and the index it built. Never mutated after load."""

    version: str
    model: Any  # components.model.models.VitrineNet, eval mode
    index: Any  # components.retrieval.index.CatalogueIndex
    loaded_at: str
    load_seconds: float
    text: np.ndarray | None = None  # products' positions in the MiniLM text space (index rows)
    torch_model: Any = None  # the version's fp32 weights (gradients for /explain)
    variant: str = "fp32"  # what `model` is: fp32, or a compressed variant of the same version
    variant_note: str | None = None  # why a requested variant is not the one served
    index_revision: int = 0  # 0: the index of the training run; N: the N-th refresh
    index_built_at: str | None = None
    text_note: str | None = None  # why a version with a text projection serves no text search

    def text_space(self) -> np.ndarray:
        """The products in the text space; a 409 when the version has none."""
        if self.text is None:
            from bentos.http import ApiError

            why = self.text_note or (
                "was registered without text search (text_search.enabled was false)"
            )
            raise ApiError(409, f"model version {self.version} {why}")
        return self.text


def keep_store_images(index_dir: Path, store: Path) -> None:
    """Copy a refreshed revision's product images (images/, named by content digest) into
    the state folder's store, where /products/{id}/image finds them; present ones are kept."""
    from components.retrieval.revisions import STORE_DIR, store_image

    folder = index_dir / STORE_DIR
    if folder.is_dir():
        for image in folder.iterdir():
            store_image(image, store, image.name)


def serving_example(model: Any) -> Any:
    """One blank photo as the service feeds it to `model` (the compiled model's trace input)."""
    from PIL import Image

    from components.model.transforms import model_input, to_tensor

    blank = Image.new("L", (model.image_size, model.image_size))
    return to_tensor(model_input(blank, model)[None])


class ModelLoader:
    """The champion (and challenger) bundles of one service process."""

    def __init__(
        self, paths: Any, params: Any, metrics: Any, variant: str, ab_mode: str, device: Any = None
    ):
        import torch

        self.paths, self.params, self.metrics = paths, params, metrics
        self.variant, self.ab_mode = variant, ab_mode
        self.device = device or torch.device("cpu")  # serving.device, resolved
        self.bundle: Bundle | None = None
        self.challenger: Bundle | None = None
        self.last_error: str | None = None
        self.refused: str | None = None  # why the champion alias is not followed, if it is not
        self.challenger_error: str | None = None
        self.last_check_at: str | None = None
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._registry = None

    def start(self, poll_seconds: float) -> None:
        """Load the champion (and challenger), then poll the registry every `poll_seconds`."""
        self.reload_both()
        self.start_polling(poll_seconds)

    def reload_both(self) -> dict:
        outcome = self.reload()
        self.reload_challenger()
        return outcome

    def start_polling(self, seconds: float) -> None:
        if seconds > 0:
            threading.Thread(
                target=self._poll, args=(seconds,), name="vitrine-poll", daemon=True
            ).start()

    def stop(self) -> None:
        self._stop.set()

    def _open_registry(self) -> Any:
        if self._registry is None:
            from components.release.registry import open_registry

            # The poll retries every poll_seconds: MLflow's own HTTP retries (7, backing off
            # for minutes) would hold the first load, and the worker's start, on a dead store.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

            self._registry = open_registry(self.paths, self.params)
        return self._registry

    def load_index(
        self, registry: Any, version: str, revision: dict
    ) -> tuple[Any, Any, str | None]:
        """(index, text space, why there is no text space) of `revision`
        (Registry.index_revision) of `version`'s index; the store images of a refreshed
        revision go to the state folder's product images."""
        from components.retrieval.index import CatalogueIndex

        text, note = None, None
        with tempfile.TemporaryDirectory(prefix=f"vitrine-index-v{version}-") as tmp:
            index_dir = registry.download_index(version, revision, Path(tmp))
            index = CatalogueIndex.load(index_dir)
            keep_store_images(index_dir, self.paths.product_images)
            if (index_dir / "text_projection.npz").exists():
                from components.retrieval import text as textsearch

                need = len(index) * textsearch.TEXT_DIM * 4
                if need > TEXT_SPACE_MAX_BYTES:  # N x 384 floats in every worker
                    note = (
                        f"serves no text search: its {len(index):,} products would take "
                        f"{need / 1e9:.1f} GB of text space per worker (limit "
                        f"{TEXT_SPACE_MAX_BYTES / 1e9:.0f} GB; docs/scale.md)"
                    )
                    log.warning("version %s %s", version, note)
                else:
                    projection = textsearch.TextProjection.load(index_dir / "text_projection.npz")
                    text = projection.project(index.embeddings)
                    textsearch.load_text_encoder()  # the first text query should not pay
        if len(index) == 0:
            raise ValueError(f"version {version} has an empty index")
        return index, text, note

    def load_bundle(self, registry: Any, version: str) -> Bundle:
        from components.model.models import compile_for_inference, serving_layout

        start = time.perf_counter()
        model = serving_layout(registry.load_model(version).eval())
        revision = registry.index_revision(version)
        index, text, text_note = self.load_index(registry, version, revision)
        with_dim = getattr(model, "embedding_dim", index.dim)
        if with_dim != index.dim:
            raise ValueError(f"model embeds in {with_dim} dims but its index holds {index.dim}")
        from components.model.compress import load_served_model

        if self.device.type == "cuda":  # the variants and the MKLDNN compile are for CPUs
            served, variant = model.to(self.device), "fp32"
            note = (
                None if self.variant == "fp32" else f"{self.variant} is a CPU variant: fp32 on cuda"
            )
        else:
            served, variant, note = load_served_model(registry, version, model, self.variant)
        if variant == "fp32" and self.device.type == "cpu":  # compiled (not for /explain)
            served = compile_for_inference(model, serving_example(model))
        loaded_at = datetime.now(UTC).isoformat()
        return Bundle(
            version,
            served,
            index,
            loaded_at,
            round(time.perf_counter() - start, 3),
            text,
            torch_model=model,
            variant=variant,
            variant_note=note,
            index_revision=revision["revision"],
            index_built_at=revision["built_at"],
            text_note=text_note,
        )

    def refresh_index(self, registry: Any, bundle: Bundle) -> Bundle | None:
        """The served version with its newest index revision, or None when it is current:
        the same model objects, the new index and text space (an index refresh)."""
        revision = registry.index_revision(bundle.version)
        if revision["revision"] == bundle.index_revision:
            return None
        start = time.perf_counter()
        index, text, text_note = self.load_index(registry, bundle.version, revision)
        return replace(
            bundle,
            index=index,
            text=text,
            text_note=text_note,
            loaded_at=datetime.now(UTC).isoformat(),
            load_seconds=round(time.perf_counter() - start, 3),
            index_revision=revision["revision"],
            index_built_at=revision["built_at"],
        )

    def reload(self) -> dict:
        """Load the version the `champion` alias names, if it is not the one being served.

        Runs off the request path (poll thread, or a threadpool for /admin/reload); requests
        keep using the old bundle until the single assignment below. A failure keeps the old
        bundle and is reported in /readyz.
        """
        with self._reload_lock:
            old = self.bundle.version if self.bundle else None
            self.last_check_at = datetime.now(UTC).isoformat()
            try:
                registry = self._open_registry()
                target, self.refused = registry.served_champion()  # audited promotions only
                self.metrics.set_refused(self.refused and registry.alias_version("champion"))
                if self.refused:
                    log.warning("champion alias refused: %s", self.refused)
                if target is None:
                    raise LookupError("no version has the `champion` alias yet")
                if target == old:
                    bundle = self.refresh_index(registry, self.bundle)
                    if bundle is None:
                        self.last_error = None
                        return {"reloaded": False, "model_version": old, "previous_version": old}
                else:
                    bundle = self.load_bundle(registry, target)
            except Exception as error:
                self.last_error = f"{type(error).__name__}: {str(error)[:500]}"
                self.metrics.reloads.labels("failed").inc()
                log.exception("loading the champion failed; still serving %s", old)
                return {"reloaded": False, "model_version": old, "error": self.last_error}
            self.bundle, self.last_error = bundle, None  # the atomic swap
            settle_heap()
            self.metrics.reloads.labels("loaded").inc()
            self.metrics.set_model_version(bundle.version, old)
            log.info(
                "serving model version %s index revision %s (was %s)",
                bundle.version,
                bundle.index_revision,
                old,
            )
            return {
                "reloaded": True,
                "model_version": bundle.version,
                "index_revision": bundle.index_revision,
                "previous_version": old,
            }

    def reload_challenger(self) -> None:
        """A/B on: keep the `challenger` alias's version loaded beside the champion (or none)."""
        if self.ab_mode == "off" or self.bundle is None:
            self.challenger = None
            return
        try:
            target = self._open_registry().alias_version("challenger")
            if target in (None, self.bundle.version):
                self.challenger, self.challenger_error = None, None
            elif refusal := self.challenger_refusal(target):
                self.challenger, self.challenger_error = None, refusal
            elif self.challenger is None or self.challenger.version != target:
                self.challenger = self.load_bundle(self._open_registry(), target)
                self.challenger_error = None
                settle_heap()
                log.info("A/B (%s): challenger version %s loaded", self.ab_mode, target)
        except Exception as error:
            self.challenger_error = f"{type(error).__name__}: {str(error)[:500]}"
            log.exception("loading the challenger failed; A/B paused")

    def challenger_refusal(self, version: str) -> str | None:
        """Why shoppers may not see `version` under A/B: only a version that passed the gate
        is routed or shadowed, wherever its `challenger` alias came from."""
        from components.release.gate import read_gate_passed

        passed = read_gate_passed(self._open_registry().version_info(version)["tags"])
        if passed is True:
            return None
        state = "failed the gate" if passed is False else "has no gate verdict"
        return f"the challenger alias names version {version}, which {state}: A/B paused"

    def readiness(self) -> tuple[int, dict]:
        """GET /readyz: 200 once a champion is loaded, with what is served and the last errors."""
        bundle, challenger = self.bundle, self.challenger
        body = {
            "ready": bundle is not None,
            "model_version": bundle.version if bundle else None,
            "index_size": len(bundle.index) if bundle else 0,
            "index_kind": bundle.index.kind if bundle else None,
            "index_revision": bundle.index_revision if bundle else None,
            "index_built_at": bundle.index_built_at if bundle else None,
            "loaded_at": bundle.loaded_at if bundle else None,
            "load_seconds": bundle.load_seconds if bundle else None,
            "last_reload_error": self.last_error,
            "champion_alias_refused": self.refused,
            "last_check_at": self.last_check_at,
            "text_search": bool(bundle and bundle.text is not None),
            "text_search_note": bundle.text_note if bundle else None,
            "variant": bundle.variant if bundle else None,
            "variant_requested": self.variant,
            "variant_note": bundle.variant_note if bundle else None,
            "device": self.device.type,
            "ab": {
                "mode": self.ab_mode,
                "challenger_version": challenger.version if challenger else None,
                "challenger_error": self.challenger_error,
            },
        }
        return (200 if bundle else 503), body

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.reload()
            self.reload_challenger()
