"""vitrine's BentoML service: HTTP routes over the champion model and ITS OWN catalogue index.

Every request takes one `Bundle` (bentos/loader.py: version, model, index, text space) and uses
only it, so a model never answers with another version's index; a hot swap replaces the bundle
in one assignment. Inference is bentos/predictor.py (cache + micro-batcher, no BentoML), A/B
routing components/serving/ab.py, tags components/retrieval/tags.py, bodies bentos/schemas.py,
settings bentos/settings.py, the app, errors and probes bentos/http.py, the OpenAPI contract
bentos/contract.py.
"""

from __future__ import annotations

from pathlib import Path

import bentoml
from fastapi import Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from bentos import contract as c
from bentos import schemas as s
from bentos.http import (
    ApiError,
    ProbesAndLimits,
    app,
    catalogue_file,
    guarded,
    read_upload,
    require_admin,
)
from bentos.loader import Bundle, ModelLoader
from bentos.peers import Peers
from bentos.predictor import Analysis, Predictor
from bentos.settings import ServiceSettings
from components.serving.ab import ABRouter
from components.serving.logs import RequestLog
from components.serving.metrics import ServingMetrics
from components.serving.runtime import exit_with_parent, set_call_threads
from components.serving.uploads import UploadLimits

PAGE = Path(__file__).resolve().parent / "static" / "index.html"


class ItemQuery:
    """A detected item as /search's query (what SearchResponse.of reads of an Analysis)."""

    def __init__(self, category: str, confidence: float):
        self.category, self.confidence = category, float(confidence)


# BentoML's own request metrics and access log are off: /metrics is vitrine's (bentos/http.py),
# and they cost ~0.3 ms of the event loop per request (benchmarks/serve.py). So are its
# OpenTelemetry spans (no exporter is configured): excluding every URL skips the middleware's
# per-request work, c=1 p50 8.2-8.6 -> 6.8-7.5 ms, c=16 157-158 -> 170-193 req/s (2 runs each).
# One worker process per core: one process is bound by its GIL (0.94 of a core busy, 0.77 idle
# at c=16), two serve 1.9x its requests (benchmarks/serve.py). serving.workers / `vitrine serve
# --workers` override it (BENTOML_CONFIG_OVERRIDES); bentos/peers.py keeps the workers in step.
@bentoml.service(
    name="vitrine",
    workers="cpu_count",
    traffic={"timeout": 60},
    metrics={"enabled": False},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ".*"},
)
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
        device = cfg.resolved_device()  # serving.device: the GPU where there is one (auto)
        self.metrics = m = ServingMetrics()
        self.predictor = Predictor(
            self.categories, self.limits, cfg.cache_size, cfg.batch_size(device), m
        )
        self.request_log = RequestLog(
            self.paths.home / "requests", cfg.sample_rate, on_error=m.log_write_failed
        )
        self.ab = ABRouter(cfg.ab_mode, cfg.ab_share, self.paths.home / "requests", m)
        self.loader = ModelLoader(self.paths, self.params, m, cfg.variant, cfg.ab_mode, device)
        # joined before the first load: an /admin/reload made while this worker still loads
        # (another worker took it) waits for this one, and the watcher catches up after the load
        self.peers = Peers.for_server(self.paths.home, self.loader.reload_both)
        self.loader.start(cfg.poll_seconds)
        self.peers.start()
        exit_with_parent()  # no orphan worker answers after its arbiter is killed

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.peers.close()
        self.loader.stop()
        self.predictor.close()

    def current(self) -> Bundle:
        if (bundle := self.loader.bundle) is None:
            raise ApiError(503, f"no model loaded: {self.loader.last_error}")
        return bundle

    def pick(self, request: Request) -> tuple[Bundle, Bundle | None]:
        client = request.headers.get("x-client-id")
        bundle, shadow, note = self.ab.pick(self.current(), self.loader.challenger, client)
        request.state.ab = note  # the middleware records the A/B event with the status
        return bundle, shadow

    async def infer(self, request: Request, endpoint: str, upload: tuple | None = None, then=None):
        """The upload (read here unless given) → (bundle, its analysis, then(bundle, analysis)).

        One worker-thread hop per request: the model, `then` (the /search and /tags neighbour
        search) and the request-log write run together in the same thread call."""
        data, ctype, _ = upload or await read_upload(request)
        bundle, shadow = self.pick(request)
        extra: list = [None]

        def analyse(b: Bundle) -> Analysis:
            r = self.predictor.analyse(b, data, ctype)
            if b is bundle:  # the answer, not the shadow
                extra[0] = then(b, r) if then else None
                self.request_log.write(endpoint, b.version, **r.logged())
            return r

        async def run(b: Bundle) -> Analysis:
            return await guarded(analyse, b)

        return bundle, await self.ab.answer(bundle, shadow, request.state.ab, run), extra[0]

    @app.post("/classify", **c.UPLOAD_ROUTE)
    async def classify(self, request: Request) -> s.ClassifyResponse:
        bundle, r, _ = await self.infer(request, "/classify")
        return s.ClassifyResponse.of(bundle.version, r, self.categories)

    @app.post("/tags", **c.UPLOAD_ROUTE)
    async def tags(self, request: Request) -> s.TagsResponse:
        from components.retrieval.colours import photo_colours
        from components.retrieval.tags import tag_answer

        then = lambda b, r: (b.index.search(r.embedding, 10), photo_colours(r.image))  # noqa: E731
        bundle, r, (hits, colours) = await self.infer(request, "/tags", then=then)
        near = [hit.category for hit in hits]
        answer = (r.category, r.confidence, r.probs, self.categories, r.pixels, near, colours)
        tags = tag_answer(*answer)
        return s.TagsResponse(model_version=bundle.version, tags=tags)

    @app.post("/search", **c.SEARCH_ROUTE)
    async def search(self, request: Request) -> s.SearchResponse:
        upload = await read_upload(request, c.SEARCH_NAMES)
        k, chosen = c.search_fields(upload[2], self.categories)  # 4xx before the model runs
        filters = s.Filters(**chosen)
        if c.detect_flag(upload[2]):  # the largest detected product, not the whole photo
            return await self.search_detected(request, upload, k, filters)
        similar = lambda b, r: b.index.search(r.embedding, k, **filters.model_dump())  # noqa: E731
        bundle, r, hits = await self.infer(request, "/search", upload, then=similar)
        return s.SearchResponse.of(bundle.version, k, filters, r, hits)

    async def search_detected(
        self, request: Request, upload: tuple, k: int, filters: s.Filters
    ) -> s.SearchResponse:
        """/search with detect=true: the largest item the detector finds is the query (its
        crop's category and embedding); with none found, the whole photo as without it."""
        from components.model.detection import largest

        bundle, _ = self.pick(request)
        data, ctype, _ = upload
        cfg = self.params.detect

        def answer() -> s.SearchResponse:
            image, items = self.predictor.detect(bundle, data, ctype, cfg.max_items, cfg.nms_iou)
            self.log_detected(bundle, image, items, data, ctype)
            if not items:
                r = self.predictor.analyse(bundle, data, ctype)
                hits = bundle.index.search(r.embedding, k, **filters.model_dump())
                return s.SearchResponse.of(bundle.version, k, filters, r, hits)
            item = largest(items)
            hits = bundle.index.search(item.embedding, k, **filters.model_dump())
            query = ItemQuery(self.categories[item.category], item.confidence)
            return s.SearchResponse.of(bundle.version, k, filters, query, hits, item.box)

        return await guarded(answer)

    @app.post("/detect", **c.DETECT_ROUTE)
    async def detect(self, request: Request) -> s.DetectResponse:
        """Every product in the photo: boxes (photo pixels, best first, NMS, at most
        detect.max_items), each crop's category and colours from this version's classifier, and
        its k most similar products from this version's index."""
        from components.model.detection import crop
        from components.retrieval.colours import photo_colours

        data, ctype, fields = await read_upload(request, c.DETECT_NAMES)
        k = c.detect_k(fields)  # a 400 before the model runs
        bundle, _ = self.pick(request)
        cfg = self.params.detect

        def answer() -> s.DetectResponse:
            image, items = self.predictor.detect(bundle, data, ctype, cfg.max_items, cfg.nms_iou)
            found = [
                s.DetectedItem.of(
                    item,
                    self.categories,
                    photo_colours(crop(image, item.box)),
                    bundle.index.search(item.embedding, k),
                )
                for item in items
            ]
            self.log_detected(bundle, image, items, data, ctype)
            width, height = image.size
            return s.DetectResponse(
                model_version=bundle.version, width=width, height=height, items=found
            )

        return await guarded(answer)

    def log_detected(self, bundle: Bundle, image, items: list, data: bytes, ctype) -> None:
        """One request-log record per photo sent to /detect (or /search with detect=true): the
        photo's statistics, how many items were found and the share of the photo they cover
        (the drift monitor's `items` and `item_area`), with the best item's category and
        embedding, or the whole photo's when none was found."""
        from components.model.detection import item_stats
        from components.serving.uploads import compute_image_stats

        stats = compute_image_stats(image) | item_stats(items, image.size)
        if items:
            best = items[0]
            embedding, category, confidence = (
                best.embedding,
                self.categories[best.category],
                best.confidence,
            )
        else:
            r = self.predictor.analyse(bundle, data, ctype)
            embedding, category, confidence = r.embedding, r.category, r.confidence
        self.request_log.write("/detect", bundle.version, embedding, category, confidence, stats)

    @app.post("/embed", **c.UPLOAD_ROUTE)
    async def embed(self, request: Request) -> s.EmbedResponse:
        bundle, r, _ = await self.infer(request, "/embed")
        vector = [round(float(v), 7) for v in r.embedding]
        return s.EmbedResponse(model_version=bundle.version, dim=len(vector), embedding=vector)

    @app.post("/search_text", **c.TEXT_ROUTE)
    async def search_text(self, request: Request, body: s.TextQuery) -> s.TextSearchResponse:
        bundle, _ = self.pick(request)
        space = bundle.text_space()  # 409 for a version registered without text search
        if not (query := body.query.strip()):
            raise ApiError(400, "query is blank: type a few words, e.g. 'white sneakers'")
        # "red dress": red products first, ranked by "dress" (components/retrieval/index.py)
        prefer, text = (None, query) if body.colour else bundle.index.colour_preference(query)
        vector = await run_in_threadpool(self.predictor.encode_text, text)
        filters = s.Filters(category=body.category, group=body.group, colour=body.colour)
        kwargs = filters.model_dump() | {"prefer_colour": prefer}
        hits = await guarded(bundle.index.search_space, space, vector, body.k, **kwargs)
        return s.TextSearchResponse.of(bundle.version, query, body.k, filters, hits, text, prefer)

    @app.post("/explain", response_model=s.ExplainResponse, **c.EXPLAIN_ROUTE)
    async def explain(self, request: Request) -> s.ExplainResponse | Response:
        """Grad-CAM of the predicted category (components/model/explain.py): the heatmap as a
        PNG (base64 in JSON, or the PNG itself with ?format=png) and the driving region."""
        data, ctype, fields = await read_upload(request, c.EXPLAIN_NAMES)
        answer = c.explain_format(fields)
        bundle = self.current()
        ex = await guarded(self.predictor.explain, bundle, data, ctype)
        return s.explain_answer(bundle.version, ex, answer)

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.post("/recommend", **c.RECOMMEND_ROUTE)
    async def recommend(self, request: Request, body: s.RecommendRequest) -> s.RecommendResponse:
        bundle, _ = self.pick(request)
        recommend = bundle.index.recommend
        hits = await guarded(recommend, body.history, body.k, diversify=body.diversify)
        return s.RecommendResponse.of(bundle.version, body, hits)

    @app.get("/products/{product_id}", responses=c.errors(404, 503))
    async def product(self, product_id: str) -> s.ProductResponse:
        bundle = self.current()
        record = await guarded(bundle.index.product, product_id)
        return s.ProductResponse.of(bundle.version, product_id, record)

    @app.get("/products/{product_id}/image", response_class=FileResponse, **c.PRODUCT_IMAGE_ROUTE)
    async def product_image(self, product_id: str) -> FileResponse:
        bundle = self.current()
        record = await guarded(bundle.index.product, product_id)
        store = self.paths.product_images  # images of products an index refresh added
        path = catalogue_file(self.catalogue_dir, record, product_id, store)  # 404 outside
        return FileResponse(path, headers={"X-Model-Version": bundle.version})

    @app.post("/admin/reload", **c.ADMIN_ROUTE)
    async def admin_reload(self, request: Request) -> JSONResponse:
        require_admin(request, self.settings.admin_token)
        outcome = await run_in_threadpool(self.peers.reload_all)  # every worker, not just this one
        return JSONResponse(outcome, status_code=500 if outcome.get("error") else 200)


Vitrine.add_asgi_middleware(ProbesAndLimits)
