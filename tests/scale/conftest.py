"""What the scale tests share: a PostgreSQL cluster of their own (Debian's initdb + pg_ctl, on
a free loopback port, as a non-root user), started and stopped by the test."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.serving.conftest import free_port


def postgres_bin() -> Path:
    """The folder of initdb and pg_ctl: Debian keeps them off PATH, in
    /usr/lib/postgresql/<major>/bin (`make postgres` installs the package)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    folders = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if not folders:
        raise RuntimeError("PostgreSQL's initdb is not installed: `make postgres`")
    return Path(folders[-1]).parent


def run_as(user: str | None, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`command` as `user` (PostgreSQL refuses to run as root), or as ourselves."""
    return subprocess.run(command, user=user, check=True, capture_output=True, text=True, **kwargs)


@contextmanager
def postgres_cluster(database: str = "mlflow") -> Iterator[str]:
    """A new cluster with `database` in it, on 127.0.0.1 and a free port; yields its
    SQLAlchemy URL (postgresql://vitrine@127.0.0.1:PORT/DATABASE, trust auth on loopback)."""
    bin_dir = postgres_bin()
    user = "postgres" if os.geteuid() == 0 else None  # Debian's package creates the account
    # under /tmp, not pytest's tmp_path: root's pytest folders are 0700, closed to `postgres`
    folder = Path(tempfile.mkdtemp(prefix="vitrine-postgres-"))
    if user:
        shutil.chown(folder, user)
    data, log = folder / "data", folder / "server.log"
    port = free_port()
    run_as(user, [str(bin_dir / "initdb"), "-D", str(data), "-U", "vitrine", "-A", "trust"])
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options]
    try:
        run_as(user, start + ["-w", "-t", "60", "start"])
        psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "vitrine", "-d", "postgres"]
        subprocess.run(
            psql + ["-c", f"CREATE DATABASE {database}"], check=True, capture_output=True
        )
        yield f"postgresql://vitrine@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            user=user,
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


def query(url: str, sql: str) -> list[tuple[str, ...]]:
    """Rows of `sql` run by psql on the cluster at `url` (postgresql://USER@HOST:PORT/DB)."""
    from sqlalchemy.engine import make_url

    at = make_url(url)
    where = ["-h", at.host, "-p", str(at.port), "-U", at.username, "-d", at.database]
    done = subprocess.run(
        ["psql", *where, "-At", "-F", "\t", "-c", sql], check=True, capture_output=True, text=True
    )
    return [tuple(line.split("\t")) for line in done.stdout.splitlines() if line]
