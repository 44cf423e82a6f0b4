"""The HTTP API's request and response bodies (FastAPI validates and documents them at
/docs). Every answer names the model version that produced it."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi.responses import Response
from pydantic import BaseModel, Field, field_validator

COLOUR_HELP = (
    "A palette colour: black, grey, white, red, navy, blue, green, yellow, orange, pink, "
    "purple, beige, brown ('gray' = grey); keeps the products having it (an unknown name is a 422)"
)


def check_colour(value: str | None) -> str | None:
    """The palette's name of a colour filter (None or blank: no filter); an unknown name raises
    ValueError."""
    from components.retrieval.colours import colour_name

    return colour_name(value) if value else None


class RecommendRequest(BaseModel):
    history: list[str] = Field(min_length=1, max_length=1000)
    k: int = Field(10, ge=1, le=100)
    diversify: bool = False


class TextQuery(BaseModel):
    # a blank query is a 400 (bentos/service.py); the pattern says so in the contract
    query: str = Field(min_length=1, max_length=200, json_schema_extra={"pattern": r"\S"})
    k: int = Field(10, ge=1, le=100)
    category: str | None = Field(None, description="Only products of this category")
    group: str | None = Field(None, description="Only products of this group")
    colour: str | None = Field(None, description=COLOUR_HELP, examples=["red"])

    @field_validator("category", "group")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None  # as in the form of /search: a blank filter is no filter

    @field_validator("colour")
    @classmethod
    def _known_colour(cls, value: str | None) -> str | None:
        return check_colour(value)


def image_url(product_id: str) -> str:
    return f"/products/{quote(product_id, safe='')}/image"


class Hit(BaseModel):
    product_id: str
    score: float
    category: str
    group: str
    title: str | None
    image_url: str
    colours: list[str] = Field(default_factory=list, description="The product's colour names")

    @classmethod
    def of(cls, hit: Any) -> Hit:  # a components.retrieval.index.Hit
        return cls(
            product_id=hit.product_id,
            score=round(float(hit.score), 6),
            category=hit.category,
            group=hit.group,
            title=hit.title,
            image_url=image_url(hit.product_id),
            colours=list(getattr(hit, "colours", ())),
        )


class Filters(BaseModel):
    category: str | None
    group: str | None
    colour: str | None = None


class Versioned(BaseModel):
    model_version: str


class Probability(BaseModel):
    category: str
    probability: float


class ClassifyResponse(Versioned):
    category: str
    confidence: float
    top: list[Probability]

    @classmethod
    def of(cls, version: str, r: Any, categories: list[str]) -> ClassifyResponse:
        top = r.top(categories)
        return cls(
            model_version=version, category=r.category, confidence=round(r.confidence, 6), top=top
        )


class Tag(BaseModel):
    value: str | None
    score: float


class NeighbourTag(Tag):
    agrees: bool
    k: int


class ColourTag(BaseModel):
    value: str = Field(description="A palette colour name (black, grey, white, red, navy, ...)")
    score: float = Field(description="Its share of the located product's pixels, 0..1")


class Tags(BaseModel):
    category: Tag
    group: Tag
    shade: Tag
    neighbours: NeighbourTag
    colours: list[ColourTag] = Field(
        default_factory=list,
        description="The product's dominant colours (not the background's), best first: "
        "each with at least 15% of its pixels, at most 3; grayscale photos give black/grey/white",
    )


class TagsResponse(Versioned):
    tags: Tags


class QueryPhoto(BaseModel):
    category: str
    confidence: float
    box: list[float] | None = Field(
        None,
        description="detect=true: the detected product that was searched, [x0, y0, x1, y1] in "
        "the photo's pixels (null: the whole photo)",
    )


class SearchResponse(Versioned):
    k: int
    filters: Filters
    query: QueryPhoto
    results: list[Hit]

    @classmethod
    def of(
        cls, version: str, k: int, filters: Filters, r: Any, hits: list, box: Any = None
    ) -> SearchResponse:
        query = QueryPhoto(
            category=r.category,
            confidence=round(r.confidence, 6),
            box=None if box is None else [round(float(v), 1) for v in box],
        )
        results = [Hit.of(h) for h in hits]
        return cls(model_version=version, k=k, filters=filters, query=query, results=results)


class DetectedItem(BaseModel):
    box: list[float] = Field(description="[x0, y0, x1, y1] in the uploaded photo's pixels")
    score: float = Field(description="The box's score times the category's probability")
    category: str
    confidence: float = Field(description="The category's probability for the item's crop")
    colours: list[ColourTag] = Field(default_factory=list, description="The item's colours")
    results: list[Hit] = Field(description="The item's most similar products, best first")

    @classmethod
    def of(cls, item: Any, categories: list[str], colours: list, hits: list) -> DetectedItem:
        return cls(
            box=[round(float(v), 1) for v in item.box],
            score=round(float(item.score), 6),
            category=categories[item.category],
            confidence=round(float(item.confidence), 6),
            colours=[ColourTag(value=name, score=round(float(v), 4)) for name, v in colours],
            results=[Hit.of(h) for h in hits],
        )


class DetectResponse(Versioned):
    width: int
    height: int
    items: list[DetectedItem] = Field(
        description="The products found, best score first, after non-maximum suppression, at "
        "most detect.max_items"
    )


class TextSearchResponse(Versioned):
    query: str
    k: int
    filters: Filters
    results: list[Hit]
    text: str = Field(description="The text that was matched (the query without its colour word)")
    preferred_colour: str | None = Field(
        None,
        description="The colour word of the query whose products are ranked first; null when "
        "the query names none, a colour filter is set, or no product has that colour",
    )

    @classmethod
    def of(
        cls, version: str, query: str, k: int, filters: Filters, hits: list, text: str, colour=None
    ) -> TextSearchResponse:
        results = [Hit.of(h) for h in hits]
        return cls(
            model_version=version,
            query=query,
            k=k,
            filters=filters,
            results=results,
            text=text,
            preferred_colour=colour,
        )


class EmbedResponse(Versioned):
    dim: int
    embedding: list[float]


class RecommendResponse(Versioned):
    k: int
    diversify: bool
    results: list[Hit]

    @classmethod
    def of(cls, version: str, body: RecommendRequest, hits: list) -> RecommendResponse:
        results = [Hit.of(h) for h in hits]
        return cls(model_version=version, k=body.k, diversify=body.diversify, results=results)


class ProductResponse(Versioned):
    product: dict[str, str | int | float | bool]

    @classmethod
    def of(cls, version: str, product_id: str, record: dict) -> ProductResponse:
        """The index's record of the product (scalars only), its group and its image's URL."""
        from components.retrieval.tags import group_of

        product = {k: v for k, v in record.items() if isinstance(v, str | int | float | bool)}
        product["group"] = group_of(str(record.get("category", "")))
        product["image_url"] = image_url(product_id)
        return cls(model_version=version, product=product)


class ExplainResponse(Versioned):
    """POST /explain as JSON (components/model/explain.py explanation_json)."""

    method: str
    category: str
    confidence: float
    region: dict[str, int]
    heatmap_png: str  # base64
    heatmap_size: dict[str, int]
    saliency: list[list[float]]  # over the model's square input, 0..1


def explain_answer(version: str, ex: Any, answer: str) -> ExplainResponse | Response:
    """The explanation as JSON, or (answer == "png") the heatmap PNG with its region in headers."""
    from components.model.explain import explanation_json

    if answer == "json":
        return ExplainResponse(model_version=version, **explanation_json(ex))
    headers = {
        "X-Model-Version": version,
        "X-Category": quote(ex.category),
        "X-Region": ",".join(str(ex.box[k]) for k in ("x0", "y0", "x1", "y1")),
    }
    return Response(ex.png, media_type="image/png", headers=headers)
