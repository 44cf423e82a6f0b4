"""`vitrine simulate`: send real (shifted) requests to the running service, concurrently.

The service logs a sample of them (serving.sample_rate) into its request log, which is what
`vitrine drift` compares with the champion's reference.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx


class ServiceUnavailable(RuntimeError):
    """No vitrine service answers at the URL."""


def check_service(client: httpx.Client, url: str) -> str:
    """The served model version, or ServiceUnavailable naming the command that starts it."""
    try:
        response = client.get("/readyz", timeout=5)
    except httpx.HTTPError as error:
        raise ServiceUnavailable(
            f"no vitrine service at {url} ({type(error).__name__}): start it with `make serve` "
            "(or `vitrine serve`)"
        ) from error
    if response.status_code != 200:
        raise ServiceUnavailable(f"the service at {url} is not ready: {response.text[:300]}")
    return str(response.json().get("model_version"))


def send_requests(
    url: str,
    payloads: list[bytes],
    endpoint: str = "/classify",
    concurrency: int = 8,
    timeout: float = 60.0,
) -> dict:
    """POST each payload as the multipart field `image`; counts by HTTP status."""
    statuses: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=timeout) as client:
        served = check_service(client, url)

        def post(data: bytes) -> None:
            try:
                response = client.post(
                    endpoint, files={"image": ("request.png", data, "image/png")}
                )
            except httpx.HTTPError as error:
                statuses[type(error).__name__] += 1
                return
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                versions[str(response.json().get("model_version"))] += 1

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            list(pool.map(post, payloads))
        seconds = time.perf_counter() - started
    ok = statuses.get("200", 0)
    return {
        "url": url,
        "endpoint": endpoint,
        "sent": len(payloads),
        "ok": ok,
        "errors": len(payloads) - ok,
        "statuses": dict(statuses),
        "model_versions": dict(versions) or {served: 0},
        "seconds": round(seconds, 2),
    }
