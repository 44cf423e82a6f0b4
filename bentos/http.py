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
    """The palette name of a `colour` form field (blank: None); an unknown one is a 422 that
    lists the palette."""
    with as_api_errors():
        from components.retrieval.colours import colour_name

        return colour_name(value) if value and value.strip() else None


def catalogue_file(catalogue_dir: Path, record: dict, product_id: str) -> Path:
    """The product's image file, which must lie inside the catalogue folder; else a 404."""
    path = (catalogue_dir / str(record.get("path", ""))).resolve()
    if (
        not record.get("path")
        or not path.is_file()
        or not path.is_relative_to(catalogue_dir.resolve())
    ):
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
            await self.dispatch(scope, receive, send_status, service)
        finally:
            if service is not None:
                seconds = time.perf_counter() - start
                label = endpoint_label(scope["path"])
                service.metrics.observe_request(label, status[0], seconds)
                if scope["state"].get("ab"):
                    service.ab.record(scope["state"]["ab"], label, status[0], seconds)

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
            bundle = service.loader.bundle
            return JSONResponse(
                {"status": "ok", "model_version": bundle.version if bundle else None}
            )
        status, body = service.loader.readiness()
        body["workers"] = len(service.peers.peers())  # live worker processes of this server
        return JSONResponse(body, status_code=status)
