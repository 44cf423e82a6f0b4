"""The service's JSON-lines logs: one class for the sampled request log (what monitoring
compares with the reference) and the A/B event log (components/serving/ab.py)."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np


class JsonlLog:
    """Append-only JSON lines, one file per UTC day: <folder>/<prefix>-YYYYMMDD.jsonl.
    Thread-safe; every record gets a `timestamp` (UTC, ISO 8601) first. With `on_error`, a
    failed write (a full disk, a read-only folder) is passed to it and the record dropped,
    instead of raising: the service answers shoppers whether or not its logs can be written."""

    def __init__(
        self, folder: Path, prefix: str, on_error: Callable[[str, OSError], None] | None = None
    ):
        self.folder, self.prefix, self.on_error = Path(folder), prefix, on_error
        self._lock = threading.Lock()

    def path_for(self, when: datetime) -> Path:
        return self.folder / f"{self.prefix}-{when:%Y%m%d}.jsonl"

    def append(self, record: dict) -> None:
        now = datetime.now(UTC)
        line = json.dumps({"timestamp": now.isoformat(), **record}) + "\n"
        try:
            with self._lock:
                self.folder.mkdir(parents=True, exist_ok=True)
                with self.path_for(now).open("a") as out:
                    out.write(line)
        except OSError as error:
            if self.on_error is None:
                raise
            self.on_error(self.prefix, error)

    def files(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[Path]:
        """The day files that may hold records in [since, until], oldest first."""
        first = since.strftime("%Y%m%d") if since else ""
        last = until.strftime("%Y%m%d") if until else "99999999"
        for path in sorted(self.folder.glob(f"{self.prefix}-*.jsonl")):
            day = path.stem.removeprefix(f"{self.prefix}-")
            if not day.isdigit() or first <= day <= last:
                yield path

    def read(self, since: datetime | None = None) -> list[dict]:
        """Every record (from `since` on), oldest file first; blank lines are skipped."""
        records = []
        for path in self.files(since):
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if since is None or datetime.fromisoformat(record["timestamp"]) >= since:
                        records.append(record)
        return records


class RequestLog:
    """The sampled request log: <folder>/requests-YYYYMMDD.jsonl, no raw images."""

    PREFIX = "requests"

    def __init__(
        self,
        folder: Path,
        sample_rate: float = 1.0,
        seed: int | None = None,
        on_error: Callable[[str, OSError], None] | None = None,
    ):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in 0..1, got {sample_rate}")
        self.log, self.sample_rate = JsonlLog(folder, self.PREFIX, on_error), sample_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def path_for(self, when: datetime) -> Path:
        return self.log.path_for(when)

    def write(
        self,
        endpoint: str,
        model_version: str,
        embedding: np.ndarray,
        category: str,
        confidence: float,
        stats: dict[str, float],
    ) -> bool:
        """Append one record if sampled; True when written."""
        with self._lock:
            if self.sample_rate < 1.0 and self._rng.random() >= self.sample_rate:
                return False
        self.log.append(
            {
                "model_version": model_version,
                "endpoint": endpoint,
                "category": category,
                "confidence": round(float(confidence), 6),
                **stats,
                "embedding": np.round(np.asarray(embedding, np.float64).ravel(), 6).tolist(),
            }
        )
        return True


def read_request_log(folder: Path) -> list[dict]:
    return JsonlLog(folder, RequestLog.PREFIX).read()
