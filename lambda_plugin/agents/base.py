"""What every agent backend offers the router, and the pieces the backends share.

An agent answers one message of one conversation at a time; the conversation is named by
its ``platform_chat_id`` only. Every failure an agent can have reaches the router as an
:class:`AgentError`, whose ``user_message`` is safe to show in the room.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..config import AgentOptions, AgentSpec
from ..db import Store
from ..texts import TEXTS, text

# English texts of errors whose key texts.py does not hold yet (texts.py's own win).
# English texts of every AgentError, by key (texts.py holds them, with their translations).
ERROR_TEXTS: dict[str, str] = {k: v for k, v in TEXTS["en"].items() if k.startswith("agent.")}

# Bounds on what an agent may send back, so a broken endpoint cannot exhaust memory.
MAX_BODY_BYTES = 16 * 1024 * 1024
# The default of each agent's max_answer_chars: longer answers are refused.
MAX_ANSWER_CHARS = 400_000  # about 35 events: long answers are split, runaway ones stopped
ERROR_BODY_BYTES = 1024
CAUSE_BODY_CHARS = 200
HEALTH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Attachment:
    name: str
    mime_type: str
    size: int
    # Relative path under the shared workspace root, when one is configured.
    workspace_path: str | None = None
    # Inline bytes when no workspace is configured (only the openai backend takes them).
    data: bytes | None = None


@dataclass(frozen=True)
class AgentRequest:
    platform_chat_id: str
    text: str
    user_id: str
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class AgentReply:
    text: str
    # Relative workspace paths of files the agent returns; the router checks and uploads them.
    attachments: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContextInfo:
    messages: int
    chars: int


class AgentError(Exception):
    """An agent failed.

    ``user_message`` is short and safe to show in the room (never a secret, a URL or a
    token); ``key`` and ``values`` name the same text in :data:`ERROR_TEXTS` for
    translation, and :meth:`describe` gives it in the user's language; ``str(error)`` is
    the cause, for the log (secrets already redacted).
    """

    def __init__(
        self,
        user_message: str,
        cause: str,
        *,
        key: str = "agent.failed",
        values: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cause)
        self.user_message = user_message
        self.cause = cause
        self.key = key
        self.values = values or {}

    @classmethod
    def of(cls, key: str, cause: str, **values: Any) -> AgentError:
        return cls(ERROR_TEXTS[key].format(**values), cause, key=key, values=values)

    def describe(self, language: str) -> str:
        """The error as the user reads it: the text of ``key`` in ``language`` with
        ``values``, else (no key, or one texts.py does not hold) ``user_message``."""
        if self.key and self.key in TEXTS["en"]:
            try:
                if not self.values:  # text() leaves a text unformatted when given no values
                    return text(language, self.key).format()
                return text(language, self.key, **self.values)
            except (LookupError, ValueError):
                pass  # values that do not fit the text: the English message still does
        return self.user_message


# Called with the whole text so far while an answer streams.
PartialCallback = Callable[[str], Awaitable[None]]


class Agent(ABC):
    """One configured agent; the router keeps one instance per registry entry."""

    backend: str
    # The option keys this backend reads; others get a warning.
    OPTIONS: tuple[str, ...] = ()

    def __init__(self, spec: AgentSpec, log: logging.Logger) -> None:
        self.agent_id = spec.agent_id
        self.log = log
        AgentOptions(spec).warn_unknown(log, self.OPTIONS)

    @abstractmethod
    async def respond(
        self, request: AgentRequest, on_partial: PartialCallback | None = None
    ) -> AgentReply:
        """Answers one message. Cancelling the task leaves the conversation unchanged."""

    @abstractmethod
    async def drop(self, platform_chat_id: str) -> None:
        """Forgets a conversation (``!clear``); forgetting an unknown one is no error."""

    @abstractmethod
    async def context(self, platform_chat_id: str) -> ContextInfo: ...

    @abstractmethod
    async def snapshot(self, platform_chat_id: str) -> str:
        """The conversation as opaque JSON text, for the plugin to store under a name."""

    @abstractmethod
    async def restore(self, platform_chat_id: str, snapshot: str) -> None:
        """Makes a new conversation continue from a snapshot this backend made."""

    @abstractmethod
    async def health(self) -> str | None:
        """None when the agent works, else a short problem text (safe to show admins)."""

    async def close(self) -> None:  # noqa: B027 - deliberately empty: most agents hold nothing
        pass


class StoreAgent(Agent):
    """An agent whose conversations are kept as history rows in the plugin database."""

    def __init__(self, spec: AgentSpec, store: Store, log: logging.Logger) -> None:
        super().__init__(spec, log)
        self.store = store

    async def remember(self, platform_chat_id: str, user_text: str, answer: str) -> None:
        # One atomic write after the whole answer: a failed or cancelled attempt leaves no
        # half exchange behind, so !retry never duplicates a message.
        await self.store.append_history(
            platform_chat_id, [("user", user_text), ("assistant", answer)]
        )

    async def drop(self, platform_chat_id: str) -> None:
        await self.store.drop_history(platform_chat_id)

    async def context(self, platform_chat_id: str) -> ContextInfo:
        rows = await self.store.history(platform_chat_id)
        return ContextInfo(messages=len(rows), chars=sum(len(row.content) for row in rows))

    async def snapshot(self, platform_chat_id: str) -> str:
        rows = await self.store.history(platform_chat_id)
        messages = [{"role": row.role, "content": row.content} for row in rows]
        return json.dumps({"version": 1, "messages": messages}, ensure_ascii=False)

    async def restore(self, platform_chat_id: str, snapshot: str) -> None:
        messages = _history_of(snapshot)
        await self.store.drop_history(platform_chat_id)
        if messages:
            await self.store.append_history(platform_chat_id, messages)


def _history_of(snapshot: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(snapshot)
        messages = [(m["role"], m["content"]) for m in data["messages"]]
    except (ValueError, TypeError, KeyError) as e:
        raise AgentError.of("agent.bad_snapshot", f"snapshot is not a history: {e!r}") from e
    if not all(isinstance(r, str) and isinstance(c, str) for r, c in messages):
        raise AgentError.of("agent.bad_snapshot", "snapshot history holds non-text entries")
    return messages


class HttpClient:
    """The one way agents talk HTTP: maubot's session, per-request time-outs, and every
    failure turned into an AgentError whose cause never holds the secret."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: URL,
        log: logging.Logger,
        *,
        secret: str | None,
        timeout_s: float,
    ) -> None:
        self.http = http
        self.log = log
        self.base_url = base_url
        self.timeout_s = timeout_s
        self._secret = secret
        # The secret travels only in this header; it is never part of a URL or a body.
        self._headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    @classmethod
    def of(
        cls, http: aiohttp.ClientSession, options: AgentOptions, log: logging.Logger, secret: str
    ) -> HttpClient:
        """The client an agent's options describe: ``base_url``, ``timeout_s`` and the option
        named ``secret`` (the API key or token)."""
        return cls(
            http, options.url("base_url"), log,
            secret=options.text(secret), timeout_s=options.number("timeout_s", 120),
        )  # fmt: skip

    def url(self, *segments: str) -> URL:
        """``base_url`` with path segments appended, each quoted whole ("/" included)."""
        path = self.base_url.raw_path.rstrip("/")
        path += "".join("/" + quote(segment, safe="") for segment in segments)
        return URL.build(
            scheme=self.base_url.scheme,
            authority=self.base_url.raw_authority,
            path=path,
            query_string=self.base_url.raw_query_string,
            encoded=True,
        )

    def redact(self, text: str, *, cut: bool = False) -> str:
        """``text`` without the secret. ``cut``: the text ends where a read stopped, so the
        secret's first characters at its very end go as well."""
        if not self._secret:
            return text
        text = text.replace(self._secret, "***")
        if cut:
            for size in range(len(self._secret) - 1, 0, -1):
                if text.endswith(self._secret[:size]):
                    return text[:-size] + "***"
        return text

    def brief(self, data: Any, *, cut: bool = False) -> str:
        """``data`` as a short line for a cause. Redacted before it is shortened: a secret
        across the cut would otherwise leave its start behind, out of reach of redact()."""
        return _shorten(self.redact(_as_text(data), cut=cut))

    def unreadable(self, what: str, data: Any) -> AgentError:
        """The error for an answer of the wrong shape; ``what`` says what was expected."""
        return AgentError.of("agent.unreadable", f"expected {what}, got {self.brief(data)}")

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: URL,
        *,
        body: Any = None,
        timeout_s: float | None = None,
        accept: Collection[int] = (),
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Sends a request and yields the response once its status is 2xx or in ``accept``.

        ``timeout_s`` bounds the whole exchange, reading the answer included, streamed or
        not. Errors raised while the caller reads the response inside the ``async with``
        block (a stalled or cut stream, bad JSON) are turned into AgentErrors here too.
        """
        timeout_s = timeout_s or self.timeout_s
        # No query and no user info in causes: either could carry a credential.
        where = self.redact(f"{method} {url.with_user(None).with_query(None)}")
        try:
            async with self.http.request(
                method,
                url,
                json=body,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                # A redirect could carry the Authorization header to another host.
                allow_redirects=False,
            ) as resp:
                if not (200 <= resp.status < 300 or resp.status in accept):
                    raise await self._status_error(resp, where)
                yield resp
        except AgentError:
            raise
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            raise self._failure(e, where, timeout_s) from e

    async def _status_error(self, resp: aiohttp.ClientResponse, where: str) -> AgentError:
        snippet = await resp.content.read(ERROR_BODY_BYTES)
        body = self.brief(snippet, cut=len(snippet) == ERROR_BODY_BYTES)
        return AgentError.of(
            "agent.http_error", f"{where}: HTTP {resp.status}: {body}", status=resp.status
        )

    def _failure(self, error: Exception, where: str, timeout_s: float) -> AgentError:
        """The AgentError for a failed exchange (time-out, unreadable or unreachable)."""
        # Time-outs first: aiohttp's read time-outs are connection errors as well.
        # (asyncio.TimeoutError, not the builtin: they differ on Python 3.10.)
        if isinstance(error, asyncio.TimeoutError):
            return AgentError.of("agent.timeout", f"{where}: no answer in {timeout_s:g} s")
        if isinstance(error, (aiohttp.ClientPayloadError, ValueError)):
            return AgentError.of("agent.unreadable", f"{where}: {self.brief(_name(error))}")
        return AgentError.of("agent.unreachable", f"{where}: {self.brief(_name(error))}")

    async def call(
        self, method: str, url: URL, *, body: Any = None, accept: Collection[int] = ()
    ) -> None:
        """A request whose answer body does not matter."""
        async with self.request(method, url, body=body, accept=accept):
            pass

    async def json(
        self,
        method: str,
        url: URL,
        *,
        body: Any = None,
        accept: Collection[int] = (),
    ) -> Any:
        """The parsed JSON answer, or None for a status in ``accept``."""
        async with self.request(method, url, body=body, accept=accept) as resp:
            if resp.status in accept:
                return None
            return json.loads(await read_body(resp))

    async def health(
        self, url: URL, check: Callable[[Any], str | None] = lambda _: None
    ) -> str | None:
        """Probes ``url`` quickly: None when it answers 2xx and ``check`` finds no problem
        in its JSON (None when the body is not JSON), else a short problem text."""
        try:
            async with self.request(
                "GET", url, timeout_s=min(HEALTH_TIMEOUT_S, self.timeout_s)
            ) as resp:
                body = await read_body(resp)
        except AgentError as e:
            self.log.warning("Health check failed: %s", e)
            return e.user_message
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        return check(data)


async def read_body(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ValueError(f"answer is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_length(answer: str, limit: int) -> None:
    """Refuses an answer longer than an agent's max_answer_chars."""
    if len(answer) > limit:
        cause = f"the answer has more than {limit} characters (max_answer_chars)"
        raise AgentError.of("agent.too_long", cause, limit=limit)


def _name(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _as_text(data: Any) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data if isinstance(data, str) else repr(data)


def _shorten(text: str) -> str:
    """One line of at most CAUSE_BODY_CHARS; only ever given redacted text."""
    text = " ".join(text.split())
    return text if len(text) <= CAUSE_BODY_CHARS else text[:CAUSE_BODY_CHARS] + "…"
