"""Accounts on the MLflow tracking server that `vitrine ui` runs with MLflow's authentication
app (`mlflow server --app-name basic-auth`).

Everything lives in the state folder's auth/ (mode 0700): the app's config (basic_auth.ini),
its user database (auth.db) and admin.json (mode 0600), the admin credentials made on the first
start. Anonymous calls to the UI or the API get a 401. Every account may read (the config's
default_permission READ); an owner's account also holds EDIT on the registered model, which is
what setting a version tag (`approved_by`) or an alias needs, so any other account gets a 403
when it tries. Deleting a tag or an alias needs MANAGE, which only the admin holds.

The calls go to the server's REST API with the admin's HTTP Basic credentials (`requests`, the
routes of mlflow.server.auth.routes), so that nothing here sets MLflow's process-wide
MLFLOW_TRACKING_USERNAME / PASSWORD.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import requests

ADMIN = "admin"
OWNER_PERMISSION = "EDIT"  # set tags and aliases on the model; deleting them needs MANAGE
CREATE_USER = "/api/2.0/mlflow/users/create"
GET_USER = "/api/2.0/mlflow/users/get"
GRANT = "/api/3.0/mlflow/users/permissions/grant"
GET_PERMISSION = "/api/3.0/mlflow/users/permissions/get"
MIN_PASSWORD = 12  # MLflow's own password policy
AUTH_CACHE_SECONDS = 60  # MLflow's cache of checked credentials (basic_auth.ini)


class AccountsError(RuntimeError):
    """The accounts cannot be set up or changed; the message says why (one line)."""


@dataclass(frozen=True)
class AuthSetup:
    folder: Path
    config: Path  # MLFLOW_AUTH_CONFIG_PATH
    admin_file: Path  # {"username", "password", "secret_key"}, mode 0600
    created: bool  # the admin credentials were made by this call (the first start)

    def server_env(self) -> dict[str, str]:
        """What `mlflow server --app-name basic-auth` needs in its environment."""
        admin = read_admin(self.admin_file)
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.config),
            # used only while auth.db has no admin yet (the first start); later ignored
            "MLFLOW_AUTH_ADMIN_USERNAME": admin["username"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin["password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": admin["secret_key"],  # the CSRF token key
        }


def prepare_auth(folder: Path) -> AuthSetup:
    """The auth config and, on the first start, the admin credentials (mode 0600)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    admin_file, database = folder / "admin.json", folder / "auth.db"
    created = False
    if not admin_file.exists():
        if database.exists():
            raise AccountsError(
                f"{database} holds accounts but the admin credentials {admin_file} are gone: "
                f"restore the file, or remove {folder} to start over with new accounts"
            )
        write_private(
            admin_file,
            {
                "username": ADMIN,
                "password": secrets.token_urlsafe(24),
                "secret_key": secrets.token_hex(32),
            },
        )
        created = True
    config = folder / "basic_auth.ini"
    config.write_text(
        "# written by `vitrine ui` (components/release/accounts.py) at every start\n"
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{database}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each call's password check is a scrypt hash (110 ms here): uncached, every request
        # of a registration or of the service's poll paid it. A checked credential is reused
        # for 60 s; a password changed through the API is dropped at once (one worker).
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )
    return AuthSetup(folder, config, admin_file, created)


def write_private(path: Path, data: dict) -> None:
    """JSON readable by its owner only: created 0600, never world-readable for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=2)
        out.write("\n")


def read_admin(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise AccountsError(
            f"no admin credentials at {path}: start `vitrine ui` once ({exc.strerror})"
        ) from None


def record_url(folder: Path, url: str) -> None:
    """Where `vitrine ui` serves MLflow, for `vitrine users add` without --url."""
    (folder / "url").write_text(url + "\n")


def recorded_url(folder: Path) -> str | None:
    with contextlib.suppress(OSError):
        return (folder / "url").read_text().strip() or None
    return None


class AccountsClient:
    """The admin's calls to a running server: create users, grant the owner's permission."""

    def __init__(self, url: str, admin_file: Path, timeout: float = 30.0):
        admin = read_admin(admin_file)
        self.url = url.rstrip("/")
        self.admin_file = admin_file
        self.auth = (admin["username"], admin["password"])
        self.timeout = timeout

    def _call(self, method: str, route: str, **kwargs) -> requests.Response:
        try:
            response = requests.request(
                method, self.url + route, auth=self.auth, timeout=self.timeout, **kwargs
            )
        except requests.RequestException as exc:
            raise AccountsError(
                f"no MLflow server answers at {self.url} ({type(exc).__name__}): start it with "
                "`vitrine ui` (or pass --url)"
            ) from None
        if response.status_code == 401:
            raise AccountsError(
                f"{self.url} refused the admin credentials in {self.admin_file} (401): is it "
                "the server `vitrine ui` started over this state folder?"
            )
        return response

    def user_exists(self, name: str) -> bool:
        response = self._call("GET", GET_USER, params={"username": name})
        if response.status_code == 404:
            return False
        self._check(response, f"look up user {name!r}")
        return True

    def create_user(self, name: str, password: str) -> None:
        if len(password) < MIN_PASSWORD:
            raise AccountsError(f"a password needs at least {MIN_PASSWORD} characters")
        response = self._call("POST", CREATE_USER, json={"username": name, "password": password})
        self._check(response, f"create user {name!r}")

    def permission(self, name: str, model: str) -> str:
        """The account's effective permission on the registered model (READ, EDIT, ...)."""
        params = {"username": name, "resource_type": "registered_model", "resource_id": model}
        response = self._call("GET", GET_PERMISSION, params=params)
        self._check(response, f"read {name!r}'s permission on {model}")
        return response.json()["permission"]

    def grant_owner(self, name: str, model: str) -> None:
        """EDIT on the registered model: the account may set `approved_by` (and aliases)."""
        if self.permission(name, model) in (OWNER_PERMISSION, "MANAGE"):
            return
        body = {
            "username": name,
            "resource_type": "registered_model",
            "resource_id": model,
            "permission": OWNER_PERMISSION,
        }
        self._check(self._call("POST", GRANT, json=body), f"grant {name!r} EDIT on {model}")

    @staticmethod
    def _check(response: requests.Response, what: str) -> None:
        if response.ok:
            return
        try:
            message = response.json().get("message", "")
        except ValueError:
            message = response.text
        raise AccountsError(f"cannot {what}: {response.status_code} {message[:200]}")
