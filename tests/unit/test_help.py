"""!help at handler level: the real LambdaBot in maubot.testing's harness.

The plugin may answer through maubot's client (which maubot.testing's MaubotTestBot records) or
through its own HTTP calls on the client's session; the MaubotTestBot here points at a small fake
homeserver on 127.0.0.1 that records what is sent, so both ways are seen and nothing goes out
to the network.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from maubot.testing import TestBot as MaubotTestBot
from mautrix.types import EventType
from mautrix.util.config import RecursiveDict
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

import lambda_plugin
from lambda_plugin.bot import COMMAND_CLASSES
from lambda_plugin.commands import command_names
from lambda_plugin.config import Config
from lambda_plugin.db import upgrade_table
from lambda_plugin.texts import COMMANDS

REPO = Path(__file__).resolve().parents[2]


class FakeHomeserver:
    """Just enough of the client-server API for the plugin's own requests; records them all."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self.sent: list[tuple[str, str, Any]] = []  # (room id, event type, content)
        self.joined_rooms_failures = 0  # how many /joined_rooms calls answer 502 first

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        body = json.loads(raw) if raw else None
        self.requests.append((request.method, request.path))
        parts = [unquote(p) for p in request.raw_path.split("?")[0].split("/")]
        # /_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}
        if request.method == "PUT" and len(parts) >= 4 and parts[-3] == "send":
            self.sent.append((parts[-4], parts[-2], body))
            return web.json_response({"event_id": f"$sent{len(self.sent)}"})
        if request.method == "GET" and request.path.endswith("/joined_rooms"):
            if self.joined_rooms_failures > 0:
                self.joined_rooms_failures -= 1
                return web.json_response({"errcode": "M_UNKNOWN", "error": "down"}, status=502)
            return web.json_response({"joined_rooms": []})  # lets reconciliation finish
        if request.method == "GET" and request.path.endswith("/sync"):
            return web.json_response({"next_batch": "s1", "rooms": {}})
        return web.json_response(
            {"errcode": "M_UNRECOGNIZED", "error": f"fake homeserver: {request.path}"}, status=404
        )


@pytest_asyncio.fixture
async def homeserver() -> AsyncIterator[FakeHomeserver]:
    hs = FakeHomeserver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hs.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    hs.url = str(server.make_url("")).rstrip("/")
    yield hs
    await server.close()


@pytest_asyncio.fixture
async def maubot_test_bot(homeserver: FakeHomeserver) -> AsyncIterator[MaubotTestBot]:
    bot = MaubotTestBot(mxid="@lambda:example.com", mxurl=homeserver.url)
    yield bot
    await bot.client.api.session.close()


@pytest.fixture
def maubot_plugin_class() -> type:
    return lambda_plugin.LambdaBot


@pytest.fixture
def maubot_plugin_config_class() -> type:
    return Config


@pytest.fixture
def maubot_upgrade_table():
    return upgrade_table


@pytest.fixture
def maubot_plugin_path() -> Path:
    return REPO


@pytest.fixture
def maubot_plugin_config(
    maubot_plugin_path: Path,
    maubot_plugin_config_class: type,
    maubot_plugin_config_dict: dict,
    maubot_plugin_config_overrides: dict,
) -> Config:
    # As maubot.testing builds it, except that load_base hands out a fresh copy of
    # base-config each time, as a real maubot instance does (base_cfg.clone): maubot.testing
    # returns one shared object, which load_and_update then turns into the user's config.
    with open(maubot_plugin_path / "base-config.yaml", encoding="utf-8") as fh:
        base = RecursiveDict(YAML().load(fh), CommentedMap)
    user = {**maubot_plugin_config_dict, **maubot_plugin_config_overrides}
    return maubot_plugin_config_class(load=lambda: user, load_base=base.clone, save=lambda _: None)


@pytest_asyncio.fixture
async def maubot_plugin(maubot_plugin):  # maubot.testing's instance, stopped at the end
    yield maubot_plugin
    await maubot_plugin.internal_stop()


def notices(bot: MaubotTestBot, hs: FakeHomeserver) -> list[tuple[str, dict[str, Any]]]:
    """Every m.room.message the plugin sent, by either way, as (room id, content)."""
    out = []
    for event in bot.responded:
        if event.event_type == EventType.ROOM_MESSAGE:
            content = event.content
            out.append(
                (event.room_id, content if isinstance(content, dict) else content.serialize())
            )
    out += [(room, content) for room, etype, content in hs.sent if etype == "m.room.message"]
    return out


async def ask_help(bot: MaubotTestBot, hs: FakeHomeserver) -> dict[str, Any]:
    await bot.send("!help", room_id="!chat:example.com", sender="@alice:example.com")
    sent = notices(bot, hs)
    assert len(sent) == 1, sent
    room_id, content = sent[0]
    assert room_id == "!chat:example.com"
    assert content["msgtype"] == "m.notice"
    return content


def assert_in_order(text: str, parts: list[str]) -> None:
    position = -1
    for part in parts:
        found = text.find(part, position + 1)
        assert found > position, f"{part!r} missing or out of order in {text!r}"
        position = found


async def test_help_lists_every_command(maubot_plugin, maubot_test_bot, homeserver) -> None:
    content = await ask_help(maubot_test_bot, homeserver)
    body = content["body"]
    assert "Lambda" in body
    assert "talk to AI agents" in body
    assert_in_order(body, [usage for usage, _ in COMMANDS])
    for usage, description in COMMANDS:
        assert description["en"] in body, usage
    for usage in ("!help", "!new", "!chats", "!rename", "!archive", "!clear", "!agent", "!lambda"):
        assert usage in body
    assert "list the commands" in body
    html = content["formatted_body"]
    assert "<code>!help</code>" in html
    assert "<code>!rename &lt;name&gt;</code>" in html
    assert "<strong>Lambda</strong>" in html


def test_help_lists_exactly_the_registered_commands() -> None:
    # !help's lines come from texts.COMMANDS, the answers from the handlers maubot registers:
    # a command added, renamed or removed on one side only fails here.
    registered = command_names(COMMAND_CLASSES)
    listed = [usage.split()[0].lstrip("!") for usage, _ in COMMANDS]
    assert len(listed) == len(set(listed))
    assert set(listed) == registered
    for _, description in COMMANDS:
        assert description.get("en") and description.get("ru")


@pytest.mark.parametrize("maubot_plugin_config_overrides", [{"language": "ru"}])
async def test_help_in_russian(maubot_plugin, maubot_test_bot, homeserver) -> None:
    assert maubot_plugin.settings.language == "ru"
    content = await ask_help(maubot_test_bot, homeserver)
    body = content["body"]
    assert "разговор с ИИ-агентами" in body
    assert "список команд" in body
    assert_in_order(body, [usage for usage, _ in COMMANDS])
    for usage, description in COMMANDS:
        assert description["ru"] in body, usage
        assert description["en"] not in body, usage
    assert "talk to AI agents" not in body


@pytest.mark.parametrize("maubot_plugin_config_overrides", [{"language": "klingon"}])
async def test_refused_config_starts_with_base_defaults(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    # start() must never raise: a bad config falls back to base-config's values.
    assert maubot_plugin.settings.language == "en"
    content = await ask_help(maubot_test_bot, homeserver)
    assert "list the commands" in content["body"]


async def test_help_from_the_bot_itself_is_ignored(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    await maubot_test_bot.send("!help", room_id="!chat:example.com", sender="@lambda:example.com")
    assert notices(maubot_test_bot, homeserver) == []


async def test_start_wires_the_store(maubot_plugin) -> None:
    assert await maubot_plugin.database.fetchval("SELECT version FROM version") == 4
    counts = await maubot_plugin.store.counts()
    assert counts == dict.fromkeys(counts, 0)
    assert set(counts) == {"lambda_user", "chat_room", "snapshot", "history", "ledger", "usage"}
    assert not await maubot_plugin.database.table_exists("handled_event")
    # The store waits out a database outage as long as the config says.
    assert maubot_plugin.store.outage_s() == maubot_plugin.settings.database_wait_s == 600.0
    assert maubot_plugin.ledger.store is maubot_plugin.store


@pytest_asyncio.fixture
async def failing_homeserver(homeserver: FakeHomeserver) -> FakeHomeserver:
    homeserver.joined_rooms_failures = 6  # two start-up attempts of three tries each
    return homeserver


async def test_start_survives_a_homeserver_that_is_down(
    failing_homeserver, maubot_plugin, maubot_test_bot
) -> None:
    # start() returned (the fixture got the plugin) although reconciliation failed: it
    # retries in the background, and a command sent meanwhile is answered once it is ready.
    assert not maubot_plugin.gate.is_open
    content = await ask_help(maubot_test_bot, failing_homeserver)
    assert "list the commands" in content["body"]
    assert maubot_plugin.gate.is_open
    assert failing_homeserver.joined_rooms_failures == 0
