"""The Lambda agent platform as docs/lambda-agent-contract.md describes it, in memory.

Conversations are kept per ``platform_chat_id``, so context counts, snapshots and restores
are real. Modes (see the package doc): "garbage" answers text that is not JSON; "shape"
JSON of the wrong shape; "empty" an answer with no text and no files. ``reply_attachments``
are returned with every answer, and so is ``reply_usage`` as the optional ``usage`` object
when set; ``token``, when set, is required as the Bearer token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import LocalServer, text_response


@dataclass
class LambdaServer(LocalServer):
    token: str | None = None
    reply_attachments: list[str] = field(default_factory=list)
    # The answers' optional "usage" ({"tokens_in": .., "tokens_out": ..}); None: none sent.
    reply_usage: Any = None
    health_status: str = "ok"
    # platform_chat_id -> [{"role": ..., "content": ...}, ...]
    chats: dict[str, list[dict[str, str]]] = field(default_factory=dict, repr=False)

    def routes(self) -> list[web.RouteDef]:
        chat = "/v1/chats/{chat_id}"
        return [
            web.post(f"{chat}/messages", self._message),
            web.delete(chat, self._drop),
            web.get(f"{chat}/context", self._context),
            web.post(f"{chat}/snapshot", self._snapshot),
            web.post(f"{chat}/restore", self._restore),
            web.get("/v1/health", self._health),
        ]

    def _answer(self, data: Any) -> web.Response:
        """``data`` as JSON, unless a mode spoils it."""
        if self.mode == "garbage":
            return text_response("<html>this is not JSON</html>")
        if self.mode == "shape":
            return web.json_response({"unexpected": True})
        return web.json_response(data)

    def _check(self, request: web.Request) -> None:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(
                text='{"error": {"code": "unauthorized", "message": "bad token"}}',
                content_type="application/json",
            )

    async def _message(self, request: web.Request) -> web.Response:
        self._check(request)
        body = await request.json()
        text = "" if self.mode == "empty" else self.answer_for(body["text"])
        files = [] if self.mode == "empty" else list(self.reply_attachments)
        if self.mode not in ("garbage", "shape", "empty"):  # answered: it counts
            chat = self.chats.setdefault(request.match_info["chat_id"], [])
            chat += [
                {"role": "user", "content": body["text"]},
                {"role": "assistant", "content": text},
            ]
        answer: dict[str, Any] = {"text": text, "attachments": files}
        if self.reply_usage is not None:
            answer["usage"] = self.reply_usage
        return self._answer(answer)

    async def _drop(self, request: web.Request) -> web.Response:
        self._check(request)
        if self.chats.pop(request.match_info["chat_id"], None) is None:
            raise web.HTTPNotFound()
        return web.Response(status=204)

    async def _context(self, request: web.Request) -> web.Response:
        self._check(request)
        chat = self.chats.get(request.match_info["chat_id"], [])
        return self._answer({"messages": len(chat), "chars": sum(len(m["content"]) for m in chat)})

    async def _snapshot(self, request: web.Request) -> web.Response:
        self._check(request)
        chat = self.chats.get(request.match_info["chat_id"], [])
        return self._answer({"snapshot": {"format": "test", "messages": chat}})

    async def _restore(self, request: web.Request) -> web.Response:
        self._check(request)
        body = await request.json()
        try:
            messages = list(body["snapshot"]["messages"])
        except (KeyError, TypeError):
            raise web.HTTPBadRequest(
                text='{"error": {"code": "bad_snapshot", "message": "not a snapshot"}}',
                content_type="application/json",
            ) from None
        self.chats[request.match_info["chat_id"]] = messages
        return web.Response(status=204)

    async def _health(self, request: web.Request) -> web.Response:
        return self._answer({"status": self.health_status})
