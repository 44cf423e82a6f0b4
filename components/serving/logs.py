"""The sampled request log (JSONL, one file per day) that monitoring compares with the reference."""

from __future__ import annotations

import json
import random
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np


class RequestLog:
    """Sampled JSON-lines request log: <folder>/requests-YYYYMMDD.jsonl, no raw images."""

    def __init__(self, folder: Path, sample_rate: float = 1.0, seed: int | None = None):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in 0..1, got {sample_rate}")
        self.folder, self.sample_rate = Path(folder), sample_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def path_for(self, when: datetime) -> Path:
        return self.folder / f"requests-{when:%Y%m%d}.jsonl"

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
            now = datetime.now(UTC)
            record = {
                "timestamp": now.isoformat(),
                "model_version": model_version,
                "endpoint": endpoint,
                "category": category,
                "confidence": round(float(confidence), 6),
                **stats,
                "embedding": [round(float(v), 6) for v in np.asarray(embedding).ravel()],
            }
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.path_for(now).open("a") as out:
                out.write(json.dumps(record) + "\n")
            return True


def read_request_log(folder: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(Path(folder).glob("requests-*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
