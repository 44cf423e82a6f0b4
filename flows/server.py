"""The Prefect server the schedules live on: where it is, and a fast check that it answers.

Every name here is shared by the deployments (flows/deployments.py) and the monitor's run
queries (flows/runs.py); neither imports the other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import httpx
from prefect.settings import PREFECT_API_URL, temporary_settings

from components.config import Params

DEPLOYMENT = "vitrine"  # every deployment's name: retrain/vitrine, monitor/vitrine, promote/vitrine


class PrefectUnavailable(RuntimeError):
    """The Prefect server the schedules live on does not answer."""


def api_url(params: Params) -> str:
    return os.environ.get("PREFECT_API_URL") or params.schedules.api_url


def check_server(url: str) -> None:
    """Fail fast with the command that starts the server, instead of Prefect's retries."""
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise PrefectUnavailable(
            f"no Prefect server answers at {url} ({type(exc).__name__}): start it with "
            "`vitrine ui` (or `make ui`), or point PREFECT_API_URL at a running one"
        ) from exc


@contextlib.contextmanager
def prefect_api(url: str) -> Iterator[None]:
    """Talk to the server at `url`, never to a temporary in-process one."""
    check_server(url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield
