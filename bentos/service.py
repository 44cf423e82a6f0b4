"""vitrine's BentoML service: HTTP routes over the champion model and ITS OWN catalogue index.

Every request takes one `Bundle` (bentos/loader.py: version, model, index, text space) and uses
only it, so a model never answers with another version's index; a hot swap replaces the bundle
in one assignment. Inference is bentos/predictor.py (cache + micro-batcher, no BentoML), A/B
routing components/serving/ab.py, tags components/retrieval/tags.py, bodies bentos/schemas.py,
settings bentos/settings.py, the app, errors and probes bentos/http.py.
"""

from __future__ import annotations

from pathlib import Path

import bentoml
from fastapi import Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from bentos import schemas as s
from bentos.http import ApiError, ProbesAndLimits, app, guarded, read_upload, require_admin
from bentos.loader import Bundle, ModelLoader
from bentos.predictor import Analysis, Predictor
from bentos.settings import ServiceSettings
from components.serving.ab import ABRouter
from components.serving.logs import RequestLog
from components.serving.metrics import ServingMetrics
from components.serving.runtime import set_call_threads
from components.serving.uploads import UploadLimits, decode_upload, parse_k

PAGE = Path(__file__).resolve().parent / "static" / "index.html"


@bentoml.service(name="vitrine", workers=1, traffic={"timeout": 60})
@bentoml.asgi_app(app, path="/")
class Vitrine:
    def __init__(self) -> None:
        from components.config import configure_environment, load_params, state_paths

        self.paths = state_paths()
        configure_environment(self.paths)
        self.params = load_params()
        cfg = self.settings = ServiceSettings.load(self.params.serving)
        self.categories = list(self.params.data.categories)
        self.catalogue_dir = self.params.data.catalogue_path()
        self.limits = UploadLimits(max_bytes=cfg.max_upload_bytes, max_pixels=cfg.max_pixels)
        # One thread per model / FAISS call by default: the requests are the parallelism, and
        # idle OpenMP workers spin after every call, taking the core the event loop needs.
        set_call_threads(cfg.threads)
        self.metrics = m = ServingMetrics()
        self.predictor = Predictor(
            self.categories, self.limits, cfg.cache_size, cfg.max_batch_size, m
        )
        self.request_log = RequestLog(self.paths.home / "requests", cfg.sample_rate)
        self.ab = ABRouter(cfg.ab_mode, cfg.ab_share, self.paths.home / "requests", m)
        self.loader = ModelLoader(self.paths, self.params, m, cfg.variant, cfg.ab_mode)
        self.loader.start(cfg.poll_seconds)

    @property
    def bundle(self) -> Bundle | None:
        return self.loader.bundle

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.loader.stop()
        self.predictor.close()

    def current(self) -> Bundle:
        if self.bundle is None:
            raise ApiError(503, f"no model loaded: {self.loader.last_error}")
        return self.bundle

    def pick(self, request: Request) -> tuple[Bundle, Bundle | None]:
        client = request.headers.get("x-client-id")
        bundle, shadow, note = self.ab.pick(self.current(), self.loader.challenger, client)
        request.state.ab = note  # the middleware records the A/B event with the status
        return bundle, shadow

    async def infer(self, request: Request, endpoint: str, upload: tuple | None = None):
        """The upload (read here unless given) → the answering bundle's analysis, logged."""
        data, ctype, _ = upload or await read_upload(request)
        bundle, shadow = self.pick(request)

        async def run(b: Bundle) -> Analysis:
            return await guarded(self.predictor.analyse, b, data, ctype)

        result = await self.ab.answer(bundle, shadow, request.state.ab, run)
        self.request_log.write(endpoint, bundle.version, **result.logged())
        return bundle, result

    @app.post("/classify")
    async def classify(self, request: Request) -> s.ClassifyResponse:
        bundle, r = await self.infer(request, "/classify")
        return s.ClassifyResponse.of(bundle.version, r, self.categories)

    @app.post("/tags")
    async def tags(self, request: Request) -> s.TagsResponse:
        from components.retrieval.tags import tag_answer

        bundle, r = await self.infer(request, "/tags")
        near = [hit.category for hit in await guarded(bundle.index.search, r.embedding, 10)]
        tags = tag_answer(r.category, r.confidence, r.probs, self.categories, r.pixels, near)
        return s.TagsResponse(model_version=bundle.version, tags=tags)

    @app.post("/search")
    async def search(self, request: Request) -> s.SearchResponse:
        upload = data, ctype, fields = await read_upload(request)
        k = await guarded(parse_k, fields.get("k", 10))  # a bad k is a 400 before the model runs
        filters = s.Filters(
            category=fields.get("category") or None, group=fields.get("group") or None
        )
        bundle, r = await self.infer(request, "/search", upload)
        hits = await guarded(bundle.index.search, r.embedding, k, **filters.model_dump())
        return s.SearchResponse.of(bundle.version, k, filters, r, hits)

    @app.post("/embed")
    async def embed(self, request: Request) -> s.EmbedResponse:
        bundle, r = await self.infer(request, "/embed")
        vector = [round(float(v), 7) for v in r.embedding]
        return s.EmbedResponse(model_version=bundle.version, dim=len(vector), embedding=vector)

    @app.post("/search_text")
    async def search_text(self, request: Request, body: s.TextQuery) -> s.TextSearchResponse:
        bundle, _ = self.pick(request)
        if bundle.text is None:
            why = "was registered without text search (text_search.enabled was false)"
            raise ApiError(409, f"model version {bundle.version} {why}")
        if not (query := body.query.strip()):
            raise ApiError(400, "query is blank: type a few words, e.g. 'white sneakers'")
        vector = await run_in_threadpool(self.predictor.encode_text, query)
        filters = s.Filters(category=body.category, group=body.group)
        space = bundle.text
        hits = await guarded(
            bundle.index.search_space, space, vector, body.k, **filters.model_dump()
        )
        return s.TextSearchResponse.of(bundle.version, query, body.k, filters, hits)

    @app.post("/explain", response_model=None)
    async def explain(self, request: Request) -> s.ExplainResponse | Response:
        """Grad-CAM of the predicted category (components/model/explain.py): the heatmap as a
        PNG (base64 in JSON, or the PNG itself with ?format=png) and the driving region."""
        from components.model.explain import explain_image

        data, ctype, fields = await read_upload(request)
        if (answer := (fields.get("format") or "json").strip().lower()) not in ("json", "png"):
            raise ApiError(400, f"format must be json or png, got {answer!r}")
        bundle = self.current()
        image = await guarded(decode_upload, data, ctype, self.limits)
        model = bundle.torch_model or bundle.model  # fp32 weights: Grad-CAM needs gradients
        ex = await guarded(explain_image, model, image, self.categories)
        return s.explain_answer(bundle.version, ex, answer)

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.post("/recommend")
    async def recommend(self, request: Request, body: s.RecommendRequest) -> s.RecommendResponse:
        bundle, _ = self.pick(request)
        recommend = bundle.index.recommend
        hits = await guarded(recommend, body.history, body.k, diversify=body.diversify)
        return s.RecommendResponse.of(bundle.version, body, hits)

    @app.get("/products/{product_id}")
    async def product(self, product_id: str) -> s.ProductResponse:
        bundle = self.current()
        record = await guarded(bundle.index.product, product_id)
        return s.ProductResponse.of(bundle.version, product_id, record)

    @app.get("/products/{product_id}/image")
    async def product_image(self, product_id: str) -> FileResponse:
        bundle = self.current()
        record = await guarded(bundle.index.product, product_id)
        path = (self.catalogue_dir / str(record.get("path", ""))).resolve()
        inside = path.is_relative_to(self.catalogue_dir.resolve())
        if not record.get("path") or not path.is_file() or not inside:
            raise ApiError(404, f"no image file for product {product_id}")
        return FileResponse(path, headers={"X-Model-Version": bundle.version})

    @app.post("/admin/reload")
    async def admin_reload(self, request: Request) -> JSONResponse:
        require_admin(request, self.settings.admin_token)
        outcome = await run_in_threadpool(self.loader.reload_both)
        return JSONResponse(outcome, status_code=500 if outcome.get("error") else 200)


Vitrine.add_asgi_middleware(ProbesAndLimits)
