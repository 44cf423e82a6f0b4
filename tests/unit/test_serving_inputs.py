"""components.serving without a server: upload decoding in every format and colour mode, the
refusals, the cache, the micro-batcher, the request log and the Prometheus text; the service's
OpenAPI contract and the checks of the image routes' fields (bentos/contract.py)."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from components.model.transforms import image_to_uint8
from components.serving.logs import RequestLog, read_request_log
from components.serving.metrics import ServingMetrics, endpoint_label
from components.serving.runtime import LRUCache, MicroBatcher
from components.serving.uploads import BadImage, UploadLimits, decode_upload, parse_k

LIMITS = UploadLimits()


@pytest.fixture(scope="module")
def product(fmnist) -> np.ndarray:
    """A real Fashion-MNIST product photo (28×28 grey), upscaled like a shop photo."""
    image = Image.fromarray(fmnist["test"][0][0]).resize((112, 112), Image.BILINEAR)
    return np.asarray(image)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def variants(grey: np.ndarray) -> dict[str, tuple[bytes, str, bool]]:
    """name -> (bytes, content type, lossless w.r.t. the grey original)."""
    L = Image.fromarray(grey)
    rgb = Image.merge("RGB", [L, L, L])
    rgba = rgb.copy()
    rgba.putalpha(255)
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit, same values scaled
    return {
        "png-L": (encode(L, "PNG"), "image/png", True),
        "png-RGB": (encode(rgb, "PNG"), "image/png", True),
        "png-RGBA": (encode(rgba, "PNG"), "image/png", True),
        "png-P": (encode(L.convert("P"), "PNG"), "image/png", True),
        "png-16bit": (encode(sixteen, "PNG"), "image/png", True),
        "bmp-L": (encode(L, "BMP"), "image/bmp", True),
        "gif-L": (encode(L, "GIF"), "image/gif", True),
        "webp-lossless": (encode(rgb, "WEBP", lossless=True), "image/webp", True),
        "webp-lossy": (encode(rgb, "WEBP", quality=90), "image/webp", False),
        "jpeg-L": (encode(L, "JPEG", quality=95), "image/jpeg", False),
        "jpeg-RGB": (encode(rgb, "JPEG", quality=95), "image/jpeg", False),
        "jpeg-CMYK": (encode(rgb.convert("CMYK"), "JPEG", quality=95), "image/jpeg", False),
        "png-as-octet-stream": (encode(L, "PNG"), "application/octet-stream", True),
        "png-no-content-type": (encode(L, "PNG"), None, True),
    }


def test_every_format_and_mode_decodes_to_the_training_pixels(product):
    expected = image_to_uint8(Image.fromarray(product), 28, 1).astype(int)
    for name, (data, ctype, lossless) in variants(product).items():
        image = decode_upload(data, ctype, LIMITS)
        assert image.size == (112, 112), name
        pixels = image_to_uint8(image, 28, 1).astype(int)
        diff = np.abs(pixels - expected)
        if lossless:
            assert diff.max() <= 1, name  # 16-bit → 8-bit and palette quantisation round
        else:
            assert diff.mean() < 3, (name, diff.mean())


def test_colour_model_input_is_three_channels(product):
    data, ctype, _ = variants(product)["jpeg-CMYK"]
    pixels = image_to_uint8(decode_upload(data, ctype, LIMITS), 64, 3)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8


def test_animated_gif_uses_the_first_frame(product):
    first, second = Image.fromarray(product), Image.fromarray(255 - product)
    buf = io.BytesIO()
    first.save(buf, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    image = decode_upload(buf.getvalue(), "image/gif", LIMITS)
    got = image_to_uint8(image, 28, 1).astype(int)
    assert np.abs(got - image_to_uint8(first, 28, 1).astype(int)).max() <= 1
    assert np.abs(got - image_to_uint8(second, 28, 1).astype(int)).mean() > 20


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width×height (a decompression bomb's shape)."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("empty", 400, "empty"),
        ("too-large", 413, "exceeds"),
        ("bomb", 413, "too many pixels"),
        ("truncated", 400, "truncated"),
        ("text-as-png", 415, "not a decodable"),
        ("tiff", 415, "not a decodable"),
        ("svg", 415, "not a decodable"),
        ("declared-text", 415, "content type"),
    ],
)
def test_bad_uploads_are_refused_with_a_status_and_message(product, name, status, message):
    png = encode(Image.fromarray(product), "PNG")
    cases = {
        "empty": (b"", "image/png"),
        "too-large": (png + b"\0" * LIMITS.max_bytes, "image/png"),
        "bomb": (png_claiming(30_000, 30_000), "image/png"),
        "truncated": (png[: len(png) // 2], "image/png"),
        "text-as-png": (b"this is not an image at all", "image/png"),
        "tiff": (encode(Image.fromarray(product), "TIFF"), None),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', None),
        "declared-text": (png, "text/plain"),
    }
    data, ctype = cases[name]
    with pytest.raises(BadImage, match=message) as refused:
        decode_upload(data, ctype, LIMITS)
    assert refused.value.status == status


def test_pixel_limit_is_configurable(product):
    data = encode(Image.fromarray(product), "PNG")  # 112×112
    assert decode_upload(data, "image/png", UploadLimits(max_pixels=112 * 112)).size == (112, 112)
    with pytest.raises(BadImage, match="too many pixels"):
        decode_upload(data, "image/png", UploadLimits(max_pixels=112 * 112 - 1))


def test_parse_k_and_endpoint_labels():
    assert parse_k("7") == 7 and parse_k(100) == 100
    for bad in (0, 101, "abc", "", None, "2.5"):
        with pytest.raises(ValueError, match="k must be"):
            parse_k(bad)
    assert endpoint_label("/products/p-1/image") == "/products/{id}/image"
    assert endpoint_label("/products/anything") == "/products/{id}"
    assert endpoint_label("/search") == "/search" and endpoint_label("/x/y") == "other"


def test_lru_cache_evicts_the_least_recent_and_counts():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert (cache.hits, cache.misses, len(cache)) == (3, 1, 2)


def test_micro_batcher_groups_concurrent_calls_and_keeps_order():
    sizes: list[int] = []

    def slow_double(items: list[int]) -> list[int]:
        time.sleep(0.02)
        return [2 * x for x in items]

    batcher = MicroBatcher(slow_double, max_batch_size=8, on_batch=sizes.append)
    results: dict[int, int] = {}

    def call(x: int) -> None:
        results[x] = batcher.submit(x).result(timeout=10)

    threads = [threading.Thread(target=call, args=(x,)) for x in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert results == {x: 2 * x for x in range(40)}
    assert sum(sizes) == 40 and max(sizes) > 1 and max(sizes) <= 8


def test_micro_batcher_fails_every_caller_of_a_failing_batch():
    def boom(items: list[int]) -> list[int]:
        raise RuntimeError("model exploded")

    batcher = MicroBatcher(boom)
    futures = [batcher.submit(i) for i in range(3)]
    for future in futures:
        with pytest.raises(RuntimeError, match="exploded"):
            future.result(timeout=5)
    assert batcher.submit(1).exception(timeout=5) is not None  # the worker survived
    batcher.close()


def test_micro_batcher_runs_a_lone_call_in_the_callers_thread_and_batches_under_load():
    threads_seen: list[tuple[int, int]] = []  # (thread, batch size) of each model call
    release = threading.Event()

    def record(items: list[int]) -> list[int]:
        threads_seen.append((threading.get_ident(), len(items)))
        if items[0] == 0:
            release.wait(5)  # the first call holds the model while others arrive
        return [x + 1 for x in items]

    batcher = MicroBatcher(record, max_batch_size=8)
    assert batcher.run(41) == 42 and threads_seen == [(threading.get_ident(), 1)]  # idle: here
    threads_seen.clear()
    results: dict[int, int] = {}
    first = threading.Thread(target=lambda: results.update({0: batcher.run(0)}))
    first.start()
    while not threads_seen:  # the lone first call is running (inline, in its own thread)
        time.sleep(0.001)
    others = [
        threading.Thread(target=lambda x=x: results.update({x: batcher.run(x)})) for x in (1, 2, 3)
    ]
    for t in others:
        t.start()
    while batcher._queue.qsize() < 3 and len(threads_seen) < 2:  # queued behind the busy one
        time.sleep(0.001)
    time.sleep(0.05)
    release.set()
    for t in [first, *others]:
        t.join(timeout=10)
    batcher.close()
    assert results == {0: 1, 1: 2, 2: 3, 3: 4}
    assert threads_seen[0][0] == first.ident  # the lone call ran in its caller's thread
    later = threads_seen[1:]
    assert sum(size for _, size in later) == 3 and len({ident for ident, _ in later}) == 1
    assert later[0][0] not in {t.ident for t in others}  # those were the batcher's work


def test_request_log_writes_sampled_records_without_images(tmp_path):
    stats = {"width": 112, "height": 90, "brightness": 0.4, "contrast": 0.2}
    full = RequestLog(tmp_path / "all", 1.0)
    emb = np.linspace(-1, 1, 8, dtype=np.float32)
    for _ in range(5):
        assert full.write("/search", "3", emb, "Bag", 0.91, stats)
    records = read_request_log(tmp_path / "all")
    assert len(records) == 5
    record = records[0]
    assert set(record) == {
        "timestamp",
        "model_version",
        "endpoint",
        "category",
        "confidence",
        "width",
        "height",
        "brightness",
        "contrast",
        "embedding",
    }
    assert record["model_version"] == "3" and record["endpoint"] == "/search"
    assert np.allclose(record["embedding"], emb, atol=1e-6)
    sampled = RequestLog(tmp_path / "some", 0.3, seed=0)
    written = sum(sampled.write("/tags", "3", emb, "Bag", 0.5, stats) for _ in range(1000))
    assert 230 <= written <= 370
    assert len(read_request_log(tmp_path / "some")) == written
    none = RequestLog(tmp_path / "none", 0.0)
    assert not any(none.write("/tags", "3", emb, "Bag", 0.5, stats) for _ in range(50))
    with pytest.raises(ValueError, match="sample rate"):
        RequestLog(tmp_path, 1.5)


def test_metrics_text_counts_requests_errors_latency_batches_and_cache():
    metrics = ServingMetrics()
    metrics.observe_request("/search", 200, 0.012)
    metrics.observe_request("/search", 200, 0.3)
    metrics.observe_request("/search", 415, 0.001)
    metrics.batch_size.observe(5)
    metrics.cache.labels("hit").inc()
    metrics.set_model_version("1")
    metrics.set_model_version("2", previous="1")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert samples[("vitrine_requests_total", (("endpoint", "/search"), ("status", "200")))] == 2
    assert (
        samples[("vitrine_request_errors_total", (("endpoint", "/search"), ("kind", "client")))]
        == 1
    )
    bucket = ("vitrine_request_latency_seconds_bucket", (("endpoint", "/search"), ("le", "0.015")))
    assert samples[bucket] == 2  # 0.001 and 0.012
    assert samples[("vitrine_model_batch_size_sum", ())] == 5
    assert samples[("vitrine_cache_lookups_total", (("result", "hit"),))] == 1
    assert samples[("vitrine_model_info", (("version", "2"),))] == 1
    assert samples[("vitrine_model_info", (("version", "1"),))] == 0


def test_call_threads_reach_faiss_in_every_worker_thread():
    import os

    import faiss
    import torch

    from components.serving import runtime as serving

    before = (serving.CALL_THREADS[0], torch.get_num_threads(), faiss.omp_get_max_threads())
    seen: dict[str, int] = {}

    def worker() -> None:
        seen["pinned"] = serving.in_call_thread(faiss.omp_get_max_threads)

    try:
        serving.set_call_threads(1)
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        # OpenMP's count is per thread: a new thread would get every core without the pin
        assert seen["pinned"] == 1 and torch.get_num_threads() == 1
        assert os.cpu_count() == 1 or faiss.omp_get_max_threads() == 1
    finally:
        serving.CALL_THREADS[0] = before[0]
        torch.set_num_threads(before[1])
        faiss.omp_set_num_threads(before[2])


def test_settle_heap_freezes_what_is_alive():
    import gc

    from components.serving.runtime import settle_heap

    alive = [{"record": i} for i in range(1000)]
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(alive)
    finally:
        gc.unfreeze()


CATEGORIES = ["Dress", "Hat"]  # "Hat": a catalogue's own category beside the known ones


def test_the_contract_completes_fastapis_schema_with_filters_probes_and_the_admin_token():
    from fastapi import FastAPI

    import bentos.service  # noqa: F401  (registers the routes)
    from bentos.contract import PROBES, complete_contract
    from bentos.http import app

    spec = complete_contract(FastAPI.openapi(app), CATEGORIES)
    search = spec["paths"]["/search"]["post"]
    form = search["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["minLength"] == 1
    categories = form["properties"]["category"]["enum"]
    assert categories[:3] == ["", "Dress", "Hat"] and "Ankle boot" in categories
    query = {p["name"]: p["schema"] for p in search["parameters"]}
    assert set(query) == {"k", "category", "group", "colour", "detect"}
    assert query["colour"]["enum"] == form["properties"]["colour"]["enum"]
    assert {"", "navy", "gray"} <= set(query["colour"]["enum"])
    text = spec["components"]["schemas"]["TextQuery"]["properties"]
    assert text["group"]["anyOf"] == [
        {
            "type": "string",
            "enum": ["", "bags", "bottoms", "dresses", "footwear", "other", "outerwear", "tops"],
        },
        {"type": "null"},
    ]
    assert set(PROBES) <= set(spec["paths"])
    assert spec["paths"]["/admin/reload"]["post"]["security"] == [{"adminToken": []}]
    assert spec["components"]["securitySchemes"]["adminToken"]["name"] == "X-Admin-Token"
    invalid = spec["paths"]["/products/{product_id}"]["get"]["responses"]["422"]["content"]
    assert invalid["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    image = spec["paths"]["/products/{product_id}/image"]["get"]["responses"]["200"]["content"]
    assert "image/png" in image and "application/json" not in image


def test_image_route_fields_are_single_values_and_each_one_given_is_checked():
    from bentos.contract import explain_format, search_fields
    from bentos.http import ApiError, given_once

    assert search_fields({}, CATEGORIES) == (10, {"category": None, "group": None, "colour": None})
    query_then_form = {"k": ["3", "5"], "group": ["", "TOPS"], "colour": ["Gray"]}
    chosen = {"category": None, "group": "TOPS", "colour": "grey"}
    assert search_fields(query_then_form, CATEGORIES) == (5, chosen)  # the form's wins
    refused = [
        ({"k": ["101", "5"]}, 400),  # a bad query value under a good form value
        ({"category": ["Hats"]}, 400),
        ({"group": [" "]}, 400),
        ({"colour": ["red", "chartreuse"]}, 422),
    ]
    for fields, status in refused:
        with pytest.raises(ApiError) as raised:
            search_fields(fields, CATEGORIES)
        assert raised.value.status == status, fields
    assert given_once([("k", "1"), ("x", "a"), ("x", "b")], ("k",), "form") == {"k": ["1"]}
    for items in ([("k", "1"), ("k", "2")], [("k", object())]):  # repeated; a file, not text
        with pytest.raises(ApiError, match="once, as text"):
            given_once(items, ("k",), "form")
    assert explain_format({}) == "json" and explain_format({"format": ["json", "png"]}) == "png"
    with pytest.raises(ApiError, match="json or png"):
        explain_format({"format": ["PNG"]})
