"""Data versioning with DVC: data/ is tracked by data.dvc and pushed to a local remote.

DVC is driven through its CLI (the supported interface); the data version is the md5 that
DVC records for the data/ folder in data.dvc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from components.config import TELEMETRY_OFF

REMOTE_NAME = "vitrine-local"


class DataVersionError(RuntimeError):
    """DVC could not track or push the catalogue."""


def _dvc(repo: Path, *args: str) -> str:
    exe = Path(sys.executable).with_name("dvc")
    cmd = [str(exe) if exe.exists() else (shutil.which("dvc") or "dvc"), *args]
    env = {**os.environ, **TELEMETRY_OFF}
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise DataVersionError(f"`dvc {' '.join(args)}` failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def ensure_dvc(repo: Path, remote_dir: Path) -> None:
    """`dvc init` when needed and point the default remote at a local folder (per machine)."""
    if not (repo / ".dvc").is_dir():
        _dvc(repo, "init", "-q")
        _dvc(repo, "config", "core.check_update", "false")
        _dvc(repo, "config", "core.analytics", "false")
    remote_dir.mkdir(parents=True, exist_ok=True)
    _dvc(repo, "remote", "add", "--local", "-d", "-f", REMOTE_NAME, str(remote_dir))


def read_data_version(repo: Path, target: str = "data") -> str | None:
    """The md5 DVC recorded for `target` in `<target>.dvc`, or None when it is not tracked."""
    dvc_file = repo / f"{target}.dvc"
    if not dvc_file.exists():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    md5 = outs[0].get("md5")
    return md5.removesuffix(".dir") if md5 else None


def track_data(repo: Path, remote_dir: Path, target: str = "data") -> str:
    """`dvc add` the data folder, push it to the local remote; return the data version."""
    ensure_dvc(repo, remote_dir)
    _dvc(repo, "add", "-q", target)
    _dvc(repo, "push", "-q", "-r", REMOTE_NAME, f"{target}.dvc")
    version = read_data_version(repo, target)
    if version is None:
        raise DataVersionError(f"dvc add {target} left no {target}.dvc")
    return version
