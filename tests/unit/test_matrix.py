"""The homeserver gateway's one retry policy, against a scripted fake server on 127.0.0.1.

The plugin's real ``Matrix`` runs over a real mautrix ``Client`` pointed at the fake, which
answers each request with the next step of its script (then 200 with a default body).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from mautrix.client import Client

from lambda_plugin import matrix
from lambda_plugin.matrix import TRANSIENT_TRIES, HomeserverError, Matrix

ROOM = "!room:example.org"
DROP = "drop"  # a script step: the server closes the connection without answering
OK_BODY = {"event_id": "$sent", "room_id": ROOM, "joined_rooms": [ROOM]}


class ScriptedHomeserver:
    def __init__(self) -> None:
        self.url = ""
        self.script: list[Any] = []  # DROP or (status, json body, headers)
        self.seen: list[tuple[str, str, float]] = []  # (method, path, monotonic time)
        self.bodies: list[bytes] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.read())
        self.seen.append((request.method, request.path, time.monotonic()))
        step = self.script.pop(0) if self.script else (200, None, {})
        if step == DROP:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        status, body, headers = step
        if body is None:
            body = {"content_uri": "mxc://example.org/up"} if "upload" in request.path else OK_BODY
        if request.path.startswith("/_matrix/client/v1/media/download/") and status == 200:
            return web.Response(body=b"media bytes", content_type="application/octet-stream")
        return web.json_response(body, status=status, headers=headers)


@pytest_asyncio.fixture
async def hs() -> AsyncIterator[ScriptedHomeserver]:
    fake = ScriptedHomeserver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    await server.close()


@pytest_asyncio.fixture
async def mx(hs: ScriptedHomeserver, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Matrix]:
    monkeypatch.setattr(matrix, "BACKOFF_S", 0.01)  # transient retries need no real pauses
    client = Client(mxid="@lambda:example.org", base_url=hs.url, token="token")
    yield Matrix(client, logging.getLogger("test.matrix"))
    await client.api.session.close()


async def download(mx: Matrix) -> bytes:
    async with mx.download("example.org", "media") as resp:
        return await resp.read()


async def upload(mx: Matrix) -> str:
    return await mx.upload(b"data", "text/plain", "a.txt")


async def send(mx: Matrix) -> str:
    return await mx.send(ROOM, {"msgtype": "m.notice", "body": "hi"})


CALLS = {"request": (send, "$sent"), "download": (download, b"media bytes")}
CALLS["upload"] = (upload, "mxc://example.org/up")


def limited(ms: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    return 429, {"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": ms}, {}


@pytest.mark.parametrize("call", list(CALLS))
async def test_a_rate_limit_is_waited_out_as_the_server_asks(
    hs: ScriptedHomeserver, mx: Matrix, call: str
) -> None:
    hs.script = [limited(300)]
    action, expected = CALLS[call]
    assert await action(mx) == expected
    assert len(hs.seen) == 2
    assert hs.seen[1][2] - hs.seen[0][2] >= 0.28  # the server's 300 ms, give or take a tick


async def test_the_retry_after_header_is_honoured(hs: ScriptedHomeserver, mx: Matrix) -> None:
    hs.script = [(429, {"errcode": "M_LIMIT_EXCEEDED"}, {"Retry-After": "1"})]
    assert await send(mx) == "$sent"
    assert hs.seen[1][2] - hs.seen[0][2] >= 0.95


async def test_a_post_is_not_retried_after_a_connection_error(
    hs: ScriptedHomeserver, mx: Matrix
) -> None:
    hs.script = [DROP]
    with pytest.raises(HomeserverError) as caught:
        await mx.create_room({"name": "once"})
    assert caught.value.status == 0
    assert [(m, p) for m, p, _ in hs.seen] == [("POST", "/_matrix/client/v3/createRoom")]


@pytest.mark.parametrize("call", list(CALLS))
async def test_idempotent_calls_are_retried_after_a_connection_error(
    hs: ScriptedHomeserver, mx: Matrix, call: str
) -> None:
    hs.script = [DROP]
    action, expected = CALLS[call]
    assert await action(mx) == expected
    assert len(hs.seen) == 2


async def test_a_502_is_retried_transient_tries_times(hs: ScriptedHomeserver, mx: Matrix) -> None:
    hs.script = [(502, {"error": "bad gateway"}, {})] * (TRANSIENT_TRIES + 1)
    with pytest.raises(HomeserverError) as caught:
        await mx.joined_rooms()
    assert caught.value.status == 502
    assert len(hs.seen) == TRANSIENT_TRIES
    assert mx.requests == TRANSIENT_TRIES


async def test_a_502_then_success_is_an_answer(hs: ScriptedHomeserver, mx: Matrix) -> None:
    hs.script = [(502, {"error": "bad gateway"}, {})] * (TRANSIENT_TRIES - 1)
    assert await mx.joined_rooms() == [ROOM]


async def test_a_post_is_not_retried_after_a_502(hs: ScriptedHomeserver, mx: Matrix) -> None:
    hs.script = [(502, {"error": "bad gateway"}, {})]
    with pytest.raises(HomeserverError):
        await mx.create_room({})
    assert len(hs.seen) == 1


async def test_other_errors_are_final_and_carry_the_errcode(
    hs: ScriptedHomeserver, mx: Matrix
) -> None:
    hs.script = [(403, {"errcode": "M_FORBIDDEN", "error": "not allowed"}, {})]
    with pytest.raises(HomeserverError) as caught:
        await send(mx)
    error = caught.value
    assert (error.status, error.errcode, error.message) == (403, "M_FORBIDDEN", "not allowed")
    assert len(hs.seen) == 1


async def test_rooms_state_keeps_only_asked_rooms_in_shape(
    hs: ScriptedHomeserver, mx: Matrix
) -> None:
    create = {"type": "m.room.create", "state_key": "", "content": {}, "sender": "@a:example.org"}
    rooms = {
        "!a:x": {"required_state": [create]},
        "!b:x": {"required_state": "not a list"},
        "!c:x": ["not a room"],
        "!d:x": {},
        "!not-asked:x": {"required_state": [create]},
    }
    hs.script = [(200, {"pos": "1", "rooms": rooms}, {})]
    found = await mx.rooms_state(["!a:x", "!b:x", "!c:x", "!d:x", "!e:x"], ["m.room.create"], "c")
    assert found == {"!a:x": [create]}
    assert hs.seen[-1][:2] == ("POST", matrix.SLIDING_SYNC)
    body = json.loads(hs.bodies[-1])
    wanted = {"required_state": [["m.room.create", "*"]], "timeline_limit": 0}
    assert body == {
        "conn_id": "c",
        "room_subscriptions": dict.fromkeys(["!a:x", "!b:x", "!c:x", "!d:x", "!e:x"], wanted),
    }


@pytest.mark.parametrize("body", [{"rooms": None}, {"rooms": []}, [], "text", None])
async def test_rooms_state_of_an_answer_out_of_shape_is_nothing(
    hs: ScriptedHomeserver, mx: Matrix, body: Any
) -> None:
    hs.script = [(200, body, {})] if body is not None else [(200, {"pos": "1"}, {})]
    assert await mx.rooms_state(["!a:x"], ["m.room.create"], "c") == {}


async def test_rooms_state_of_a_homeserver_without_sliding_sync_is_its_error(
    hs: ScriptedHomeserver, mx: Matrix
) -> None:
    hs.script = [(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}, {})]
    with pytest.raises(HomeserverError) as raised:
        await mx.rooms_state(["!a:x"], ["m.room.create"], "c")
    assert (raised.value.status, raised.value.errcode) == (404, "M_UNRECOGNIZED")


async def test_a_send_waits_out_an_unreachable_homeserver(
    hs: ScriptedHomeserver, mx: Matrix, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    mx.outage_s = lambda: 600.0
    down = [(502, {"error": "bad gateway"}, {})] * (TRANSIENT_TRIES * 3) + [DROP] * 3
    hs.script = list(down)
    monkeypatch.setattr(matrix.asyncio, "sleep", no_wait)
    assert await send(mx) == "$sent"  # once the homeserver is back
    txns = {path for method, path, _ in hs.seen}
    assert len(txns) == 1  # one transaction id throughout: the event is sent once
    assert len(hs.seen) == len(down) + 1


async def test_a_send_refused_with_a_4xx_is_not_waited_out(
    hs: ScriptedHomeserver, mx: Matrix
) -> None:
    mx.outage_s = lambda: 600.0
    hs.script = [(413, {"errcode": "M_TOO_LARGE", "error": "too big"}, {})]
    with pytest.raises(HomeserverError) as caught:
        await send(mx)
    assert caught.value.status == 413 and len(hs.seen) == 1


async def test_an_outage_longer_than_the_bound_is_raised(
    hs: ScriptedHomeserver, mx: Matrix
) -> None:
    mx.outage_s = lambda: 0.5  # less than the first wait: the transient tries, then the error
    hs.script = [(503, {"error": "down"}, {})] * (TRANSIENT_TRIES * 2)
    with pytest.raises(HomeserverError) as caught:
        await send(mx)
    assert caught.value.status == 503 and len(hs.seen) == TRANSIENT_TRIES


async def test_a_partial_does_not_wait_out_an_outage(hs: ScriptedHomeserver, mx: Matrix) -> None:
    mx.outage_s = lambda: 600.0
    hs.script = [(502, {"error": "bad gateway"}, {})] * (TRANSIENT_TRIES * 2)
    with pytest.raises(HomeserverError):
        await mx.send(ROOM, {"msgtype": "m.notice", "body": "partial"}, wait_outage=False)
    assert len(hs.seen) == TRANSIENT_TRIES
