"""vitrine's BentoML service: the champion model and ITS OWN catalogue index, loaded together.

Every request takes the current `Bundle` (version, model, index) once and uses only it, so a
model can never answer with another version's index; a hot swap builds a new Bundle off the
request path and replaces the reference in one assignment. Model calls from all requests go
through one micro-batcher; repeated photos hit an LRU cache keyed by (version, sha256).

Routes (a FastAPI app mounted on the service): POST /classify /tags /search /embed (image as
multipart field `image`, or a raw image body), POST /recommend (JSON), GET /products/{id}[/image],
POST /admin/reload (token). GET /healthz /readyz /metrics are answered by a middleware, since
BentoML's own probes would otherwise shadow them. Heavy imports happen in `__init__`.
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from components.serving import (
    IMAGE_TYPES,
    SNIFFED_TYPES,
    BadImage,
    LRUCache,
    MicroBatcher,
    RequestLog,
    ServingMetrics,
    UploadLimits,
    compute_image_stats,
    decode_upload,
    endpoint_label,
    parse_k,
    sha256_hex,
)  # fmt: skip

log = logging.getLogger("vitrine.service")
app = FastAPI(title="vitrine", summary="Visual search over the catalogue, from the champion model")
MULTIPART_SLACK = 64 * 1024  # form boundaries and small fields on top of the image itself


@dataclass(frozen=True)
class Bundle:
    """One registered version: its model and the index it built. Never mutated after load."""

    version: str
    model: Any  # components.models.VitrineNet, eval mode
    index: Any  # components.search.CatalogueIndex
    loaded_at: str
    load_seconds: float


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RecommendRequest(BaseModel):
    history: list[str] = Field(min_length=1, max_length=1000)
    k: int = Field(10, ge=1, le=100)
    diversify: bool = False


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@bentoml.service(name="vitrine", workers=1, traffic={"timeout": 60})
@bentoml.asgi_app(app, path="/")
class Vitrine:
    def __init__(self) -> None:
        import torch
        from PIL import Image

        from components.config import configure_environment, load_params, state_paths

        self.paths = state_paths()
        configure_environment(self.paths)
        self.params = load_params()
        self.categories = list(self.params.data.categories)
        catalogue = Path(self.params.data.catalogue_dir)
        self.catalogue_dir = catalogue if catalogue.is_absolute() else _project_root() / catalogue
        self.limits = UploadLimits(max_bytes=int(env_float("VITRINE_MAX_UPLOAD_BYTES", 10 << 20)))
        Image.MAX_IMAGE_PIXELS = self.limits.max_pixels
        torch.set_num_threads(os.cpu_count() or 1)
        self.metrics = ServingMetrics()
        self.cache = LRUCache(int(env_float("VITRINE_CACHE_SIZE", 1024)))
        self.request_log = RequestLog(
            self.paths.home / "requests", env_float("VITRINE_SAMPLE_RATE", 1.0)
        )
        self.batcher = MicroBatcher(
            self._predict_batch, max_batch_size=64, on_batch=self.metrics.batch_size.observe
        )
        self.admin_token = os.environ.get("VITRINE_ADMIN_TOKEN") or ""
        self.bundle: Bundle | None = None
        self.last_error: str | None = None
        self.last_check_at: str | None = None
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._registry = None
        self.reload()
        poll = env_float("VITRINE_POLL_SECONDS", 30.0)
        if poll > 0:
            threading.Thread(
                target=self._poll, args=(poll,), name="vitrine-poll", daemon=True
            ).start()

    # ------------------------------------------------------------------ loading and hot swap
    def _open_registry(self) -> Any:
        if self._registry is None:
            from components.registry import Registry

            self._registry = Registry(
                tracking_uri=self.paths.tracking_uri, artifact_root=self.paths.artifacts,
                model_name=self.params.registry.model_name, audit_log=self.paths.audit_log,
            )  # fmt: skip
        return self._registry

    def _load_bundle(self, registry: Any, version: str) -> Bundle:
        from components.search import CatalogueIndex

        start = time.perf_counter()
        model = registry.load_model(version).eval()
        with tempfile.TemporaryDirectory(prefix=f"vitrine-index-v{version}-") as tmp:
            index = CatalogueIndex.load(registry.download_artifacts(version, "index", Path(tmp)))
        if len(index) == 0:
            raise ValueError(f"version {version} has an empty index")
        with_dim = getattr(model, "embedding_dim", index.dim)
        if with_dim != index.dim:
            raise ValueError(f"model embeds in {with_dim} dims but its index holds {index.dim}")
        loaded_at = datetime.now(UTC).isoformat()
        return Bundle(version, model, index, loaded_at, round(time.perf_counter() - start, 3))

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
                target = registry.alias_version("champion")
                if target is None:
                    raise LookupError("no version has the `champion` alias yet")
                if target == old:
                    self.last_error = None
                    return {"reloaded": False, "model_version": old, "previous_version": old}
                bundle = self._load_bundle(registry, target)
            except Exception as error:
                self.last_error = f"{type(error).__name__}: {str(error)[:500]}"
                self.metrics.reloads.labels("failed").inc()
                log.exception("loading the champion failed; still serving %s", old)
                return {"reloaded": False, "model_version": old, "error": self.last_error}
            self.bundle, self.last_error = bundle, None  # the atomic swap
            self.metrics.reloads.labels("loaded").inc()
            self.metrics.set_model_version(bundle.version, old)
            log.info("serving model version %s (was %s)", bundle.version, old)
            return {"reloaded": True, "model_version": bundle.version, "previous_version": old}

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.reload()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        self.batcher.close()

    # ------------------------------------------------------------------ the model
    def _predict_batch(self, items: list[tuple[Bundle, np.ndarray]]) -> list[tuple]:
        """One model call per bundle present in the batch (two only during a swap)."""
        import torch

        from components.transforms import to_tensor

        results: list[tuple] = [()] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (bundle, _) in enumerate(items):
            groups.setdefault(id(bundle), []).append(i)
        for rows in groups.values():
            model = items[rows[0]][0].model
            with torch.inference_mode():
                logits, emb = model(to_tensor(np.stack([items[i][1] for i in rows])))
                probs = torch.softmax(logits.float(), dim=1).numpy()
            for j, i in enumerate(rows):
                results[i] = (probs[j], emb[j].float().numpy())
        return results

    def current(self) -> Bundle:
        bundle = self.bundle
        if bundle is None:
            raise ApiError(503, f"no model loaded: {self.last_error}")
        return bundle

    def analyse(self, bundle: Bundle, data: bytes, content_type: str | None) -> dict:
        """Decode, preprocess like training, then (probs, embedding) from cache or the batcher."""
        from components.transforms import image_to_uint8

        image = decode_upload(data, content_type, self.limits)
        pixels = image_to_uint8(image, bundle.model.image_size, bundle.model.in_channels)
        key = (bundle.version, sha256_hex(data))
        cached = self.cache.get(key)
        self.metrics.cache.labels("hit" if cached is not None else "miss").inc()
        if cached is None:
            cached = self.batcher.submit((bundle, pixels)).result(timeout=30)
            self.cache.put(key, cached)
        probs, embedding = cached
        best = int(np.argmax(probs))
        return {
            "pixels": pixels, "probs": probs, "embedding": embedding, "best": best,
            "category": self.categories[best], "confidence": float(probs[best]),
            "stats": compute_image_stats(image, pixels),
        }  # fmt: skip

    def log_request(self, endpoint: str, bundle: Bundle, result: dict) -> None:
        self.request_log.write(endpoint, bundle.version, result["embedding"],
                               result["category"], result["confidence"], result["stats"])  # fmt: skip

    def hit_json(self, hit: Any) -> dict:
        return {
            "product_id": hit.product_id, "score": round(float(hit.score), 6),
            "category": hit.category, "group": hit.group, "title": hit.title,
            "image_url": f"/products/{quote(hit.product_id, safe='')}/image",
        }  # fmt: skip

    # ------------------------------------------------------------------ image endpoints
    @app.post("/classify")
    async def classify(self, request: Request) -> dict:
        data, ctype, _ = await read_upload(request)
        bundle = self.current()
        result = await guarded(self.analyse, bundle, data, ctype)
        top = np.argsort(-result["probs"])[:3]
        self.log_request("/classify", bundle, result)
        return {
            "model_version": bundle.version,
            "category": result["category"],
            "confidence": round(result["confidence"], 6),
            "top": [{"category": self.categories[i], "probability": round(float(result["probs"][i]), 6)}
                    for i in top],
        }  # fmt: skip

    @app.post("/tags")
    async def tags(self, request: Request) -> dict:
        from components.search import group_of, shade_of

        data, ctype, _ = await read_upload(request)
        bundle = self.current()
        result = await guarded(self.analyse, bundle, data, ctype)
        hits = await guarded(bundle.index.search, result["embedding"], 10)
        cats = [hit.category for hit in hits]
        majority = max(set(cats), key=cats.count) if cats else None
        group = group_of(result["category"])
        group_score = sum(float(p) for c, p in zip(self.categories, result["probs"], strict=True)
                          if group_of(c) == group)  # fmt: skip
        shade, brightness = shade_of(result["pixels"])
        self.log_request("/tags", bundle, result)
        return {"model_version": bundle.version, "tags": {
            "category": {"value": result["category"], "score": round(result["confidence"], 6)},
            "group": {"value": group, "score": round(group_score, 6)},
            "shade": {"value": shade, "score": round(brightness, 4)},
            "neighbours": {"value": majority, "score": round(cats.count(majority) / len(cats), 4) if cats else 0.0,
                           "agrees": majority == result["category"], "k": len(cats)},
        }}  # fmt: skip

    @app.post("/search")
    async def search(self, request: Request) -> dict:
        data, ctype, fields = await read_upload(request)
        k = await guarded(parse_k, fields.get("k", 10))
        category, group = fields.get("category") or None, fields.get("group") or None
        bundle = self.current()
        result = await guarded(self.analyse, bundle, data, ctype)
        hits = await guarded(bundle.index.search, result["embedding"], k, category=category, group=group)  # fmt: skip
        self.log_request("/search", bundle, result)
        return {"model_version": bundle.version, "k": k,
                "filters": {"category": category, "group": group},
                "query": {"category": result["category"], "confidence": round(result["confidence"], 6)},
                "results": [self.hit_json(h) for h in hits]}  # fmt: skip

    @app.post("/embed")
    async def embed(self, request: Request) -> dict:
        data, ctype, _ = await read_upload(request)
        bundle = self.current()
        result = await guarded(self.analyse, bundle, data, ctype)
        self.log_request("/embed", bundle, result)
        vector = [round(float(v), 7) for v in result["embedding"]]
        return {"model_version": bundle.version, "dim": len(vector), "embedding": vector}

    # ------------------------------------------------------------------ catalogue endpoints
    @app.post("/recommend")
    async def recommend(self, body: RecommendRequest) -> dict:
        bundle = self.current()
        hits = await guarded(bundle.index.recommend, body.history, body.k, diversify=body.diversify)
        return {"model_version": bundle.version, "k": body.k, "diversify": body.diversify,
                "results": [self.hit_json(h) for h in hits]}  # fmt: skip

    @app.get("/products/{product_id}")
    async def product(self, product_id: str) -> dict:
        from components.search import group_of

        bundle = self.current()
        record = await guarded(bundle.index.product, product_id)
        record = {k: v for k, v in record.items() if isinstance(v, str | int | float | bool)}
        record["group"] = group_of(str(record.get("category", "")))
        record["image_url"] = f"/products/{quote(product_id, safe='')}/image"
        return {"model_version": bundle.version, "product": record}

    @app.get("/products/{product_id}/image")
    async def product_image(self, product_id: str) -> FileResponse:
        bundle = self.current()
        record = await guarded(bundle.index.product, product_id)
        path = (self.catalogue_dir / str(record.get("path", ""))).resolve()
        if (
            not record.get("path")
            or not path.is_file()
            or not path.is_relative_to(self.catalogue_dir.resolve())
        ):
            raise ApiError(404, f"no image file for product {product_id}")
        return FileResponse(path, headers={"X-Model-Version": bundle.version})

    @app.post("/admin/reload")
    async def admin_reload(self, request: Request) -> JSONResponse:
        if not self.admin_token:
            raise ApiError(403, "admin endpoint disabled: set VITRINE_ADMIN_TOKEN to enable it")
        given = request.headers.get("x-admin-token") or request.headers.get("authorization", "")
        given = given.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            raise ApiError(403, "missing or wrong admin token")
        outcome = await run_in_threadpool(self.reload)
        return JSONResponse(outcome, status_code=500 if outcome.get("error") else 200)

    # ------------------------------------------------------------------ probes (middleware)
    def readiness(self) -> tuple[int, dict]:
        bundle = self.bundle
        body = {
            "ready": bundle is not None,
            "model_version": bundle.version if bundle else None,
            "index_size": len(bundle.index) if bundle else 0,
            "index_kind": bundle.index.kind if bundle else None,
            "loaded_at": bundle.loaded_at if bundle else None,
            "load_seconds": bundle.load_seconds if bundle else None,
            "last_reload_error": self.last_error,
            "last_check_at": self.last_check_at,
        }
        return (200 if bundle else 503), body


def _project_root() -> Path:
    from components.config import PROJECT_ROOT

    return PROJECT_ROOT


async def read_upload(request: Request) -> tuple[bytes, str | None, dict[str, str]]:
    """(image bytes, declared content type, fields) from multipart (field `image`) or a raw body."""
    fields = dict(request.query_params)
    ctype = request.headers.get("content-type", "")
    base = ctype.split(";")[0].strip().lower()
    if base == "multipart/form-data":
        form = await request.form()
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        fields |= {k: v for k, v in form.multi_items() if isinstance(v, str)}
        upload = form.get("image")
        upload = upload if isinstance(upload, UploadFile) else (files[0] if files else None)
        if upload is None:
            raise ApiError(400, "no file in the upload: send the image as multipart field 'image'")
        return await upload.read(), upload.content_type, fields
    if base in IMAGE_TYPES | SNIFFED_TYPES - {""}:
        return await request.body(), base, fields
    raise ApiError(415, f"unsupported request content type {base or 'none'!r}: send "
                        "multipart/form-data with field 'image', or a raw image body")  # fmt: skip


async def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run fn in a worker thread; bad input becomes an ApiError with a 4xx status."""
    from components.search import UnknownProduct

    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except BadImage as error:
        raise ApiError(error.status, str(error)) from error
    except UnknownProduct as error:
        raise ApiError(404, str(error.args[0] if error.args else error)) from error
    except ValueError as error:  # bad k, unknown filter, empty history
        raise ApiError(400, str(error)) from error


def error_response(status: int, message: str) -> JSONResponse:
    try:
        bundle = bentoml.get_current_service().bundle
    except Exception:
        bundle = None
    return JSONResponse({"error": message, "model_version": bundle.version if bundle else None},
                        status_code=status)  # fmt: skip


@app.exception_handler(ApiError)
async def on_api_error(_: Request, error: ApiError) -> JSONResponse:
    return error_response(error.status, error.message)


@app.exception_handler(RequestValidationError)
async def on_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return error_response(422, problems or "invalid request")


@app.exception_handler(HTTPException)
async def on_http_error(_: Request, error: HTTPException) -> JSONResponse:
    return error_response(error.status_code, str(error.detail))


@app.exception_handler(Exception)
async def on_unexpected(_: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return error_response(500, f"internal error: {type(error).__name__}")


class ProbesAndLimits:
    """ASGI middleware: JSON /healthz /readyz and vitrine's /metrics (ahead of BentoML's own
    routes), the request-body limit (413 before parsing), and per-endpoint request metrics."""

    def __init__(self, app: Any, max_body: int = (10 << 20) + MULTIPART_SLACK):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            service = bentoml.get_current_service()
        except Exception:
            service = None
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.dispatch(scope, receive, send_status, service)
        finally:
            if service is not None:
                label = endpoint_label(scope["path"])
                service.metrics.observe_request(label, status[0], time.perf_counter() - start)

    async def dispatch(self, scope: dict, receive: Any, send: Any, service: Any) -> None:
        path, method = scope["path"], scope["method"]
        if method in ("GET", "HEAD") and path in ("/healthz", "/readyz", "/metrics"):
            return await self.probe(path, service)(scope, receive, send)
        if method != "POST":
            return await self.app(scope, receive, send)
        limit = service.limits.max_bytes + MULTIPART_SLACK if service else self.max_body
        headers = dict(scope.get("headers") or [])
        declared = int(headers.get(b"content-length", b"0") or 0)
        too_big = error_response(413, f"request body over the {limit}-byte limit")
        if declared > limit:
            return await too_big(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def probe(self, path: str, service: Any) -> Any:
        from starlette.responses import Response

        if service is None:
            return error_response(503, "service starting")
        if path == "/metrics":
            return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")
        if path == "/healthz":
            bundle = service.bundle
            return JSONResponse(
                {"status": "ok", "model_version": bundle.version if bundle else None}
            )
        status, body = service.readiness()
        return JSONResponse(body, status_code=status)


Vitrine.add_asgi_middleware(ProbesAndLimits)
