"""A real Synapse homeserver on 127.0.0.1 with SQLite, for tests and the local stack."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import subprocess
import urllib.request
from pathlib import Path

from .procs import REPO, free_port, start_server, stop_process

SERVER_NAME = "localhost"

# Limits high enough that tests never meet them; a test of rate limiting passes its own.
RAISED_LIMITS = {
    name: {"per_second": 10000, "burst_count": 10000}
    for name in (
        "rc_message",
        "rc_registration",
        "rc_admin_redaction",
        "rc_3pid_validation",
        "rc_joins_per_room",
        "rc_presence",
        "rc_room_creation",
        "rc_reports",
        "rc_delayed_event_mgmt",
        "rc_sending_invites",
        "rc_send_knock",
        "rc_media_create",
    )
}
RAISED_LIMITS["rc_login"] = {
    key: {"per_second": 10000, "burst_count": 10000}
    for key in ("address", "account", "failed_attempts")
}
RAISED_LIMITS["rc_joins"] = {
    key: {"per_second": 10000, "burst_count": 10000} for key in ("local", "remote")
}
RAISED_LIMITS["rc_invites"] = {
    key: {"per_second": 10000, "burst_count": 10000}
    for key in ("per_room", "per_user", "per_issuer")
}


def synapse_python() -> str:
    return os.environ.get("LAMBDA_SYNAPSE_PYTHON") or str(REPO / ".venvs/synapse/bin/python")


class Synapse:
    def __init__(
        self, state_dir: Path, port: int | None = None, limits: dict | None = None
    ) -> None:
        self.dir = state_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.limits = RAISED_LIMITS if limits is None else limits
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "synapse.log"
        self.config_path = self.dir / "homeserver.yaml"
        self.secret_path = self.dir / "registration_secret"

    @property
    def shared_secret(self) -> str:
        return self.secret_path.read_text().strip()

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.secret_path.exists():
            self.secret_path.write_text(secrets.token_hex(24))
        log_config = self.dir / "log.yaml"
        log_config.write_text(
            json.dumps(
                {
                    "version": 1,
                    "formatters": {
                        "f": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
                    },
                    "handlers": {
                        "file": {
                            "class": "logging.FileHandler",
                            "formatter": "f",
                            "filename": str(self.dir / "homeserver.log"),
                        }
                    },
                    "root": {"level": "INFO", "handlers": ["file"]},
                    "disable_existing_loggers": False,
                }
            )
        )
        config = {
            "server_name": SERVER_NAME,
            "pid_file": str(self.dir / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(self.dir / "homeserver.db")}},
            "log_config": str(log_config),
            "media_store_path": str(self.dir / "media"),
            "signing_key_path": str(self.dir / "signing.key"),
            "registration_shared_secret": self.shared_secret,
            "macaroon_secret_key": self.shared_secret + "m",
            "form_secret": self.shared_secret + "f",
            "report_stats": False,
            "enable_metrics": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "public_baseurl": self.url + "/",
            "max_upload_size": "100M",
            "url_preview_enabled": False,
            "presence": {"enabled": False},
            **self.limits,
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        self._write_config()
        py = synapse_python()
        if not (self.dir / "signing.key").exists():
            subprocess.run(
                [
                    py,
                    "-m",
                    "synapse.app.homeserver",
                    "-c",
                    str(self.config_path),
                    "--generate-keys",
                ],
                check=True,
                cwd=self.dir,
                capture_output=True,
            )
        self.proc = start_server(
            [py, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            self.log,
            self.dir,
            ready_url=self.url + "/_matrix/client/versions",
            what="synapse",
            log=self.dir / "homeserver.log",
        )

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def register(self, localpart: str, password: str, admin: bool = False) -> str:
        """Registers a user with the shared secret (Synapse's admin API); returns its id."""
        endpoint = self.url + "/_synapse/admin/v1/register"
        with urllib.request.urlopen(endpoint, timeout=30) as resp:
            nonce = json.load(resp)["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [
                    nonce.encode(),
                    localpart.encode(),
                    password.encode(),
                    b"admin" if admin else b"notadmin",
                ]
            )
        )
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        req = urllib.request.Request(
            endpoint, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)["user_id"]

    def login(self, user_id: str, password: str) -> dict:
        """Password login; returns the response (user_id, access_token, device_id)."""
        body = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": password,
        }
        req = urllib.request.Request(
            self.url + "/_matrix/client/v3/login",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)
