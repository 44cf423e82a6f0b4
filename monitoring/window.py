"""The request-log window a drift check compares: the champion's logged requests between two
times (other versions' rows and unreadable lines counted, not used), and `--since` parsing."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from components.serving.logs import JsonlLog, RequestLog
from monitoring import detect

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class DriftError(RuntimeError):
    """A drift check that cannot run; the message says why and what to do."""


@dataclass
class Window:
    rows: pd.DataFrame  # the champion's requests: category, confidence, image statistics
    emb: np.ndarray
    since: datetime
    until: datetime
    other_versions: dict[str, int]  # requests answered by other versions: excluded, counted
    malformed: int  # unreadable log lines, counted


def parse_since(text: str, now: datetime) -> datetime:
    """'90m', '1h', '2d', '1w' before `now`, or an ISO time (UTC when it has no zone)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        return now - timedelta(seconds=float(match[1]) * UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a duration like 30m, 1h, 2d or an ISO time "
            "like 2026-11-22T07:00"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def read_window(folder: Path, version: str, since: datetime, until: datetime) -> Window:
    """The champion's logged requests in [since, until]; other versions' rows are excluded."""
    rows, emb, others, malformed = [], [], {}, 0
    for path in JsonlLog(folder, RequestLog.PREFIX).files(since, until):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                when = datetime.fromisoformat(record["timestamp"])
                if not since <= when <= until:
                    continue
                if str(record["model_version"]) != version:
                    others[str(record["model_version"])] = (
                        others.get(str(record["model_version"]), 0) + 1
                    )
                    continue
                record.setdefault("aspect", record["width"] / record["height"])
                row = {k: record[k] for k in ("category", *detect.NUMERIC)}
                row["endpoint"] = record.get("endpoint")
                for name in detect.DETECTED:  # /detect's records only
                    row[name] = float(record.get(name, "nan"))
                vector = np.asarray(record["embedding"], dtype=np.float32)
            except (ValueError, KeyError, TypeError, ZeroDivisionError):
                malformed += line.strip() != ""
                continue
            rows.append(row)
            emb.append(vector)
    frame = pd.DataFrame(rows, columns=["category", *detect.NUMERIC, "endpoint", *detect.DETECTED])
    dims = {len(v) for v in emb}
    if len(dims) > 1:
        raise DriftError(f"the log holds embeddings of sizes {sorted(dims)} for version {version}")
    matrix = np.stack(emb) if emb else np.zeros((0, 0), np.float32)
    return Window(frame, matrix, since, until, others, malformed)
