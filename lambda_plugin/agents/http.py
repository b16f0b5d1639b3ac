"""HTTP for agents and the transcriber: maubot's session, a deadline for the whole exchange,
bounded answers, and every failure turned into an AgentError whose cause never holds the
secret."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..agent_config import AgentOptions
from .base import AgentError

# Bounds on what an agent may send back, so a broken endpoint cannot exhaust memory.
MAX_BODY_BYTES = 16 * 1024 * 1024
ERROR_BODY_BYTES = 1024
CAUSE_BODY_CHARS = 200
HEALTH_TIMEOUT_S = 10.0


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
        form: aiohttp.FormData | None = None,
        timeout_s: float | None = None,
        accept: Collection[int] = (),
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Sends a request (``body`` as JSON, or ``form`` as multipart) and yields the
        response once its status is 2xx or in ``accept``.

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
                data=form,
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


async def read_body(resp: aiohttp.ClientResponse, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole answer; one past ``limit`` bytes is refused (ValueError) as it arrives."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ValueError(f"answer is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
