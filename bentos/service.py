"""vitrine's BentoML service: the champion model and ITS OWN catalogue index, loaded together.

Every request takes one `Bundle` (version, model, index, text space) and uses only it, so a
model can never answer with another version's index; a hot swap builds a new Bundle off the
request path and replaces the reference in one assignment. Model calls from all requests go
through one adaptive micro-batcher (components.serving.MicroBatcher: a lone request runs at
once, requests arriving meanwhile form the next batch) instead of a `batchable` BentoML API,
because BentoML batches only calls that reach such an API over HTTP or from another service
process, which would split the model from its index. Repeated photos hit an LRU cache keyed by
(version, sha256). With serving.ab.mode = route | shadow the challenger is loaded beside the
champion (see components/serving/ab.py).

Routes: POST /classify /tags /search /embed (image as multipart field `image`, or a raw body),
POST /search_text /recommend (JSON), GET /products/{id}[/image], GET / (the page),
POST /explain (Grad-CAM heatmap and region, components/model/explain.py),
POST /admin/reload (token). bentos/http.py holds the app, errors and the probes middleware.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bentoml
import numpy as np
from fastapi import Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from bentos.http import ApiError, ProbesAndLimits, app, guarded, read_upload
from bentos.loader import Bundle, ModelLoader
from components.serving.logs import RequestLog
from components.serving.metrics import ServingMetrics
from components.serving.runtime import LRUCache, MicroBatcher, set_call_threads
from components.serving.uploads import (
    UploadLimits,
    compute_image_stats,
    decode_upload,
    parse_k,
    sha256_hex,
)

PAGE = Path(__file__).resolve().parent / "static" / "index.html"


class RecommendRequest(BaseModel):
    history: list[str] = Field(min_length=1, max_length=1000)
    k: int = Field(10, ge=1, le=100)
    diversify: bool = False


class TextQuery(BaseModel):
    query: str = Field(min_length=1, max_length=200)
    k: int = Field(10, ge=1, le=100)
    category: str | None = None
    group: str | None = None


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@bentoml.service(name="vitrine", workers=1, traffic={"timeout": 60})
@bentoml.asgi_app(app, path="/")
class Vitrine:
    def __init__(self) -> None:
        from PIL import Image

        from components.config import configure_environment, load_params, state_paths

        self.paths = state_paths()
        configure_environment(self.paths)
        self.params = load_params()
        self.categories = list(self.params.data.categories)
        self.catalogue_dir = self.params.data.catalogue_path()
        serving = self.params.serving  # the env vars below override params.yaml (tests, ops)
        self.limits = UploadLimits(
            max_bytes=int(env_float("VITRINE_MAX_UPLOAD_BYTES", serving.max_upload_bytes)),
            max_pixels=serving.max_pixels,
        )
        Image.MAX_IMAGE_PIXELS = self.limits.max_pixels
        # One thread per model / FAISS call by default: the requests are the parallelism (the
        # event loop, the batcher and the worker threads share the cores), and idle OpenMP
        # workers spin for a while after every call, taking the core the event loop needs.
        set_call_threads(
            int(env_float("VITRINE_SERVING_THREADS", serving.threads)) or os.cpu_count() or 1
        )
        self.metrics = ServingMetrics()
        self.cache = LRUCache(int(env_float("VITRINE_CACHE_SIZE", serving.cache_size)))
        self.text_cache = LRUCache(1024)  # query text -> MiniLM embedding
        requests_dir = self.paths.home / "requests"
        self.request_log = RequestLog(
            requests_dir, env_float("VITRINE_SAMPLE_RATE", serving.sample_rate)
        )
        from components.serving.ab import ABLog

        self.ab = serving.ab.model_copy(
            update={
                "mode": os.environ.get("VITRINE_AB_MODE") or serving.ab.mode,
                "challenger_share": env_float("VITRINE_AB_SHARE", serving.ab.challenger_share),
            }
        )
        self.ab_log = ABLog(requests_dir)
        variant = os.environ.get("VITRINE_VARIANT") or serving.variant  # compress.VARIANTS
        self.loader = ModelLoader(self.paths, self.params, self.metrics, variant, self.ab.mode)
        self.batcher = MicroBatcher(
            self._predict_batch,
            max_batch_size=serving.max_batch_size,
            on_batch=self.metrics.batch_size.observe,
        )
        self.admin_token = os.environ.get("VITRINE_ADMIN_TOKEN") or ""
        self.loader.reload()
        self.loader.reload_challenger()
        self.loader.start_polling(env_float("VITRINE_POLL_SECONDS", serving.poll_seconds))

    @property
    def bundle(self) -> Bundle | None:
        return self.loader.bundle

    @property
    def challenger(self) -> Bundle | None:
        return self.loader.challenger

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.loader.stop()
        self.batcher.close()

    # ------------------------------------------------------------------ the model
    def _predict_batch(self, items: list[tuple[Bundle, np.ndarray]]) -> list[tuple]:
        """One model call per bundle present in the batch (two only during a swap)."""
        import torch

        from components.model.transforms import to_tensor

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
            raise ApiError(503, f"no model loaded: {self.loader.last_error}")
        return bundle

    def analyse(self, bundle: Bundle, data: bytes, content_type: str | None) -> dict:
        """Decode, preprocess like training, then (probs, embedding) from cache or the batcher."""
        from components.model.transforms import image_to_uint8

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
            "pixels": pixels,
            "probs": probs,
            "embedding": embedding,
            "best": best,
            "category": self.categories[best],
            "confidence": float(probs[best]),
            "stats": compute_image_stats(image, pixels),
        }

    # ------------------------------------------------------------------ online A/B
    def pick(self, request: Request) -> tuple[Bundle, Bundle | None]:
        """(the bundle that answers, the one shadowing it); notes the arm for the A/B log."""
        from components.serving.ab import CHALLENGER, assign_arm

        champion, challenger = self.current(), self.challenger
        if challenger is None or self.ab.mode == "off":
            return champion, None
        if self.ab.mode == "shadow":
            request.state.ab = {"arm": "champion", "version": champion.version, "mode": "shadow"}
            return champion, challenger
        arm = assign_arm(request.headers.get("x-client-id"), self.ab.challenger_share)
        bundle = challenger if arm == CHALLENGER else champion
        request.state.ab = {"arm": arm, "version": bundle.version, "mode": "route"}
        return bundle, None

    async def infer(self, request: Request, data: bytes, ctype: str | None) -> tuple[Bundle, dict]:
        """Run the chosen arm's model; in shadow mode the challenger answers too, unseen."""
        bundle, shadow = self.pick(request)
        started = time.perf_counter()
        other = (
            asyncio.ensure_future(guarded(self.analyse, shadow, data, ctype)) if shadow else None
        )
        try:
            result = await guarded(self.analyse, bundle, data, ctype)
        except Exception:
            if other is not None:
                other.cancel()
            raise
        ab = getattr(request.state, "ab", None)
        if ab is not None:
            ab["confidence"] = result["confidence"]
        if other is not None:
            status, confidence, agrees = 200, None, None
            try:
                shadowed = await other
                confidence, agrees = (
                    shadowed["confidence"],
                    shadowed["category"] == result["category"],
                )
            except Exception:
                status = 500
            ab["agrees"] = agrees
            self.record_ab(
                {
                    "arm": "challenger",
                    "version": shadow.version,
                    "mode": "shadow",
                    "confidence": confidence,
                    "agrees": agrees,
                },
                "shadow",
                status,
                time.perf_counter() - started,
            )
        return bundle, result

    def record_ab(self, ab: dict, endpoint: str, status: int, seconds: float) -> None:
        from components.serving.ab import ABEvent

        self.metrics.observe_arm(ab["arm"], ab["version"], status, seconds)
        self.ab_log.write(
            ABEvent(
                ab["arm"],
                ab["version"],
                endpoint,
                status,
                round(seconds * 1000, 3),
                ab["mode"],
                ab.get("confidence"),
                ab.get("agrees"),
            )
        )

    def log_request(self, endpoint: str, bundle: Bundle, result: dict) -> None:
        self.request_log.write(
            endpoint,
            bundle.version,
            result["embedding"],
            result["category"],
            result["confidence"],
            result["stats"],
        )

    def hit_json(self, hit: Any) -> dict:
        return {
            "product_id": hit.product_id,
            "score": round(float(hit.score), 6),
            "category": hit.category,
            "group": hit.group,
            "title": hit.title,
            "image_url": f"/products/{quote(hit.product_id, safe='')}/image",
        }

    # ------------------------------------------------------------------ image endpoints
    @app.post("/classify")
    async def classify(self, request: Request) -> dict:
        data, ctype, _ = await read_upload(request)
        bundle, result = await self.infer(request, data, ctype)
        top = np.argsort(-result["probs"])[:3]
        self.log_request("/classify", bundle, result)
        return {
            "model_version": bundle.version,
            "category": result["category"],
            "confidence": round(result["confidence"], 6),
            "top": [
                {"category": self.categories[i], "probability": round(float(result["probs"][i]), 6)}
                for i in top
            ],
        }

    @app.post("/tags")
    async def tags(self, request: Request) -> dict:
        from components.retrieval.tags import group_of, shade_of

        data, ctype, _ = await read_upload(request)
        bundle, result = await self.infer(request, data, ctype)
        hits = await guarded(bundle.index.search, result["embedding"], 10)
        cats = [hit.category for hit in hits]
        majority = max(set(cats), key=cats.count) if cats else None
        group = group_of(result["category"])
        group_score = sum(
            float(p)
            for c, p in zip(self.categories, result["probs"], strict=True)
            if group_of(c) == group
        )
        shade, brightness = shade_of(result["pixels"])
        self.log_request("/tags", bundle, result)
        return {
            "model_version": bundle.version,
            "tags": {
                "category": {"value": result["category"], "score": round(result["confidence"], 6)},
                "group": {"value": group, "score": round(group_score, 6)},
                "shade": {"value": shade, "score": round(brightness, 4)},
                "neighbours": {
                    "value": majority,
                    "score": round(cats.count(majority) / len(cats), 4) if cats else 0.0,
                    "agrees": majority == result["category"],
                    "k": len(cats),
                },
            },
        }

    @app.post("/search")
    async def search(self, request: Request) -> dict:
        data, ctype, fields = await read_upload(request)
        k = await guarded(parse_k, fields.get("k", 10))
        category, group = fields.get("category") or None, fields.get("group") or None
        bundle, result = await self.infer(request, data, ctype)
        hits = await guarded(
            bundle.index.search, result["embedding"], k, category=category, group=group
        )
        self.log_request("/search", bundle, result)
        return {
            "model_version": bundle.version,
            "k": k,
            "filters": {"category": category, "group": group},
            "query": {"category": result["category"], "confidence": round(result["confidence"], 6)},
            "results": [self.hit_json(h) for h in hits],
        }

    @app.post("/embed")
    async def embed(self, request: Request) -> dict:
        data, ctype, _ = await read_upload(request)
        bundle, result = await self.infer(request, data, ctype)
        self.log_request("/embed", bundle, result)
        vector = [round(float(v), 7) for v in result["embedding"]]
        return {"model_version": bundle.version, "dim": len(vector), "embedding": vector}

    @app.post("/search_text")
    async def search_text(self, request: Request, body: TextQuery) -> dict:
        from components.retrieval import text as textsearch

        bundle, _ = self.pick(request)
        if bundle.text is None:
            raise ApiError(
                409,
                f"model version {bundle.version} was registered without text "
                "search (text_search.enabled was false)",
            )
        query = body.query.strip()
        if not query:
            raise ApiError(400, "query is blank: type a few words, e.g. 'white sneakers'")
        vector = self.text_cache.get(query.lower())
        if vector is None:
            vector = (await run_in_threadpool(textsearch.encode_texts, [query]))[0]
            self.text_cache.put(query.lower(), vector)
        hits = await guarded(
            bundle.index.search_space,
            bundle.text,
            vector,
            body.k,
            category=body.category,
            group=body.group,
        )
        return {
            "model_version": bundle.version,
            "query": query,
            "k": body.k,
            "filters": {"category": body.category, "group": body.group},
            "results": [self.hit_json(h) for h in hits],
        }

    @app.post("/explain")
    async def explain(self, request: Request) -> Any:
        """Grad-CAM of the predicted category (components/model/explain.py): the heatmap over the photo
        as a PNG (base64 in JSON, or the PNG itself with ?format=png) and the driving region."""
        from components.model.explain import explain_image, explanation_json

        data, ctype, fields = await read_upload(request)
        answer = (fields.get("format") or "json").strip().lower()
        if answer not in ("json", "png"):
            raise ApiError(400, f"format must be json or png, got {answer!r}")
        bundle = self.current()
        image = await guarded(decode_upload, data, ctype, self.limits)
        ex = await guarded(
            explain_image, bundle.torch_model or bundle.model, image, self.categories
        )
        if answer == "png":
            region = ",".join(str(ex.box[k]) for k in ("x0", "y0", "x1", "y1"))
            return Response(
                ex.png,
                media_type="image/png",
                headers={
                    "X-Model-Version": bundle.version,
                    "X-Category": quote(ex.category),
                    "X-Region": region,
                },
            )
        return {"model_version": bundle.version, **explanation_json(ex)}

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    # ------------------------------------------------------------------ catalogue endpoints
    @app.post("/recommend")
    async def recommend(self, request: Request, body: RecommendRequest) -> dict:
        bundle, _ = self.pick(request)
        hits = await guarded(bundle.index.recommend, body.history, body.k, diversify=body.diversify)
        return {
            "model_version": bundle.version,
            "k": body.k,
            "diversify": body.diversify,
            "results": [self.hit_json(h) for h in hits],
        }

    @app.get("/products/{product_id}")
    async def product(self, product_id: str) -> dict:
        from components.retrieval.tags import group_of

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
        outcome = await run_in_threadpool(self.loader.reload)
        await run_in_threadpool(self.loader.reload_challenger)
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
            "last_reload_error": self.loader.last_error,
            "last_check_at": self.loader.last_check_at,
            "text_search": bool(bundle and bundle.text is not None),
            "variant": bundle.variant if bundle else None,
            "variant_requested": self.loader.variant,
            "variant_note": bundle.variant_note if bundle else None,
            "ab": {
                "mode": self.ab.mode,
                "challenger_version": self.challenger.version if self.challenger else None,
                "challenger_error": self.loader.challenger_error,
            },
        }
        return (200 if bundle else 503), body


def _project_root() -> Path:
    from components.config import PROJECT_ROOT

    return PROJECT_ROOT


Vitrine.add_asgi_middleware(ProbesAndLimits)
