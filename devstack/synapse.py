"""A real Synapse homeserver on 127.0.0.1 with SQLite, for tests and the local stack; with a
``Federation``, one that federates with others on the same machine (FACTS.md)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
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


# A self-signed certificate for localhost and 127.0.0.1, made with the cryptography package
# Synapse itself depends on (so nothing more is installed for it): argv = certificate, key.
CERTIFICATE_SCRIPT = """
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
now = datetime.datetime.now(datetime.timezone.utc)
alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
cert = (
    x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
    .not_valid_after(now + datetime.timedelta(days=3650))
    .add_extension(x509.SubjectAlternativeName(alt), critical=False)
    .sign(key, hashes.SHA256())
)
open(sys.argv[1], "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(sys.argv[2], "wb").write(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
))
"""


@dataclass(frozen=True)
class Federation:
    """How a homeserver federates with the others on this machine: it is named
    ``localhost:<public_port>`` (where its peers connect, always TLS) and its federation
    listener is on ``listen_port``: TLS itself when that is the public port, plain HTTP when
    something else (``devstack.federation.DelayFront``) takes TLS on the public port for it."""

    public_port: int
    listen_port: int
    peers: tuple[str, ...] = ()  # the other servers' names: the only ones it federates with

    @property
    def server_name(self) -> str:
        return f"localhost:{self.public_port}"

    @property
    def tls(self) -> bool:
        return self.listen_port == self.public_port


def _listener(port: int, resource: str, tls: bool = False) -> dict:
    return {
        "port": port,
        "bind_addresses": ["127.0.0.1"],
        "type": "http",
        "tls": tls,
        "x_forwarded": False,
        "resources": [{"names": [resource], "compress": False}],
    }


def synapse_python() -> str:
    return os.environ.get("LAMBDA_SYNAPSE_PYTHON") or str(REPO / ".venvs/synapse/bin/python")


class Synapse:
    def __init__(
        self,
        state_dir: Path,
        port: int | None = None,
        limits: dict | None = None,
        federation: Federation | None = None,
    ) -> None:
        self.dir = state_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.limits = RAISED_LIMITS if limits is None else limits
        self.federation = federation
        self.server_name = federation.server_name if federation else SERVER_NAME
        self.certificate = self.dir / "tls.crt"  # its key: tls.key; made when it federates
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "synapse.log"
        self.config_path = self.dir / "homeserver.yaml"
        self.secret_path = self.dir / "registration_secret"

    @property
    def shared_secret(self) -> str:
        return self.secret_path.read_text().strip()

    @property
    def certificate_key(self) -> Path:
        return self.certificate.with_suffix(".key")

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def _keep_server_name(self) -> None:
        """A state directory serves one server name for good: the name is in every id its
        database holds (a federating one's name carries its port)."""
        marker = self.dir / "server_name"
        if marker.exists() and marker.read_text().strip() != self.server_name:
            raise RuntimeError(
                f"{self.dir} holds the homeserver {marker.read_text().strip()!r}, not"
                f" {self.server_name!r}: use the same ports again or delete the directory"
            )
        marker.write_text(self.server_name + "\n")

    def _make_certificate(self) -> None:
        if self.certificate.exists() and self.certificate_key.exists():
            return
        subprocess.run(
            [synapse_python(), "-c", CERTIFICATE_SCRIPT, self.certificate, self.certificate_key],
            check=True,
            capture_output=True,
        )

    def _federation_config(self) -> dict:
        """Settings for federating on 127.0.0.1 (FACTS.md); none without a ``Federation``."""
        fed = self.federation
        if fed is None:
            return {}
        self._make_certificate()
        return {
            "tls_certificate_path": str(self.certificate),
            "tls_private_key_path": str(self.certificate_key),
            "federation_verify_certificates": False,  # self-signed, for localhost
            "ip_range_whitelist": ["127.0.0.0/8"],  # else Synapse refuses loopback peers
            "federation_domain_whitelist": [self.server_name, *fed.peers],
            "rc_federation": {
                "window_size": 1000,
                "sleep_limit": 10000,
                "sleep_delay": 100,
                "reject_limit": 10000,
                "concurrent": 1000,
            },
        }

    def _listeners(self) -> list[dict]:
        """The client API on ``port``, plain HTTP; with a ``Federation``, its listener too."""
        listeners = [_listener(self.port, "client")]
        if self.federation is not None:
            fed = self.federation
            listeners.append(_listener(fed.listen_port, "federation", tls=fed.tls))
        return listeners

    def _write_log_config(self) -> Path:
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
        return log_config

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.secret_path.exists():
            self.secret_path.write_text(secrets.token_hex(24))
        config = {
            "server_name": self.server_name,
            "pid_file": str(self.dir / "homeserver.pid"),
            "listeners": self._listeners(),
            "database": {"name": "sqlite3", "args": {"database": str(self.dir / "homeserver.db")}},
            "log_config": str(self._write_log_config()),
            "media_store_path": str(self.dir / "media"),
            "signing_key_path": str(self.dir / "signing.key"),
            "registration_shared_secret": self.shared_secret,
            "macaroon_secret_key": self.shared_secret + "m",
            "form_secret": self.shared_secret + "f",
            "report_stats": False,
            "enable_metrics": False,
            "trusted_key_servers": [],  # keys come from each server itself: no notary
            "suppress_key_server_warning": True,
            "public_baseurl": self.url + "/",
            "max_upload_size": "100M",
            "url_preview_enabled": False,
            "presence": {"enabled": False},
            **self.limits,
            **self._federation_config(),
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._keep_server_name()
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

    def sign_in(self, localpart: str, password: str) -> dict:
        """Registers the user unless a state kept from an earlier run has it already, then
        logs in; returns the login (user_id, access_token, device_id)."""
        try:
            self.register(localpart, password)
        except urllib.error.HTTPError as e:
            if e.code != 400:  # 400 M_USER_IN_USE: kept from an earlier run
                raise
        return self.login(self.user_id(localpart), password)

    def get(self, path: str, token: str) -> dict:
        """One client API GET as the user of ``token``; raises ``urllib.error.HTTPError``."""
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)
