"""Any OpenAI-compatible chat completions endpoint: OpenAI, Ollama, vLLM, llama.cpp, LiteLLM,
OpenRouter. The endpoint is stateless, so the history lives in the plugin database."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from ..agent_config import AgentOptions, AgentSpec
from ..db import Store
from .base import (
    MAX_ANSWER_CHARS,
    AgentError,
    AgentReply,
    AgentRequest,
    PartialCallback,
    StoreAgent,
    Usage,
    check_length,
)
from .http import MAX_BODY_BYTES, HttpClient, read_body

# Files go inline only within these bounds: a chat model's context is small.
TEXT_INLINE_BYTES = 100 * 1024
IMAGE_INLINE_BYTES = 20 * 1024 * 1024
# Types that are text in all but name.
TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/javascript",
        "application/x-sh",
    }
)


class OpenAIAgent(StoreAgent):
    backend = "openai"
    OPTIONS = (
        "base_url",
        "model",
        "api_key",
        "system_prompt",
        "max_history",
        "stream",
        "timeout_s",
        "max_answer_chars",
        "stream_usage",
    )

    def __init__(
        self, spec: AgentSpec, store: Store, http: aiohttp.ClientSession, log: logging.Logger
    ) -> None:
        super().__init__(spec, store, log)
        options = AgentOptions(spec)
        self.model = options.text("model", required=True)
        self.system_prompt = options.text("system_prompt")
        self.max_history = options.count("max_history", 40)
        self.stream = options.flag("stream", True)
        self.max_answer_chars = options.whole("max_answer_chars", MAX_ANSWER_CHARS)
        # Asks a streamed answer for its usage (a last chunk); off for a server refusing it.
        self.stream_usage = options.flag("stream_usage", True)
        self.client = HttpClient.of(http, options, log, "api_key")

    async def respond(
        self, request: AgentRequest, on_partial: PartialCallback | None = None
    ) -> AgentReply:
        # Built first: a file this agent cannot take fails before any request is sent.
        user_text, images = self._user_message(request)
        messages = await self._messages(request, user_text, images)
        payload = self._payload(messages)
        url = self.client.url("chat", "completions")
        # The client's time-out bounds the whole answer; the stream reader checks this
        # deadline too, for lines that come so fast that no read ever waits.
        deadline = time.monotonic() + self.client.timeout_s
        async with self.client.request("POST", url, body=payload) as resp:
            # By the answer's type, not the request: some servers ignore "stream".
            if resp.content_type == "text/event-stream":
                answer, usage = await self._read_stream(resp, on_partial, deadline)
            else:
                data = json.loads(await read_body(resp))
                answer, _ = self._content(data, "message")
                usage = self._usage(data)
        check_length(answer, self.max_answer_chars)
        if not answer.strip():
            raise AgentError.of("agent.empty", f"POST {url.path}: the answer has no text")
        await self.remember(request, user_text, answer)
        return AgentReply(answer, usage=usage)

    def _payload(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": self.stream,
        }
        if self.stream and self.stream_usage:
            # A streamed answer's usage comes in a last chunk of its own, when asked for.
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _usage(self, data: Any) -> Usage | None:
        """The usage an answer (or a chunk of one) carries; None when it has none."""
        usage = data.get("usage") if isinstance(data, dict) else None
        return self.read_usage(usage, "prompt_tokens", "completion_tokens")

    async def _messages(
        self, request: AgentRequest, user_text: str, images: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The system prompt, the newest history within its limit (without an earlier turn
        of this same message), and the user's message."""
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        if self.max_history:
            history = await self.store.history(
                request.platform_chat_id, limit=self.max_history, excluding=request.turn
            )
            messages.extend({"role": row.role, "content": row.content} for row in history)
        content: str | list[dict[str, Any]] = user_text
        if images:
            content = [{"type": "text", "text": user_text}, *images]
        messages.append({"role": "user", "content": content})
        return messages

    async def health(self) -> str | None:
        return await self.client.health(self.client.url("models"))

    def _user_message(self, request: AgentRequest) -> tuple[str, list[dict[str, Any]]]:
        """The user's text, as kept in history, and the image parts sent along with it."""
        texts = [request.text] if request.text else []
        images: list[dict[str, Any]] = []
        for file in request.attachments:
            mime = file.mime_type.split(";")[0].strip().lower()
            label = f"{file.name} ({mime}, {file.size} bytes)"
            if file.data is None:
                # The path is all there is; an agent with workspace tools can read it.
                where = file.workspace_path or "not available"
                texts.append(f"[attached file: {label}, workspace path: {where}]")
            elif mime.startswith("image/"):
                if len(file.data) > IMAGE_INLINE_BYTES:
                    raise AgentError.of(
                        "agent.file_too_large",
                        f"image {file.name!r} has {len(file.data)} bytes",
                        name=file.name,
                    )
                encoded = base64.b64encode(file.data).decode("ascii")
                images.append(
                    {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{encoded}"}}
                )
                # History keeps this marker, not the image: it would not fit a context.
                texts.append(f"[attached image: {label}]")
            elif mime.startswith("text/") or mime in TEXT_TYPES:
                body = file.data[:TEXT_INLINE_BYTES].decode("utf-8", errors="replace")
                cut = ", truncated" if len(file.data) > TEXT_INLINE_BYTES else ""
                texts.append(f"[attached file: {label}{cut}]\n{body}\n[end of {file.name}]")
            else:
                raise AgentError.of(
                    "agent.file_type", f"file {file.name!r} is {mime}", mime_type=mime
                )
        return "\n\n".join(texts), images

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, on_partial: PartialCallback | None, deadline: float
    ) -> tuple[str, Usage | None]:
        """The streamed text, and the usage of the last chunk that has one (usually a last
        chunk with no choices, asked for by ``stream_options.include_usage``)."""
        text = ""
        finished = False
        usage = None
        async for data in _sse_data(resp.content, deadline):
            if data == "[DONE]":
                return text, usage
            chunk = json.loads(data)
            usage = self._usage(chunk) or usage
            delta, done = self._content(chunk, "delta")
            finished = finished or done
            if delta:
                text += delta
                check_length(text, self.max_answer_chars)  # stops an endless answer early
                if on_partial is not None:
                    await self._show(on_partial, text)
        # Without [DONE] or a finish reason the stream was cut: the text may be partial.
        if not finished:
            raise AgentError.of("agent.unreadable", "the stream ended before [DONE]")
        return text, usage

    async def _show(self, on_partial: PartialCallback, text: str) -> None:
        try:
            await on_partial(text)
        except Exception:
            # A failed preview edit must not lose the answer: the whole of it comes at the end.
            self.log.warning("Showing a partial answer failed", exc_info=True)

    def _content(self, data: Any, field: str) -> tuple[str, bool]:
        """The text of ``choices[0][field]`` and whether that choice is finished."""
        try:
            choices = data["choices"]
            if not choices:  # e.g. the usage chunk at the end of a stream
                return "", False
            choice = choices[0]
            content = (choice.get(field) or {}).get("content") or ""
            finished = choice.get("finish_reason") is not None
        except (LookupError, TypeError, AttributeError):
            raise self.client.unreadable(f"choices[0].{field}.content", data) from None
        if not isinstance(content, str):
            raise self.client.unreadable(f"text in choices[0].{field}.content", content)
        return content, finished


async def _sse_data(stream: aiohttp.StreamReader, deadline: float) -> AsyncIterator[str]:
    """The data of each server-sent event; comments and other fields are skipped.

    Bounded like an answer read whole: in bytes, and in time by ``deadline`` (a
    ``time.monotonic()``), which keep-alive comments alone can never push back."""
    lines: list[str] = []
    size = 0
    async for raw in stream:
        if time.monotonic() > deadline:
            raise AgentError.of("agent.timeout", "the streamed answer went on past its deadline")
        size += len(raw)
        if size > MAX_BODY_BYTES:
            raise ValueError(f"answer is larger than {MAX_BODY_BYTES} bytes")
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            value = line[len("data:") :]
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)
