"""Local stand-ins for agent endpoints, served in-process on 127.0.0.1.

Unit tests call them directly; real-level tests hand their ``base_url`` to the plugin,
which runs in another process. A test steers a server by setting attributes on it:

- ``mode``: "ok", "stream", "stall" (no answer until ``release`` is set or the server
  stops), "fail" (HTTP ``status``), "garbage" (not JSON / broken SSE), "shape" (JSON of
  the wrong shape), "empty" (an answer without text), plus what a server adds;
- ``reply_text``: the answer's text instead of the default "reply to: <text>".

Every request is recorded in ``requests`` (a multipart form parsed into ``form``);
``wait_requests(n)`` waits until n arrived (e.g. to act while one stalls), without polling.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# Bodies larger than aiohttp's default 1 MiB are accepted: audio files come this way.
MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class FormFile:
    """A file field of a multipart form."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str  # decoded
    raw_path: str  # as sent, percent-escapes kept
    headers: dict[str, str]
    json: Any = None
    body: bytes = b""  # empty for a multipart form: see ``form``
    form: dict[str, str | FormFile] | None = None


@dataclass
class LocalServer:
    mode: str = "ok"
    status: int = 500
    reply_text: str | None = None
    # Seconds between two chunks of a streamed answer.
    chunk_delay_s: float = 0.0
    # Pieces a streamed answer is cut into.
    chunks: int = 3
    requests: list[Recorded] = field(default_factory=list, repr=False)
    # Lets stalled requests go on; it stays set (and later requests pass) until cleared.
    release: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self._stopping = asyncio.Event()
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def answer_for(self, text: str) -> str:
        return self.reply_text if self.reply_text is not None else f"reply to: {text}"

    async def start(self, host: str = "127.0.0.1") -> str:
        app = web.Application(
            middlewares=[self._record, self._steer], client_max_size=MAX_REQUEST_BYTES
        )
        app.add_routes(self.routes())
        # A short shutdown: stalled handlers are woken by stop() anyway.
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        # Our own socket on port 0: the OS picks a free port, and we can read it back.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        await web.SockSite(self._runner, sock).start()
        self.base_url = f"http://{host}:{sock.getsockname()[1]}"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_requests(self, count: int = 1, timeout: float = 30.0) -> list[Recorded]:
        """Waits until ``count`` requests arrived in all (e.g. one that now stalls)."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.requests) >= count), timeout
            )
        return list(self.requests)

    async def pause(self, seconds: float) -> bool:
        """Waits ``seconds`` unless the server stops first; True when it is stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        form = None
        if request.content_type == "multipart/form-data":
            # Read as a form (aiohttp keeps it for the handler), not as bytes, which would
            # leave nothing for the form to be read from.
            body = b""
            posted = await request.post()
            form = {name: _form_value(value) for name, value in posted.items()}
        else:
            body = await request.read()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        headers = dict(request.headers)
        recorded = Recorded(
            request.method, request.path, request.raw_path, headers, parsed, body, form
        )
        async with self._arrived:
            self.requests.append(recorded)
            self._arrived.notify_all()
        return await handler(request)

    @web.middleware
    async def _steer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The modes every endpoint shares; the others are up to the handlers."""
        if self.mode == "stall":
            waits = [asyncio.ensure_future(e.wait()) for e in (self._stopping, self.release)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if self._stopping.is_set():
                return web.Response(status=503)
        elif self.mode == "fail":
            # Echoes the Authorization header back, as some real APIs do in part, so tests
            # can prove the client keeps it out of its errors.
            error = {
                "message": "test failure",
                "authorization": request.headers.get("Authorization"),
            }
            return web.json_response({"error": error}, status=self.status)
        return await handler(request)


def text_response(text: str) -> web.Response:
    """A body that claims to be JSON but is not."""
    return web.Response(text=text, content_type="application/json")


def _form_value(value: Any) -> str | FormFile:
    if isinstance(value, web.FileField):
        data = value.file.read()
        value.file.seek(0)  # the handler may read it as well
        return FormFile(value.filename, value.content_type, data)
    return str(value)
