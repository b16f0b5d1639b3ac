"""A real maubot server, and its management API used exactly as the admin UI uses it."""

from __future__ import annotations

import asyncio
import atexit
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from ruamel.yaml import YAML

from .procs import REPO, free_port, kill_process, start_server, stop_process

API = "/_matrix/maubot/v1"
PLUGIN_ID = "ai.lambda.matrix"


def maubot_python() -> str:
    return os.environ.get("LAMBDA_MAUBOT_PYTHON") or sys.executable


@functools.cache
def build_mbp() -> Path:
    """Runs build.sh, as an operator would, once per process, and returns a private copy of
    the .mbp it printed (so later edits or builds never change what this process uploads)."""
    out = subprocess.run(
        [str(REPO / "build.sh")], check=True, capture_output=True, text=True, cwd=REPO
    )
    built = Path(out.stdout.strip().splitlines()[-1])
    folder = tempfile.mkdtemp(prefix="lambda-mbp-")
    atexit.register(shutil.rmtree, folder, True)
    copy = Path(folder) / built.name
    shutil.copyfile(built, copy)
    return copy


class ManagementError(RuntimeError):
    def __init__(self, message: str, status: int = 0, errcode: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode


@dataclass(frozen=True)
class CryptoStatus:
    """Whether maubot end-to-end encrypts for a client, as its management API reports it: a
    client with crypto has an Olm account, whose fingerprint the API shows."""

    on: bool
    device_id: str | None = None
    fingerprint: str | None = None
    reason: str = ""  # why it is off

    def describe(self) -> str:
        if self.on:
            return f"on (device {self.device_id}, fingerprint {self.fingerprint})"
        return f"off: {self.reason}"


@dataclass(frozen=True)
class CrossSigning:
    """Whether the bot's device is cross-signed (signed by its account's self-signing key),
    and where its recovery key is kept: the key itself is never printed nor logged."""

    signed: bool
    how: str  # what was done, or why it is not signed
    key_file: Path

    def describe(self) -> str:
        where = f"recovery key in {self.key_file}" if self.key_file.exists() else "no recovery key kept"
        return f"{'yes' if self.signed else 'NO'}, {self.how} ({where})"


def keep_secret(path: Path, secret: str) -> None:
    """Writes ``secret`` to ``path``, readable by its owner only from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    os.replace(tmp, path)


def _errcode(body: str) -> str | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed.get("errcode") if isinstance(parsed, dict) else None


def olm_import_error() -> str | None:
    """Why maubot's Python can't import its encryption dependencies (None: it can)."""
    probe = subprocess.run(
        [maubot_python(), "-c", "import olm, mautrix.crypto"], capture_output=True, text=True
    )
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {probe.returncode}"


class Maubot:
    def __init__(
        self,
        state_dir: Path,
        homeserver_url: str,
        registration_secret: str,
        postgres_url: str | None = None,
        port: int | None = None,
        admin_password: str = "admin",
    ) -> None:
        self.dir = state_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.homeserver_url = homeserver_url
        self.registration_secret = registration_secret
        self.postgres_url = postgres_url
        self.admin_password = admin_password
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "maubot.log"
        self.token: str | None = None
        self.http: aiohttp.ClientSession | None = None
        self.signing: CrossSigning | None = None  # the last cross_sign()'s result

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("plugins", "trash", "dbs"):
            (self.dir / sub).mkdir(exist_ok=True)
        config = {
            "database": f"sqlite:{self.dir / 'maubot.db'}",
            "crypto_database": "default",
            "plugin_directories": {
                "upload": str(self.dir / "plugins"),
                "load": [str(self.dir / "plugins")],
                "trash": str(self.dir / "trash"),
            },
            "plugin_databases": {
                "sqlite": str(self.dir / "dbs"),
                "postgres": self.postgres_url,
                "postgres_max_conns_per_plugin": 3,
                "postgres_opts": {},
            },
            "server": {
                "hostname": "127.0.0.1",
                "port": self.port,
                "public_url": self.url,
                "ui_base_path": "/_matrix/maubot",
                "plugin_base_path": "/_matrix/maubot/plugin/",
                "override_resource_path": False,
                "unshared_secret": "generate",
            },
            "homeservers": {
                "local": {"url": self.homeserver_url, "secret": self.registration_secret}
            },
            "admins": {"admin": self.admin_password},
            "api_features": {
                key: True
                for key in (
                    "login",
                    "plugin",
                    "plugin_upload",
                    "instance",
                    "instance_database",
                    "client",
                    "client_proxy",
                    "client_auth",
                    "dev_open",
                    "log",
                )
            },
            "logging": {
                "version": 1,
                "formatters": {
                    "normal": {"format": "[%(asctime)s] [%(levelname)s@%(name)s] %(message)s"}
                },
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "formatter": "normal",
                        "filename": str(self.log),
                    }
                },
                "loggers": {
                    "maubot": {"level": "DEBUG"},
                    "mau": {"level": "DEBUG"},
                    "aiohttp": {"level": "INFO"},
                },
                "root": {"level": "DEBUG", "handlers": ["file"]},
            },
        }
        (self.dir / "config.yaml").write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        self._write_config()
        self.proc = start_server(
            [maubot_python(), "-m", "maubot", "-c", str(self.dir / "config.yaml")],
            self.dir / "maubot.out",
            self.dir,
            ready_url=self.url + API + "/version",
            what="maubot",
            log=self.dir / "maubot.out",
        )

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: maubot and the plugin get no chance to stop (no ``stop()`` runs)."""
        kill_process(self.proc)
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # management API (what the admin UI calls)

    async def api(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.http is None:
            self.http = aiohttp.ClientSession()
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        async with self.http.request(
            method, self.url + API + path, headers=headers, **kwargs
        ) as resp:
            body = await resp.text()
            if resp.status >= 400:
                raise ManagementError(
                    f"{method} {path}: {resp.status} {body[:500]}", resp.status, _errcode(body)
                )
            return json.loads(body) if body else None

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None

    async def login(self) -> None:
        self.token = None
        result = await self.api(
            "POST", "/auth/login", json={"username": "admin", "password": self.admin_password}
        )
        self.token = result["token"]

    async def upload_plugin(self, mbp: Path) -> dict:
        return await self.api(
            "POST",
            "/plugins/upload",
            params={"allow_override": "true"},
            data=mbp.read_bytes(),
            headers={"Content-Type": "application/zip"},
        )

    async def create_client(self, user_id: str, access_token: str, device_id: str) -> dict:
        # autojoin off: the plugin itself decides whom to join (access policy).
        return await self.api(
            "PUT",
            f"/client/{user_id}",
            json={
                "homeserver": self.homeserver_url,
                "access_token": access_token,
                "device_id": device_id,
                "autojoin": False,
                "sync": True,
                "enabled": True,
                "online": True,
                "displayname": "Lambda",
                "avatar_url": "disable",
            },
        )

    async def get_client(self, user_id: str) -> dict:
        return await self.api("GET", f"/client/{user_id}")

    async def crypto_status(self, user_id: str, timeout: float = 120) -> CryptoStatus:
        """Waits until the client has started (maubot sets up crypto first), then says whether
        it encrypts and, if not, why (from maubot's log lines about it)."""
        deadline = time.monotonic() + timeout
        info = await self.get_client(user_id)
        while not info.get("started") and info.get("enabled") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            info = await self.get_client(user_id)
        device_id = info.get("device_id") or None
        if info.get("fingerprint"):
            return CryptoStatus(True, device_id, info["fingerprint"])
        return CryptoStatus(False, device_id, None, self._crypto_off_reason(info))

    def _crypto_off_reason(self, info: dict) -> str:
        log = self.log_text()
        if not info.get("device_id"):
            return "the bot client has no device id"
        if "encryption dependencies not installed" in log:
            why = olm_import_error() or "see maubot.log"
            return f"maubot can't import its encryption dependencies ({why}): install maubot[encryption]"
        if "crypto database is not prepared" in log:
            return "maubot has no crypto database (crypto_database in its config)"
        if not info.get("started"):
            return f"the bot client did not start (see {self.log})"
        return f"maubot did not set up crypto for the client (see {self.log})"

    def recovery_key_file(self, user_id: str) -> Path:
        """Where the recovery key of ``user_id``'s cross-signing keys is kept (mode 0600)."""
        localpart = user_id.lstrip("@").split(":", 1)[0]
        return self.dir / f"recovery-key-{localpart}"

    async def cross_sign(self, user_id: str) -> CrossSigning:
        """Cross-signs the client's device as an operator does in the admin UI: "Generate
        recovery key" for an account without cross-signing keys (the key kept in a file),
        else "Verify" with the kept key (a new device of the same account). Never raises
        for a refusal: the result says why the device is not signed."""
        self.signing = await self._cross_sign(user_id)
        return self.signing

    def signing_text(self) -> str:
        """For the banner: whether the bot's device is cross-signed, where its key is kept."""
        if self.signing is None:
            return "not set up (the bot client does not encrypt)"
        return self.signing.describe()

    async def _cross_sign(self, user_id: str) -> CrossSigning:
        key_file = self.recovery_key_file(user_id)
        trust = (await self.get_client(user_id)).get("trust_state") or ""
        if trust.startswith("cross-signed") or trust == "verified":
            return CrossSigning(True, f"already ({trust})", key_file)
        path = f"/client/{user_id}"
        try:
            result = await self.api("POST", f"{path}/generate_recovery_key")
        except ManagementError as e:
            if e.errcode != "client_has_keys":
                return CrossSigning(False, f"generating the keys failed: {e}", key_file)
            if not key_file.exists():
                why = "the account has cross-signing keys, but their recovery key is not kept"
                return CrossSigning(False, f"{why} here: Verify it in the admin UI", key_file)
            return await self._verify(user_id, key_file)
        keep_secret(key_file, result["recovery_key"])
        return CrossSigning(True, "keys generated", key_file)

    async def _verify(self, user_id: str, key_file: Path) -> CrossSigning:
        key = key_file.read_text().strip()
        try:
            await self.api("POST", f"/client/{user_id}/verify", json={"recovery_key": key})
        except ManagementError as e:  # its text is maubot's answer, never the key
            return CrossSigning(False, f"verifying with the kept recovery key failed: {e}", key_file)
        return CrossSigning(True, "verified with the kept recovery key", key_file)

    async def create_instance(
        self, instance_id: str, user_id: str, config: dict | None = None
    ) -> dict:
        body: dict[str, Any] = {
            "type": PLUGIN_ID,
            "primary_user": user_id,
            "enabled": True,
            "started": True,
        }
        result = await self.api("PUT", f"/instance/{instance_id}", json=body)
        if config:
            result = await self.update_config(instance_id, config)
        return result

    async def get_instance(self, instance_id: str) -> dict:
        return await self.api("GET", f"/instance/{instance_id}")

    async def update_config(self, instance_id: str, changes: dict) -> dict:
        """Merges nested ``changes`` into the instance config and saves it, as the UI does."""
        instance = await self.get_instance(instance_id)
        yaml = YAML()
        config = yaml.load(instance["config"]) or {}
        _merge(config, changes)
        buf = io.StringIO()
        yaml.dump(config, buf)
        return await self.api("PUT", f"/instance/{instance_id}", json={"config": buf.getvalue()})

    async def set_started(self, instance_id: str, started: bool) -> dict:
        return await self.api("PUT", f"/instance/{instance_id}", json={"started": started})


def _merge(target: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
