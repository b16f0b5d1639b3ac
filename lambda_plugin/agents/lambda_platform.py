"""The Lambda agent platform over HTTP. The platform keeps each conversation itself, by
``platform_chat_id``; the contract is docs/lambda-agent-contract.md."""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
from yarl import URL

from ..agent_config import AgentOptions, AgentSpec
from .base import (
    MAX_ANSWER_CHARS,
    Agent,
    AgentError,
    AgentReply,
    AgentRequest,
    ContextInfo,
    PartialCallback,
    check_length,
)
from .http import HttpClient


class LambdaAgent(Agent):
    backend = "lambda"
    OPTIONS = ("base_url", "token", "timeout_s", "max_answer_chars")

    def __init__(self, spec: AgentSpec, http: aiohttp.ClientSession, log: logging.Logger) -> None:
        super().__init__(spec, log)
        options = AgentOptions(spec)
        self.client = HttpClient.of(http, options, log, "token")
        self.max_answer_chars = options.whole("max_answer_chars", MAX_ANSWER_CHARS)

    def _chat(self, platform_chat_id: str, *action: str) -> URL:
        return self.client.url("v1", "chats", platform_chat_id, *action)

    async def respond(
        self, request: AgentRequest, on_partial: PartialCallback | None = None
    ) -> AgentReply:
        files = []
        for file in request.attachments:
            # The platform reads files from the shared workspace; it cannot take bytes.
            if file.workspace_path is None:
                raise AgentError.of("agent.no_workspace", f"file {file.name!r} has no path")
            files.append(
                {
                    "name": file.name,
                    "mime_type": file.mime_type,
                    "size": file.size,
                    "workspace_path": file.workspace_path,
                }
            )
        body: dict[str, Any] = {
            "text": request.text, "user_id": request.user_id, "attachments": files,
        }  # fmt: skip
        if request.message_id:  # the idempotency key: a platform that has the turn reuses it
            body["message_id"] = request.message_id
        if request.replaces:  # an edit or a 🔁: this turn replaces that message's
            body["replaces"] = request.replaces
        data = await self.client.json(
            "POST", self._chat(request.platform_chat_id, "messages"), body=body
        )
        text = self._field(data, "text", str)
        check_length(text, self.max_answer_chars)
        paths = self._field(data, "attachments", list, default=[])
        if not all(isinstance(path, str) for path in paths):
            raise self.client.unreadable("attachments as a list of paths", paths)
        if not text.strip() and not paths:
            raise AgentError.of("agent.empty", "the platform answered with no text and no files")
        # Optional in the contract: a platform that does not count gives none.
        usage = self.read_usage(data.get("usage"), "tokens_in", "tokens_out")
        return AgentReply(text, tuple(paths), usage)

    async def drop(self, platform_chat_id: str) -> None:
        # 404: the platform never saw this conversation, which is just as forgotten.
        await self.client.call("DELETE", self._chat(platform_chat_id), accept=(404,))

    async def context(self, platform_chat_id: str) -> ContextInfo:
        data = await self.client.json("GET", self._chat(platform_chat_id, "context"), accept=(404,))
        if data is None:
            return ContextInfo(messages=0, chars=0)
        return ContextInfo(
            messages=self._field(data, "messages", int),
            chars=self._field(data, "chars", int),
        )

    async def snapshot(self, platform_chat_id: str) -> str:
        data = await self.client.json("POST", self._chat(platform_chat_id, "snapshot"))
        if not isinstance(data, dict) or "snapshot" not in data:
            raise self.client.unreadable('{"snapshot": ...}', data)
        return json.dumps(data["snapshot"], ensure_ascii=False)

    async def restore(self, platform_chat_id: str, snapshot: str) -> None:
        try:
            value = json.loads(snapshot)
        except ValueError as e:
            raise AgentError.of("agent.bad_snapshot", f"snapshot is not JSON: {e}") from e
        await self.client.call(
            "POST", self._chat(platform_chat_id, "restore"), body={"snapshot": value}
        )

    async def health(self) -> str | None:
        return await self.client.health(self.client.url("v1", "health"), self._health_problem)

    def _field(self, data: Any, key: str, kind: type, default: Any = None) -> Any:
        """``data[key]`` when it is of ``kind``; a missing or null one gives ``default``."""
        value = data.get(key) if isinstance(data, dict) else None
        if value is None:
            value = default
        # bool is an int to Python, never a count to us.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.client.unreadable(f"{key!r} of type {kind.__name__}", data)
        return value

    def _health_problem(self, data: Any) -> str | None:
        status = data.get("status") if isinstance(data, dict) else None
        if status == "ok":
            return None
        # Redacted before the cut, which would otherwise leave the token's start behind.
        shown = self.client.redact(str(status))[:40]
        return f"The agent platform reports status {shown!r}."
