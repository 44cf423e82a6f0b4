"""The HTTP plumbing of the service: the FastAPI app, upload parsing, 4xx errors as JSON, and
the ASGI middleware that answers the probes, enforces the body limit and records metrics and
A/B events. No model code here; bentos/service.py holds the service class."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from components.serving.metrics import endpoint_label
from components.serving.runtime import in_call_thread
from components.serving.uploads import IMAGE_TYPES, SNIFFED_TYPES, BadImage, parse_k

log = logging.getLogger("vitrine.service")
app = FastAPI(title="vitrine", summary="Visual search over the catalogue, from the champion model")
MULTIPART_SLACK = 64 * 1024  # form boundaries and small fields on top of the image itself


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


Fields = dict[str, list[str]]


def given_once(items: Any, names: tuple[str, ...], where: str) -> Fields:
    """The values of `names` among (name, value) items; a name given twice is a 400 (the
    contract's fields are single values, bentos/contract.py)."""
    fields: Fields = {}
    for name, value in items:
        if name in names:
            if name in fields or not isinstance(value, str):
                raise ApiError(400, f"field {name!r} must be given once, as text, in the {where}")
            fields[name] = [value]
    return fields


async def read_upload(
    request: Request, names: tuple[str, ...] = ()
) -> tuple[bytes, str | None, Fields]:
    """(image bytes, declared content type, fields) from multipart (one file in field `image`)
    or a raw body. `fields` has the values of `names` given in the query string, then in the
    form: the caller checks each and uses the last."""
    fields = given_once(request.query_params.multi_items(), names, "query string")
    ctype = request.headers.get("content-type", "")
    base = ctype.split(";")[0].strip().lower()
    if base == "multipart/form-data":
        form = await request.form()
        for name, values in given_once(form.multi_items(), names, "form").items():
            fields.setdefault(name, []).extend(values)
        images = form.getlist("image")
        if len(images) != 1 or not isinstance(images[0], UploadFile):
            raise ApiError(400, "send the image as one file in multipart field 'image'")
        return await images[0].read(), images[0].content_type, fields
    if base in IMAGE_TYPES | SNIFFED_TYPES - {""}:
        return await request.body(), base, fields
    raise ApiError(
        415,
        f"unsupported request content type {base or 'none'!r}: send "
        "multipart/form-data with field 'image', or a raw image body",
    )


@contextlib.contextmanager
def as_api_errors() -> Iterator[None]:
    """Bad input raised inside the block becomes an ApiError with a 4xx status."""
    from components.retrieval.colours import UnknownColour
    from components.retrieval.index import UnknownProduct

    try:
        yield
    except BadImage as error:
        raise ApiError(error.status, str(error)) from error
    except UnknownProduct as error:
        raise ApiError(404, str(error.args[0] if error.args else error)) from error
    except UnknownColour as error:
        raise ApiError(422, str(error)) from error
    except ValueError as error:  # bad k, unknown filter, empty history
        raise ApiError(400, str(error)) from error


async def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a worker thread; bad input becomes an ApiError with a 4xx status."""
    with as_api_errors():
        return await run_in_threadpool(in_call_thread, fn, *args, **kwargs)


def parse_k_or_400(value: Any) -> int:
    try:
        return parse_k(value)
    except ValueError as error:
        raise ApiError(400, str(error)) from error


def parse_colour_or_422(value: str | None) -> str | None:
    """The palette name of a `colour` field (blank: None); an unknown one is a 422 that lists
    the palette."""
    with as_api_errors():
        from bentos.schemas import check_colour

        return check_colour(value)


def catalogue_file(catalogue_dir: Path, record: dict, product_id: str, store: Path) -> Path:
    """The product's image file, which must lie inside the catalogue folder (or, for a product
    an index refresh added or changed, the product-image store); else a 404."""
    from components.retrieval.revisions import STORE_PREFIX, image_file

    rel = str(record.get("path") or "")
    root = store if rel.startswith(STORE_PREFIX) else catalogue_dir
    path = image_file(rel, catalogue_dir, store).resolve()
    if not rel or not path.is_file() or not path.is_relative_to(Path(root).resolve()):
        raise ApiError(404, f"no image file for product {product_id}")
    return path


def require_admin(request: Request, token: str) -> None:
    """403 unless the request carries the admin token (X-Admin-Token or Bearer)."""
    if not token:
        raise ApiError(403, "admin endpoint disabled: set VITRINE_ADMIN_TOKEN to enable it")
    given = request.headers.get("x-admin-token") or request.headers.get("authorization", "")
    given = given.removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(403, "missing or wrong admin token")


def _service() -> Any:
    try:
        return bentoml.get_current_service()
    except Exception:
        return None


def openapi() -> dict[str, Any]:
    """/openapi.json: FastAPI's schema of the routes, completed by bentos/contract.py with the
    served catalogue's categories (built once, when first asked for)."""
    if not CONTRACT:
        from bentos.contract import complete_contract

        categories = list(getattr(_service(), "categories", None) or [])
        CONTRACT.update(complete_contract(FastAPI.openapi(app), categories))
    return CONTRACT


CONTRACT: dict[str, Any] = {}
app.openapi = openapi  # type: ignore[method-assign]


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    bundle = getattr(getattr(_service(), "loader", None), "bundle", None)
    body = {"error": message, "model_version": bundle.version if bundle else None}
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(ApiError)
async def on_api_error(_: Request, error: ApiError) -> JSONResponse:
    return error_response(error.status, error.message)


@app.exception_handler(RequestValidationError)
async def on_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return error_response(422, problems or "invalid request")


@app.exception_handler(HTTPException)
async def on_http_error(_: Request, error: HTTPException) -> JSONResponse:
    return error_response(error.status_code, str(error.detail), error.headers)  # 405: Allow


@app.exception_handler(Exception)
async def on_unexpected(_: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return error_response(500, f"internal error: {type(error).__name__}")


def json_not_found(scope: dict, send: Any) -> Any:
    """`send`, with BentoML's plain-text 404 for a path no route serves (an unknown path; a path
    parameter holding a line break or an encoded '/') answered as JSON like every other error."""
    plain = [False]

    async def send_json(message: dict) -> None:
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers") or []).get(b"content-type", b"")
            plain[0] = message["status"] == 404 and ctype.startswith(b"text/plain")
        if not plain[0]:
            return await send(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            await error_response(404, f"no route for {scope['path']!r}")(scope, None, send)

    return send_json


class ProbesAndLimits:
    """ASGI middleware: JSON /healthz /readyz and vitrine's /metrics (ahead of BentoML's own
    routes), the request-body limit (413 before parsing), per-endpoint request metrics, and
    the A/B event of a request whose route chose an arm (scope["state"]["ab"])."""

    def __init__(self, app: Any, max_body: int = (10 << 20) + MULTIPART_SLACK):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service = _service()
        start, status = time.perf_counter(), [500]
        scope.setdefault("state", {})

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.dispatch(scope, receive, json_not_found(scope, send_status), service)
        finally:
            if service is not None:
                seconds = time.perf_counter() - start
                label = endpoint_label(scope["path"])
                service.metrics.observe_request(label, status[0], seconds)
                if scope["state"].get("ab"):
                    service.ab.record(scope["state"]["ab"], label, status[0], seconds)

    async def dispatch(self, scope: dict, receive: Any, send: Any, service: Any) -> None:
        path, method = scope["path"], scope["method"]
        if path in ("/healthz", "/readyz", "/metrics"):
            if method in ("GET", "HEAD"):
                return await self.probe(path, service)(scope, receive, send)
            answer = error_response(405, "Method Not Allowed", {"Allow": "GET, HEAD"})
            return await answer(scope, receive, send)
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
            bundle = service.loader.bundle
            return JSONResponse(
                {"status": "ok", "model_version": bundle.version if bundle else None}
            )
        status, body = service.loader.readiness()
        body["workers"] = len(service.peers.peers())  # live worker processes of this server
        return JSONResponse(body, status_code=status)
