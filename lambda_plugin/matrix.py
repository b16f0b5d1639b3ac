"""Every homeserver call the plugin makes, with rate limits waited out as the server asks.

mautrix raises M_LIMIT_EXCEEDED at once and drops ``retry_after_ms``, so the plugin sends its
requests itself, through the bot client's own session and token, and honours both the
``Retry-After`` header and ``retry_after_ms`` (each wait bounded, and the number of tries).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from mautrix.client import Client

from .crypto import Crypto

# Simplified sliding sync (MSC4186; Synapse serves it by default): many rooms' state in one
# request. Read only through ``rooms_state``, which a caller can do without.
SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
MAX_WAIT_S = 30.0
MAX_TRIES = 8
TRANSIENT = (502, 503, 504)
TRANSIENT_TRIES = 3
# The wait before the n-th retry of a transient failure is n times this.
BACKOFF_S = 0.5
# The longest wait between two tries of a send while the homeserver is unreachable: short,
# so an answer follows within seconds of its return (a try costs it one request).
OUTAGE_MAX_WAIT_S = 4.0
_txn_counter = itertools.count()
T = TypeVar("T")


def new_txn() -> str:
    """A transaction id: the homeserver sends an event once per id, however often asked."""
    return f"lambda-{time.time_ns()}-{next(_txn_counter)}"


class HomeserverError(Exception):
    def __init__(self, status: int, errcode: str | None, message: str) -> None:
        super().__init__(f"{status} {errcode}: {message}")
        self.status = status
        self.errcode = errcode
        self.message = message


class _Refused(Exception):
    """An error status, raised by one try so that the retry loop decides what follows."""

    def __init__(self, status: int, headers: Mapping[str, str], text: str) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = headers.get("Retry-After")
        self.text = text
        self.payload = _parse(text)

    def error(self) -> HomeserverError:
        payload = self.payload
        errcode = payload.get("errcode") if isinstance(payload, dict) else None
        message = payload.get("error", "") if isinstance(payload, dict) else self.text
        return HomeserverError(self.status, errcode, str(message)[:300])


def _q(value: str) -> str:
    return quote(value, safe="")


class Matrix:
    """A thin, typed client-server API for the bot, used instead of direct mautrix calls."""

    def __init__(self, client: Client, log: logging.Logger) -> None:
        self.client = client
        self.log = log
        self.requests = 0  # counted, for benchmarks and the status command
        self.crypto = Crypto(client, log)
        # How long a send waits out an unreachable homeserver (outages.homeserver_wait_s).
        self.outage_s: Callable[[], float] = lambda: 0.0

    @property
    def user_id(self) -> str:
        return self.client.mxid

    @property
    def device_id(self) -> str | None:
        return self.client.device_id or None

    @property
    def server_name(self) -> str:
        return self.client.mxid.split(":", 1)[1]

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        timeout_s: float = 60,
        wait_outage: bool = False,
    ) -> Any:
        api = self.client.api
        headers = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"}
        data = json.dumps(body) if body is not None else None
        timeout = aiohttp.ClientTimeout(total=timeout_s)

        async def once() -> Any:
            async with api.session.request(
                method, self._url(path), data=data, params=query, headers=headers, timeout=timeout
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _Refused(resp.status, resp.headers, text)
                return _parse(text)

        # Only a GET or a PUT (sends carry a transaction id) may be repeated after a failure
        # that may have happened after the server acted; a POST (createRoom) must not be.
        idempotent = method in ("GET", "PUT")
        if wait_outage and idempotent:
            return await self._outlasting(method, path, once)
        return await self._retrying(method, path, once, idempotent=idempotent)

    async def _outlasting(self, method: str, path: str, once: Callable[[], Awaitable[T]]) -> T:
        """``once()`` retried while the homeserver is unreachable (connection failures,
        502/503/504) for up to ``outage_s()`` seconds, with backoff: a send that fails then
        is tried again when the homeserver is back. A refusal (4xx) is raised at once."""
        deadline = time.monotonic() + self.outage_s()
        delay = 1.0
        while True:
            try:
                return await self._retrying(method, path, once, idempotent=True)
            except HomeserverError as e:
                if not (e.status == 0 or e.status in TRANSIENT):
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                self.log.warning(
                    "The homeserver is unreachable (%s) for %s; trying again in %.0fs",
                    e, method, delay,
                )  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, OUTAGE_MAX_WAIT_S)

    async def _retrying(
        self, method: str, path: str, once: Callable[[], Awaitable[T]], *, idempotent: bool
    ) -> T:
        """``once()`` until it succeeds. Rate limits are waited out as the server asks;
        transient statuses and connection failures are retried only when ``idempotent``
        (repeating the request is harmless even if the server acted on the first one)."""
        for attempt in range(1, MAX_TRIES + 1):
            self.requests += 1
            try:
                return await once()
            except _Refused as refused:
                wait = _wait_before_retry(refused, attempt, idempotent)
                if wait is None:
                    raise refused.error() from None
                if refused.status == 429:  # operators grep for this line (docs/troubleshooting)
                    self.log.debug("Rate limited on %s %s; waiting %.2fs", method, path, wait)
                else:
                    self.log.debug("%s %s: %d; retrying in %.2fs", method, path, refused.status, wait)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                if not idempotent or attempt >= TRANSIENT_TRIES:
                    raise HomeserverError(0, None, f"connection failed: {type(e).__name__}") from e
                wait = BACKOFF_S * attempt
            await asyncio.sleep(wait)
        raise HomeserverError(429, "M_LIMIT_EXCEEDED", "still rate limited")

    def _url(self, path: str) -> str:
        return str(self.client.api.base_url).rstrip("/") + path

    # rooms

    async def create_room(self, body: dict[str, Any]) -> str:
        return (await self.request("POST", "/_matrix/client/v3/createRoom", body))["room_id"]

    async def join(self, room_id: str) -> None:
        await self.request("POST", f"/_matrix/client/v3/join/{_q(room_id)}", {})

    async def leave(self, room_id: str, reason: str | None = None) -> None:
        body = {"reason": reason} if reason else {}
        await self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/leave", body)

    async def invite(self, room_id: str, user_id: str) -> None:
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/invite"
        await self.request("POST", path, {"user_id": user_id})

    async def kick(self, room_id: str, user_id: str, reason: str) -> None:
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/kick"
        await self.request("POST", path, {"user_id": user_id, "reason": reason})

    async def joined_rooms(self) -> list[str]:
        return (await self.request("GET", "/_matrix/client/v3/joined_rooms"))["joined_rooms"]

    async def state(self, room_id: str) -> list[dict[str, Any]]:
        return await self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state")

    async def rooms_state(
        self, room_ids: list[str], types: list[str], conn_id: str
    ) -> dict[str, list[Any]]:
        """The current state events of ``types`` (every state key) in many rooms, with one
        sliding-sync request: room id -> events, for the asked rooms the answer holds in
        shape only (a caller reads the others another way). ``conn_id`` names the
        connection; a request without a position restarts it, so a fixed name leaves no
        leftovers on the homeserver."""
        required = [[event_type, "*"] for event_type in types]
        wanted = {"required_state": required, "timeline_limit": 0}
        body = {"conn_id": conn_id, "room_subscriptions": dict.fromkeys(room_ids, wanted)}
        data = await self.request("POST", SLIDING_SYNC, body, query={"timeout": "0"})
        rooms = data.get("rooms") if isinstance(data, dict) else None
        if not isinstance(rooms, dict):
            return {}
        asked = set(room_ids)
        return {
            room_id: room["required_state"]
            for room_id, room in rooms.items()
            if room_id in asked
            and isinstance(room, dict)
            and isinstance(room.get("required_state"), list)
        }

    async def state_event(self, room_id: str, event_type: str, state_key: str = "") -> dict | None:
        """The content of one state event, or None when the room has none."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}"
        try:
            return await self.request("GET", path)
        except HomeserverError as e:
            if e.status == 404:
                return None
            raise

    async def send_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> str:
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}"
        return (await self.request("PUT", path, content))["event_id"]

    async def send(
        self,
        room_id: str,
        content: dict[str, Any],
        event_type: str = "m.room.message",
        wait_outage: bool = True,
        txn: str | None = None,
    ) -> str:
        """Sends an event (encrypted in an encrypted room, when the bot can encrypt); an
        unreachable homeserver is waited out unless ``wait_outage`` is False (a stream's
        partial, which the next one replaces). The transaction id makes a retry safe; a
        caller that tries the same event again later passes its own (``new_txn``)."""
        event_type, content = await self.crypto.seal(room_id, event_type, content)
        txn = txn or new_txn()
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/send/{_q(event_type)}/{txn}"
        reply = await self.request("PUT", path, content, wait_outage=wait_outage)
        return reply["event_id"]

    async def receipt(self, room_id: str, event_id: str) -> None:
        """A read receipt: the user sees their message reached the bot."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/receipt/m.read/{_q(event_id)}"
        try:
            await self.request("POST", path, {})
        except HomeserverError as e:
            self.log.debug("Read receipt in %s failed: %s", room_id, e)

    async def typing(self, room_id: str, typing: bool, timeout_ms: int = 30_000) -> None:
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/typing/{_q(self.user_id)}"
        body: dict[str, Any] = {"typing": typing}
        if typing:
            body["timeout"] = timeout_ms
        await self.request("PUT", path, body)

    async def account_data(self, data_type: str) -> dict[str, Any] | None:
        """The bot's own account data of ``data_type``, or None where it has none."""
        path = f"/_matrix/client/v3/user/{_q(self.user_id)}/account_data/{_q(data_type)}"
        try:
            data = await self.request("GET", path)
        except HomeserverError as e:
            if e.status == 404:
                return None
            raise
        return data if isinstance(data, dict) else None

    async def set_account_data(self, data_type: str, content: dict[str, Any]) -> None:
        path = f"/_matrix/client/v3/user/{_q(self.user_id)}/account_data/{_q(data_type)}"
        await self.request("PUT", path, content)

    async def displayname(self, user_id: str) -> str | None:
        try:
            profile = await self.request("GET", f"/_matrix/client/v3/profile/{_q(user_id)}")
        except HomeserverError:
            return None
        name = profile.get("displayname") if isinstance(profile, dict) else None
        return name if isinstance(name, str) and name.strip() else None

    async def membership(self, room_id: str, user_id: str) -> str | None:
        """``user_id``'s membership in the room (join, invite, leave, ban) or None."""
        content = await self.state_event(room_id, "m.room.member", user_id)
        return content.get("membership") if content else None

    async def default_room_version(self) -> str:
        caps = await self.request("GET", "/_matrix/client/v3/capabilities")
        return str(caps.get("capabilities", {}).get("m.room_versions", {}).get("default", "10"))

    async def recent(self, room_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """The room's newest ``limit`` events, oldest first (malformed entries left out)."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/messages"
        data = await self.request("GET", path, query={"dir": "b", "limit": str(limit)})
        chunk = data.get("chunk") if isinstance(data, dict) else None
        return [e for e in reversed(chunk) if isinstance(e, dict)] if isinstance(chunk, list) else []

    async def event(self, room_id: str, event_id: str) -> dict[str, Any]:
        """One event of the room, as the server has it (encrypted ones still sealed)."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/event/{_q(event_id)}"
        data = await self.request("GET", path)
        return data if isinstance(data, dict) else {}

    async def opened_event(self, room_id: str, event_id: str) -> dict[str, Any]:
        """One event of the room, an encrypted one opened ({} when it can't be, yet)."""
        found = await self.event(room_id, event_id)
        if found.get("type") == "m.room.encrypted":
            found = await self.crypto.open(room_id, found) or {}
        return found

    async def earlier(
        self, room_id: str, before: str, limit: int, types: list[str]
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` events of ``types`` before the position ``before``, oldest first,
        and the position to read on from (None: the room's start was reached)."""
        path = f"/_matrix/client/v3/rooms/{_q(room_id)}/messages"
        query = {"dir": "b", "from": before, "limit": str(limit)}
        query["filter"] = json.dumps({"types": types, "lazy_load_members": True})
        data = await self.request("GET", path, query=query)
        chunk = data.get("chunk") if isinstance(data, dict) else None
        events = [e for e in reversed(chunk) if isinstance(e, dict)] if isinstance(chunk, list) else []
        end = data.get("end") if isinstance(data, dict) else None
        return events, end if isinstance(end, str) and end != before and events else None

    async def sync(self, query: dict[str, str], timeout_s: float = 120) -> dict[str, Any]:
        return await self.request(
            "GET", "/_matrix/client/v3/sync", query=query, timeout_s=timeout_s
        )

    # media

    @asynccontextmanager
    async def download(
        self, server_name: str, media_id: str, timeout_s: float = 60
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The 2xx response to a media download, its body to read (``resp.content``) inside
        the block; the connection is closed when the block ends, read or not.

        The authenticated endpoint first, the legacy one where the server lacks it.
        ``timeout_s`` bounds connecting and each wait for more bytes, not the whole body.
        Rate limits are waited out as for :meth:`request`; other errors raise HomeserverError.
        """
        media = f"{_q(server_name)}/{_q(media_id)}"
        try:
            resp = await self._media_get(f"/_matrix/client/v1/media/download/{media}", timeout_s)
        except HomeserverError as e:
            if not (e.status in (404, 405) or e.errcode == "M_UNRECOGNIZED"):
                raise
            resp = await self._media_get(f"/_matrix/media/v3/download/{media}", timeout_s)
        try:
            yield resp
        finally:
            resp.close()

    async def _media_get(self, path: str, timeout_s: float) -> aiohttp.ClientResponse:
        api = self.client.api
        headers = {"Authorization": f"Bearer {api.token}"}
        timeout = aiohttp.ClientTimeout(sock_connect=timeout_s, sock_read=timeout_s)

        async def once() -> aiohttp.ClientResponse:
            resp = await api.session.get(self._url(path), headers=headers, timeout=timeout)
            if resp.status < 400:
                return resp  # the caller reads the body
            try:
                text = (await resp.content.read(4096)).decode("utf-8", errors="replace")
            finally:
                resp.close()
            raise _Refused(resp.status, resp.headers, text)

        return await self._retrying("GET", path, once, idempotent=True)

    async def upload(
        self, data: bytes, mime_type: str, filename: str, timeout_s: float = 120
    ) -> str:
        """Uploads media; its ``mxc://`` URI. ``timeout_s`` bounds connecting and each wait."""
        api = self.client.api
        path = "/_matrix/media/v3/upload"
        headers = {"Authorization": f"Bearer {api.token}", "Content-Type": mime_type}
        timeout = aiohttp.ClientTimeout(sock_connect=timeout_s, sock_read=timeout_s)

        async def once() -> str:
            async with api.session.post(
                self._url(path),
                data=data,
                params={"filename": filename},
                headers=headers,
                timeout=timeout,
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _Refused(resp.status, resp.headers, text)
            payload = _parse(text)
            uri = payload.get("content_uri") if isinstance(payload, dict) else None
            if not isinstance(uri, str) or not uri.startswith("mxc://"):
                raise HomeserverError(resp.status, None, "upload gave no content_uri")
            return uri

        # A repeated upload at worst leaves an unused copy of the media on the server.
        return await self._retrying("POST", path, once, idempotent=True)


def one_off_sync_filter(
    timeline: dict[str, Any], state_types: list[str] | None = None, include_leave: bool = False
) -> str:
    """A /sync filter for a one-off read: the given timeline, the state of ``state_types``
    (none by default), the rooms left when ``include_leave``, nothing else.

    Synapse caches a sync answer per request (two minutes by default), and a read after a
    restart must not get the last run's answer: naming a room that cannot exist makes each
    request unique. Members are lazy-loaded although none are asked for: on any other sync
    Synapse looks up every joined room for a partial state first (at 2,000 rooms most of an
    incremental sync's time, and it grows with the rooms). Redundant members are included: a
    one-off read must not mark members as sent in the cache that maubot's sync (the same
    device) relies on."""
    return json.dumps(
        {
            "room": {
                "not_rooms": [f"!lambda-{uuid.uuid4().hex}:invalid"],
                "timeline": timeline,
                "state": {
                    "types": state_types or [],
                    "lazy_load_members": True,
                    # not the device's lazy-member cache, which maubot's own sync uses
                    "include_redundant_members": True,
                },
                "ephemeral": {"not_types": ["*"]},
                "account_data": {"not_types": ["*"]},
                "include_leave": include_leave,
            },
            "presence": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
        },
        separators=(",", ":"),
    )


def _parse(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text


def _wait_before_retry(refused: _Refused, attempt: int, idempotent: bool) -> float | None:
    """How long to wait before trying again, or None when the error is final."""
    if refused.status == 429 and attempt < MAX_TRIES:
        return _retry_after(refused, attempt)
    if refused.status in TRANSIENT and idempotent and attempt < TRANSIENT_TRIES:
        return BACKOFF_S * attempt  # a proxy or worker restarting
    return None


def _retry_after(refused: _Refused, attempt: int) -> float:
    """The wait the server asked for (header or body), else a growing default; bounded."""
    wait: float | None = None
    header = refused.retry_after
    payload = refused.payload
    if header and header.strip().isdigit():
        wait = float(header)
    elif isinstance(payload, dict) and isinstance(payload.get("retry_after_ms"), (int, float)):
        wait = payload["retry_after_ms"] / 1000
    if wait is None:
        wait = 0.5 * 2 ** (attempt - 1)
    return max(0.05, min(wait, MAX_WAIT_S))
