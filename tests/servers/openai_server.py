"""An OpenAI-compatible chat completions endpoint that answers from the last user message.

Modes (see the package doc): "ok" answers as asked (JSON, or SSE when the request says
``"stream": true``); "stream" always answers in SSE, ``chunks`` pieces ``chunk_delay_s``
apart; "garbage" sends text that is not JSON (or SSE events that are not); "shape" sends
JSON without ``choices``; "empty" an answer with no text; "cut" ends a stream after its
first piece without ``[DONE]``.

"leak" answers HTTP ``status`` with a text body, "leak_shape" 200 with JSON without
``choices``; both echo the request's Authorization header after ``leak_after`` copies of
``leak_filler``, so tests can put the key exactly where the client cuts what it logs.

"keepalive" streams keep-alive comments and "endless" streams pieces of text, one every
``chunk_delay_s``, never ending: until the client goes away or the server stops.
A stream the client leaves before its end (any mode) is noted in ``left`` (when, by
``time.monotonic()``); ``wait_left(n)`` waits until n were, without polling.

Usage: every answer carries ``usage``, counting one token per character (the text of every
message sent in, the answer out) unless ``usage`` is set: None sends none, anything else is
sent as it is. A streamed answer carries it in a last chunk with no choices, only when the
request asks (``stream_options.include_usage``), as OpenAI does.

``POST /audio/transcriptions`` takes a multipart form (``file``, ``model``) and answers
``{"text": transcript}``; ``transcription_mode`` steers it apart from ``mode``: "slow" waits
``transcription_delay_s`` first, "fail" answers HTTP ``transcription_status`` (echoing the
Authorization header), "garbage" text that is not JSON, "shape" JSON without ``text``,
"empty" an empty text. The forms it got are in ``requests`` (``form``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from . import LocalServer, text_response

COUNT = "count"


class OpenAIServer(LocalServer):
    leak_after: int = 0
    leak_filler: str = "x"
    usage: Any = COUNT
    transcript: str = "a voice message, transcribed"
    transcription_mode: str = "ok"
    transcription_status: int = 500
    transcription_delay_s: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.left: list[float] = []  # when a client left a stream unfinished (monotonic)
        self._leaving = asyncio.Condition()

    async def wait_left(self, count: int = 1, timeout: float = 30.0) -> list[float]:
        """Waits until clients left ``count`` streams before their end, in all."""
        async with self._leaving:
            await asyncio.wait_for(self._leaving.wait_for(lambda: len(self.left) >= count), timeout)
        return list(self.left)

    async def _client_left(self) -> None:
        async with self._leaving:
            self.left.append(time.monotonic())
            self._leaving.notify_all()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self._completions),
            web.get("/v1/models", self._models),
            web.post("/v1/audio/transcriptions", self._transcriptions),
        ]

    async def start(self, host: str = "127.0.0.1") -> str:
        """Serves under /v1, like most OpenAI-compatible servers; returns that base URL."""
        self.base_url = await super().start(host) + "/v1"
        return self.base_url

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "test-model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.mode in ("leak", "leak_shape"):
            return self._leak(request)
        if self.mode in ("keepalive", "endless"):
            return await self._endless(request)
        if self.mode in ("stream", "cut") or body.get("stream"):
            return await self._stream(request, body)
        if self.mode == "garbage":
            return text_response("this is not JSON {")
        if self.mode == "shape":
            return web.json_response({"unexpected": True})
        answer = self._answer(body)
        message = {"role": "assistant", "content": answer}
        data = {"object": "chat.completion", "choices": [_choice(message=message, finish="stop")]}
        usage = self._usage(body, answer)
        if usage is not None:
            data["usage"] = usage
        return web.json_response(data)

    def _usage(self, body: dict[str, Any], answer: str) -> Any:
        """The usage of an answer: one token a character, unless ``usage`` says otherwise."""
        if self.usage != COUNT:
            return self.usage
        sent = sum(len(_text_of(m["content"])) for m in body["messages"])
        return {
            "prompt_tokens": sent,
            "completion_tokens": len(answer),
            "total_tokens": sent + len(answer),
        }

    def _leak(self, request: web.Request) -> web.Response:
        echoed = self.leak_filler * self.leak_after + str(request.headers.get("Authorization"))
        if self.mode == "leak":
            return web.Response(text=echoed, status=self.status)
        return web.json_response({"echo": echoed})

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        piece = json.dumps({"choices": [_choice(delta={"content": "more "})]})
        line = ": keep-alive\n\n" if self.mode == "keepalive" else f"data: {piece}\n\n"
        try:
            while not await self.pause(self.chunk_delay_s):
                await resp.write(line.encode())
        except ConnectionError:
            await self._client_left()  # the client gave up on it, as it should
        return resp

    def _answer(self, body: dict[str, Any]) -> str:
        if self.mode == "empty":
            return ""
        last = next(m for m in reversed(body["messages"]) if m["role"] == "user")
        return self.answer_for(_text_of(last["content"]))

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await self._streamed(resp, body)
        except ConnectionError:
            await self._client_left()  # gone before the end: nothing more to send it
        return resp

    async def _streamed(self, resp: web.StreamResponse, body: dict[str, Any]) -> None:
        answer = self._answer(body)
        options = body.get("stream_options") or {}
        with_usage = bool(options.get("include_usage")) and self.mode != "garbage"

        async def event(data: Any) -> None:
            if isinstance(data, dict) and with_usage:
                data = {"usage": None, **data}  # as OpenAI sends: null until the last chunk
            text = data if isinstance(data, str) else json.dumps(data)
            await resp.write(f"data: {text}\n\n".encode())

        if self.mode == "garbage":
            await event("{not json")
            await resp.write_eof()
            return
        await event({"choices": [_choice(delta={"role": "assistant"})]})
        size = max(1, -(-len(answer) // self.chunks))  # ceiling division
        pieces = [answer[i : i + size] for i in range(0, len(answer), size)]
        for index, piece in enumerate(pieces):
            if index and await self.pause(self.chunk_delay_s):
                return  # stopping
            delta = {"content": piece} if self.mode != "shape" else {"content": 42}
            await event({"choices": [_choice(delta=delta)]})
            if self.mode == "cut":
                await resp.write_eof()
                return
        await event({"choices": [_choice(delta={}, finish="stop")]})
        usage = self._usage(body, answer)
        if with_usage and usage is not None:
            await event({"choices": [], "usage": usage})
        await event("[DONE]")
        await resp.write_eof()

    async def _transcriptions(self, request: web.Request) -> web.Response:
        form = await request.post()  # read once already, and kept, by the recording
        mode = self.transcription_mode
        if mode == "slow" and await self.pause(self.transcription_delay_s):
            return web.Response(status=503)  # stopping
        if mode == "fail":
            echoed = request.headers.get("Authorization")
            error = {"message": "test failure", "authorization": echoed}
            return web.json_response({"error": error}, status=self.transcription_status)
        if not isinstance(form.get("file"), web.FileField) or not form.get("model"):
            return web.json_response({"error": {"message": "file and model needed"}}, status=400)
        if mode == "garbage":
            return text_response("<html>this is not JSON</html>")
        if mode == "shape":
            return web.json_response({"transcript": self.transcript})
        return web.json_response({"text": "" if mode == "empty" else self.transcript})


def _choice(finish: str | None = None, **content: Any) -> dict[str, Any]:
    return {"index": 0, "finish_reason": finish, **content}


def _text_of(content: Any) -> str:
    """A message's text: the content itself, or the text parts beside images."""
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if p.get("type") == "text")
    return str(content)
