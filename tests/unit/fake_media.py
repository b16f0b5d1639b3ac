"""A small fake media server on 127.0.0.1 for the files tests, and the fixtures around it.

The plugin's real ``Matrix`` gateway runs over a real mautrix ``Client`` pointed at the fake,
which serves downloads (authenticated or legacy only), takes uploads and records sent events.
Test modules import the fixtures they use (``hs``, ``mx``, ``root``) from here, under the
names of their functions (``hs_fixture``...), which pytest registers by their ``name``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from mautrix.client import Client

from lambda_plugin.files import user_dir
from lambda_plugin.matrix import Matrix

USER = "@alice:example.org"
ROOM = "!chat:example.org"
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
STAMP = "20231114T221320Z"
MAX = 64 * 1024
TOKEN = "secret-token"
HOME = str(user_dir(USER))  # the user's own folder, relative to the workspace root


class FakeMedia:
    """Media endpoints of a homeserver, plus sending events; records every request."""

    def __init__(self) -> None:
        self.url = ""
        self.media: dict[str, bytes] = {}  # media id -> bytes
        self.authenticated = True  # does the server have /_matrix/client/v1/media?
        self.no_length: set[str] = set()  # served chunked, without Content-Length
        self.endless: set[str] = set()  # streamed until the client goes away
        self.trickle: dict[str, float] = {}  # media id -> pause between 100-byte pieces
        self.trickled = 0  # bytes served so far by trickling downloads
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, auth)
        self.uploads: list[tuple[bytes, str, str]] = []  # (bytes, content type, filename)
        self.sent: list[tuple[str, dict[str, Any]]] = []  # (room id, content)
        self.stream_done = asyncio.Event()
        self.client_went_away = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        parts = [unquote(p) for p in request.raw_path.split("?")[0].split("/")]
        path = request.path
        if request.method == "GET" and path.startswith("/_matrix/client/v1/media/download/"):
            if not self.authenticated:
                return _error(404, "M_UNRECOGNIZED", "Unrecognized request")
            return await self.serve(request, parts[-1])
        if request.method == "GET" and path.startswith("/_matrix/media/v3/download/"):
            return await self.serve(request, parts[-1])
        if request.method == "POST" and path == "/_matrix/media/v3/upload":
            body = await request.read()
            self.uploads.append(
                (body, request.headers["Content-Type"], request.query.get("filename", ""))
            )
            return web.json_response({"content_uri": f"mxc://example.org/up{len(self.uploads)}"})
        if request.method == "PUT" and len(parts) >= 4 and parts[-3] == "send":
            self.sent.append((parts[-4], await request.json()))
            return web.json_response({"event_id": f"$sent{len(self.sent)}"})
        return _error(404, "M_UNRECOGNIZED", f"fake: {path}")

    async def serve(self, request: web.Request, media_id: str) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _error(401, "M_MISSING_TOKEN", "no token")
        if media_id in self.endless:
            resp = web.StreamResponse()
            await resp.prepare(request)
            try:
                for _ in range(1024):  # at most 64 MiB, far more than any limit here
                    await resp.write(b"x" * 65536)
            except (ConnectionError, RuntimeError, asyncio.CancelledError) as e:
                self.client_went_away = True
                if isinstance(e, asyncio.CancelledError):
                    raise
            finally:
                self.stream_done.set()
            return resp
        if media_id not in self.media:
            return _error(404, "M_NOT_FOUND", "no such media")
        data = self.media[media_id]
        if media_id in self.trickle:
            return await self.serve_slowly(request, data, self.trickle[media_id])
        if media_id in self.no_length:
            resp = web.StreamResponse()
            await resp.prepare(request)
            for i in range(0, len(data), 1000):
                await resp.write(data[i : i + 1000])
            await resp.write_eof()
            return resp
        return web.Response(body=data, content_type="application/octet-stream")

    async def serve_slowly(
        self, request: web.Request, data: bytes, pause_s: float
    ) -> web.StreamResponse:
        """The bytes a little at a time, each piece well within any read timeout."""
        resp = web.StreamResponse()
        resp.content_length = len(data)
        await resp.prepare(request)
        try:
            for i in range(0, len(data), 100):
                await resp.write(data[i : i + 100])
                self.trickled += len(data[i : i + 100])
                await asyncio.sleep(pause_s)
            await resp.write_eof()
        except (ConnectionError, RuntimeError, asyncio.CancelledError) as e:
            self.client_went_away = True
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self.stream_done.set()
        return resp

    def downloads(self) -> list[str]:
        return [path for method, path, _ in self.requests if "/download/" in path]


def _error(status: int, errcode: str, message: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": message}, status=status)


@pytest_asyncio.fixture(name="hs")
async def hs_fixture() -> AsyncIterator[FakeMedia]:
    fake = FakeMedia()
    app = web.Application(client_max_size=MAX * 4)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    await server.close()


@pytest_asyncio.fixture(name="mx")
async def mx_fixture(hs: FakeMedia) -> AsyncIterator[Matrix]:
    client = Client(mxid="@lambda:example.org", base_url=hs.url, token=TOKEN)
    yield Matrix(client, logging.getLogger("test.files"))
    await client.api.session.close()


@pytest.fixture(name="root")
def root_fixture(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


def event(media_id: str, name: str, size: int | None = None, **extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"mimetype": "text/plain"}
    if size is not None:
        info["size"] = size
    return {"msgtype": "m.file", "body": name, "url": f"mxc://example.org/{media_id}", "info": info}


def encrypted_event(
    hs: FakeMedia, media_id: str, name: str, data: bytes, size: int | None = None
) -> dict[str, Any]:
    """A file message as an encrypted room has it: ``data`` encrypted with mautrix's own
    helper, the ciphertext served as ``media_id``, and ``file`` instead of ``url``."""
    from mautrix.crypto.attachments import encrypt_attachment

    ciphertext, sealed = encrypt_attachment(data)
    hs.media[media_id] = ciphertext
    content = event(media_id, name, size)
    del content["url"]
    content["file"] = {**sealed.serialize(), "url": f"mxc://example.org/{media_id}"}
    return content


def everything(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def only_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def make_home(root: Path) -> Path:
    """The user's own folder in the workspace, created: where their agents' files must be."""
    home = root / HOME
    home.mkdir(parents=True, exist_ok=True)
    return home
