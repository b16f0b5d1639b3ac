"""A streaming OpenAI-compatible agent for the benchmark, served in the bench's own process on
127.0.0.1 (a port the OS picks): the answer's first token comes a fixed delay after the
request, the rest in pieces after it, and the monotonic time of each request and of its first
token is kept, so the bench can say where the time went on the same clock as its sync loops.

``tests/servers/openai_server.py`` streams too, but has no "first token after N ms" knob (it
only waits between pieces), and the bench needs the times anyway: hence this one.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN = re.compile(r"\bfw-[\w-]+")


class LocalAgent:
    """What both local agent servers share: served on 127.0.0.1 (a port the OS picks),
    ``/v1/chat/completions`` (a subclass's ``_completions``) and ``/v1/models``."""

    model: str
    base_url: str
    first_token_s: float
    gap_s: float
    _runner: web.AppRunner | None

    async def start(self) -> str:
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/chat/completions", self._completions),
                web.get("/v1/models", self._models),
            ]
        )
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def config(self) -> dict[str, Any]:
        """The agent's entry in the plugin's ``agents.registry``."""
        return {"backend": "openai", "base_url": self.base_url, "model": self.model,
                "stream": True, "timeout_s": 60}  # fmt: skip

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def _answer(
        self, request: web.Request, body: Any, arrived: float, pieces: list[str],
        first_token: Callable[[], None] = lambda: None,
        cut: Callable[[], None] | None = None,
    ) -> web.StreamResponse:  # fmt: skip
        """``pieces`` as one answer, or streamed when asked: the role at once, the first
        piece ``first_token_s`` after ``arrived`` (``first_token`` called as it is written),
        the others ``gap_s`` apart. A streamed response is prepared and ended here; with
        ``cut``, a client that goes away mid-answer is told to it, not raised."""
        if not body.get("stream"):
            await asyncio.sleep(self.first_token_s + self.gap_s * (len(pieces) - 1))
            first_token()
            message = {"role": "assistant", "content": "".join(pieces)}
            return web.json_response(
                {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await self._stream(request, resp, arrived, pieces, first_token)
        except (ConnectionError, RuntimeError):
            if cut is None:
                raise
            cut()
        return resp

    async def _stream(
        self, request: web.Request, resp: web.StreamResponse, arrived: float,
        pieces: list[str], first_token: Callable[[], None],
    ) -> None:  # fmt: skip
        await resp.prepare(request)

        async def event(data: Any) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            await resp.write(f"data: {text}\n\n".encode())

        def delta(content: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"choices": [{"index": 0, "delta": content, "finish_reason": finish}]}

        await event(delta({"role": "assistant"}))
        await asyncio.sleep(max(0.0, arrived + self.first_token_s - time.monotonic()))
        for index, piece in enumerate(pieces):
            if index:
                await asyncio.sleep(self.gap_s)
            await event(delta({"content": piece}))
            if index == 0:
                first_token()
        await event(delta({}, "stop"))
        await event("[DONE]")
        await resp.write_eof()


def last_user_text(body: Any) -> str:
    """The text of the last user message of a chat completions request."""
    messages = body.get("messages", []) if isinstance(body, dict) else []
    last = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    content = last.get("content", "")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


@dataclass
class Timing:
    request: float  # monotonic: the request arrived
    first_token: float | None = None  # the first piece of text was written
    done: float | None = None  # [DONE] written


@dataclass
class StreamingAgent(LocalAgent):
    # The first piece of text is written this long after the request arrives (the role
    # delta goes at once, as real servers send their headers and role first).
    first_token_s: float = 0.5
    # Then the other pieces, ``gap_s`` apart: together longer than the plugin's default edit
    # interval (1.0 s), so a first edit that waited for the throttle would show.
    pieces: int = 4
    gap_s: float = 0.4
    model: str = "bench-stream"
    timings: dict[str, Timing] = field(default_factory=dict)
    base_url: str = ""

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None

    def answer(self, token: str) -> list[str]:
        """The pieces of the answer to the message naming ``token``; the first names it."""
        return [f"Answer to {token}:"] + [f" part {i} of the streamed text." for i in
                                          range(1, self.pieces)]  # fmt: skip

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.json()
        found = TOKEN.search(last_user_text(body))
        token = found.group(0) if found else f"fw-unnamed-{len(self.timings)}"
        timing = self.timings[token] = Timing(request=arrived)
        pieces = self.answer(token)

        def first() -> None:
            timing.first_token = time.monotonic()

        resp = await self._answer(request, body, arrived, pieces, first)
        if timing.done is None:
            timing.done = time.monotonic()
        return resp
