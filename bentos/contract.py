"""The HTTP API's OpenAPI contract (/openapi.json, /docs): what FastAPI cannot see in the routes.

The image routes read their request themselves (bentos/http.py read_upload), so their bodies are
declared here: multipart/form-data with the photo in field `image` and the route's fields, or
the photo as the raw body with the fields in the query string. Every error has its status and
body (ErrorResponse). `complete_contract` adds, when the schema is first served: the valid values
of the filter fields (from the served catalogue), the probes answered by the middleware, the
admin token, and the error body of a 422. tests/serving/test_contract.py runs schemathesis with
every check against the running service."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, Field

from bentos.http import ApiError, Fields, parse_colour_or_422, parse_k_or_400


class ErrorResponse(BaseModel):
    """Every 4xx / 5xx answer: what was wrong, and the version being served (or null)."""

    error: str
    model_version: str | None


class ReloadResponse(BaseModel):
    """POST /admin/reload: what the answering worker serves now, and how many workers answered."""

    reloaded: bool
    model_version: str | None
    previous_version: str | None = None
    workers: int
    error: str | None = Field(None, description="Why a worker failed to load (with a 500)")


ERRORS = {
    400: "A bad field (k, category, group, format; repeated or invalid), an empty or malformed "
    "upload, or no file in field `image`",
    403: "The admin token is missing or wrong, or the admin endpoint is disabled",
    404: "No such product",
    409: "The served version has no text search (/search_text) or no detector (/detect)",
    413: "The body or the image is too large (bytes or pixels; decompression bombs)",
    415: "Not a JPEG, PNG, WebP, GIF or BMP image, or an unsupported request content type",
    422: "An invalid JSON body or an unknown colour (the message lists the palette)",
    500: "The reload failed; the previous version keeps serving",
    503: "No model loaded yet",
}
UPLOAD_ERRORS = (400, 413, 415, 503)
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")
RAW_TYPES = (*IMAGE_TYPES, "application/octet-stream")  # octet-stream: the bytes decide
BINARY = {"type": "string", "format": "binary"}
PHOTO = BINARY | {
    "minLength": 1,
    "description": "The photo: JPEG, PNG, WebP, GIF or BMP, at most 10 MiB",
}
BLANK = "blank: no filter; case-insensitive"


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route: each code with its meaning and the error body."""
    return {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in codes}


def image_upload(**fields: dict[str, Any]) -> dict[str, Any]:
    """The request of an image route, for `openapi_extra`: multipart/form-data with the photo in
    field `image` and `fields`, or the photo as the raw body. Each field may also be a query
    parameter (the only way beside a raw body); given in both, both must be valid and the
    form's is used. A field given twice in the form or in the query is a 400."""
    form = {"type": "object", "required": ["image"], "properties": {"image": PHOTO, **fields}}
    content = {"multipart/form-data": {"schema": form}} | {t: {"schema": BINARY} for t in RAW_TYPES}
    query = [{"name": name, "in": "query", "schema": schema} for name, schema in fields.items()]
    return {"requestBody": {"required": True, "content": content}} | (
        {"parameters": query} if query else {}
    )


SEARCH_FIELDS = {
    "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
    "category": {"type": "string", "description": f"Only products of this category ({BLANK})"},
    "group": {"type": "string", "description": f"Only products of this group ({BLANK})"},
    "colour": {"type": "string", "description": f"Only products having this colour ({BLANK})"},
}
SEARCH_FIELDS["detect"] = {
    "type": "string",
    "enum": ["", "true", "false"],
    "default": "false",
    "description": "true: search the largest product the detector finds in the photo (the "
    "whole photo when it finds none); the answer's query.box says which",
}
EXPLAIN_FIELDS = {"format": {"type": "string", "enum": ["json", "png"], "default": "json"}}
DETECT_FIELDS = {
    "k": {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "default": 5,
        "description": "Similar products per detected item",
    }
}
SEARCH_NAMES, EXPLAIN_NAMES = tuple(SEARCH_FIELDS), tuple(EXPLAIN_FIELDS)
DETECT_NAMES = tuple(DETECT_FIELDS)


def image_answer(description: str, types: tuple[str, ...], **headers: str) -> dict[str, Any]:
    """A 200 whose body is an image, with the headers that describe it."""
    answer: dict[str, Any] = {"description": description}
    answer["content"] = {t: {"schema": BINARY} for t in types}
    answer["headers"] = {
        h: {"schema": {"type": "string"}, "description": d} for h, d in headers.items()
    }
    return answer


# the keyword arguments of the routes' decorators (bentos/service.py)
UPLOAD_ROUTE = {"openapi_extra": image_upload(), "responses": errors(*UPLOAD_ERRORS)}
SEARCH_ROUTE = {
    "openapi_extra": image_upload(**SEARCH_FIELDS),
    "responses": errors(*UPLOAD_ERRORS, 422),
}
DETECT_ROUTE = {
    "openapi_extra": image_upload(**DETECT_FIELDS),
    "responses": errors(*UPLOAD_ERRORS, 409),
}
HEATMAP = image_answer(
    "The explanation (JSON), or with format=png the heatmap PNG",
    ("image/png",),
    **{
        "X-Model-Version": "The version that explained it (format=png)",
        "X-Category": "The predicted category, URL-encoded (format=png)",
        "X-Region": "x0,y0,x1,y1 of the region that drove it, in the photo's pixels (format=png)",
    },
)
EXPLAIN_ROUTE = {
    "openapi_extra": image_upload(**EXPLAIN_FIELDS),
    "responses": errors(*UPLOAD_ERRORS) | {200: HEATMAP},
}
PRODUCT_IMAGE_ROUTE = {
    "responses": errors(404, 503)
    | {
        200: image_answer(
            "The product's photo as stored in the catalogue (PNG when vitrine ingested it)",
            IMAGE_TYPES,
            **{"X-Model-Version": "The version whose index holds the product"},
        )
    },
}
TEXT_ROUTE = {"responses": errors(400, 409, 413, 422, 503)}
RECOMMEND_ROUTE = {"responses": errors(400, 404, 413, 422, 503)}
ADMIN_ROUTE = {
    "response_model": ReloadResponse,
    "responses": errors(403, 413) | {500: {"model": ReloadResponse, "description": ERRORS[500]}},
    "openapi_extra": {"security": [{"adminToken": []}]},
}


# ------------------------------------------------- what complete_contract adds to FastAPI's schema
def error_content() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def json_answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


NULLABLE_STRING = {"type": ["string", "null"]}
HEALTH = {
    "type": "object",
    "required": ["status", "model_version"],
    "properties": {"status": {"const": "ok"}, "model_version": NULLABLE_STRING},
}
READINESS = {
    "type": "object",
    "required": ["ready", "model_version"],
    "properties": {
        "ready": {"type": "boolean"},
        "model_version": NULLABLE_STRING,
        "workers": {"type": "integer", "minimum": 0},
        "last_reload_error": NULLABLE_STRING,
        "champion_alias_refused": NULLABLE_STRING,
        "ab": {"type": "object"},
    },
}
STARTING = "The worker is still starting (no service yet)"
PROBES = {
    "/healthz": {
        "summary": "Liveness",
        "responses": {
            "200": json_answer("The process answers, with the version it serves", HEALTH),
            "503": {"description": STARTING, "content": error_content()},
        },
    },
    "/readyz": {
        "summary": "Readiness",
        "responses": {
            "200": json_answer("A champion is loaded: what is served, the last errors", READINESS),
            "503": json_answer(
                "No champion loaded yet (why), or the worker is still starting",
                {"anyOf": [READINESS, {"$ref": "#/components/schemas/ErrorResponse"}]},
            ),
        },
    },
    "/metrics": {
        "summary": "Prometheus metrics, summed over the workers",
        "responses": {
            "200": {
                "description": "The Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            "503": {"description": STARTING, "content": error_content()},
        },
    },
}
ADMIN_TOKEN = {
    "type": "apiKey",
    "in": "header",
    "name": "X-Admin-Token",
    "description": "VITRINE_ADMIN_TOKEN (`Authorization: Bearer <token>` is accepted too)",
}


def filter_choices(categories: list[str]) -> dict[str, list[str]]:
    """The valid values of the filter fields (the index's own checks, components/retrieval):
    the catalogue's categories, the groups, the palette's colours and their synonyms; a blank
    value is no filter. Matched case-insensitively."""
    from components.retrieval.colours import COLOURS, SYNONYMS
    from components.retrieval.tags import GROUPS, OTHER_GROUP

    groups = sorted({*GROUPS.values(), OTHER_GROUP})
    return {
        "category": ["", *dict.fromkeys([*categories, *GROUPS])],
        "group": ["", *groups],
        "colour": ["", *COLOURS, *SYNONYMS],
    }


def _constrain(schema: dict[str, Any], values: list[str] | None) -> None:
    """Give a string field (or the string branch of a nullable one) its valid values."""
    if values is None:
        return
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            branch["enum"] = values


def complete_contract(spec: dict[str, Any], categories: list[str]) -> dict[str, Any]:
    """FastAPI's schema with the filter fields' valid values, the probes, the admin token's
    scheme, and every 422 answered with ErrorResponse (bentos/http.py on_validation_error)."""
    spec = copy.deepcopy(spec)
    components = spec.setdefault("components", {})
    models = components.setdefault("schemas", {})
    choices = filter_choices(categories)
    for operation in (op for item in spec["paths"].values() for op in item.values()):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "query":
                _constrain(parameter["schema"], choices.get(parameter["name"]))
        for media in operation.get("requestBody", {}).get("content", {}).values():
            body = media["schema"]
            body = models[body["$ref"].rsplit("/", 1)[-1]] if "$ref" in body else body
            for name, field in body.get("properties", {}).items():
                _constrain(field, choices.get(name))
        if "422" in operation["responses"]:
            operation["responses"]["422"]["content"] = error_content()
    for name in ("HTTPValidationError", "ValidationError"):
        models.pop(name, None)
    spec["paths"].update({path: {"get": probe} for path, probe in PROBES.items()})
    components.setdefault("securitySchemes", {})["adminToken"] = ADMIN_TOKEN
    return spec


# ------------------------------------------ the image routes' fields, checked as declared above
def check_choice(name: str, value: str, choices: dict[str, list[str]]) -> str | None:
    """A category or group filter (blank: None); not one of `choices` (filter_choices,
    case-insensitive, as the index matches) is a 400."""
    if value.lower() not in {c.lower() for c in choices[name]}:
        raise ApiError(400, f"unknown {name} {value!r}; valid: {choices[name][1:]}")
    return value or None


def search_fields(fields: Fields, categories: list[str]) -> tuple[int, dict[str, str | None]]:
    """k and the filters of /search, checked before the model runs: every value given (query
    string and form) must be valid, the last one is used. A bad k, category or group is a 400,
    an unknown colour a 422."""
    choices = filter_choices(categories)
    k = [parse_k_or_400(v) for v in fields.get("k", ["10"])][-1]
    filters = {
        name: [check_choice(name, v, choices) for v in fields.get(name, [""])][-1]
        for name in ("category", "group")
    }
    filters["colour"] = [parse_colour_or_422(v) for v in fields.get("colour", [""])][-1]
    return k, filters


def detect_flag(fields: Fields) -> bool:
    """/search's `detect` field: true or false (blank: false), else a 400."""
    values = fields.get("detect", ["false"])
    for value in values:
        if value not in ("true", "false", ""):
            raise ApiError(400, f"detect must be true or false, got {value!r}")
    return values[-1] == "true"


def detect_k(fields: Fields) -> int:
    """/detect's k (similar products per item, default 5): 1..100, else a 400."""
    return [parse_k_or_400(v) for v in fields.get("k", ["5"])][-1]


def explain_format(fields: Fields) -> str:
    """The `format` of /explain (json or png); any other value is a 400."""
    for answer in fields.get("format", []):
        if answer not in ("json", "png"):
            raise ApiError(400, f"format must be json or png, got {answer!r}")
    return fields.get("format", ["json"])[-1]
