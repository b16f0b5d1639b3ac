"""!help and the other commands at handler level: the real LambdaBot in maubot.testing's
harness.

The plugin may answer through maubot's client (which maubot.testing's MaubotTestBot records) or
through its own HTTP calls on the client's session; the MaubotTestBot here points at a small fake
homeserver on 127.0.0.1 that records what is sent, so both ways are seen and nothing goes out
to the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from maubot.handlers.command import CommandHandler
from maubot.matrix import MaubotMessageEvent
from maubot.testing import TestBot as MaubotTestBot
from maubot.testing.bot import make_message
from mautrix.types import EventID, EventType
from mautrix.util.config import RecursiveDict
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

import lambda_plugin
from lambda_plugin.bot import COMMAND_CLASSES
from lambda_plugin.commands import command_names
from lambda_plugin.config import Config
from lambda_plugin.db import ChatRoomRow, SnapshotRow, upgrade_table
from lambda_plugin.replies import Link, notice_content
from lambda_plugin.texts import ADMIN_COMMANDS, COMMANDS, text

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 10


class FakeHomeserver:
    """Just enough of the client-server API for the plugin's own requests; records them all."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self.sent: list[tuple[str, str, Any]] = []  # (room id, event type, content)
        self.state: list[tuple[str, str, Any]] = []  # state sent: (room id, event type, content)
        self.joined_rooms_failures = 0  # how many /joined_rooms calls answer 502 first
        self.refused_state: set[str] = set()  # state event types answered 403

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        body = json.loads(raw) if raw else None
        self.requests.append((request.method, request.path))
        parts = [unquote(p) for p in request.raw_path.split("?")[0].split("/")]
        # /_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}
        if request.method == "PUT" and len(parts) >= 4 and parts[-3] == "send":
            self.sent.append((parts[-4], parts[-2], body))
            return web.json_response({"event_id": f"$sent{len(self.sent)}"})
        # /_matrix/client/v3/rooms/{room_id}/state/{event_type}/{state_key}
        if request.method == "PUT" and len(parts) >= 4 and parts[-3] == "state":
            if parts[-2] in self.refused_state:
                return web.json_response({"errcode": "M_FORBIDDEN", "error": "no"}, status=403)
            self.state.append((parts[-4], parts[-2], body))
            return web.json_response({"event_id": f"$state{len(self.state)}"})
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
    for usage in ("!help", "!new", "!chats", "!rename", "!archive", "!clear", "!agent"):
        assert usage in body
    assert "!lambda" not in body  # an admin command: alice is no admin
    assert "list the commands" in body
    assert "🛑 to an answer" in body and "reply to a message" in body
    assert "Edit your latest message" in body and "react 🔁" in body
    html = content["formatted_body"]
    assert "<code>!help</code>" in html
    assert "<code>!rename &lt;name&gt;</code>" in html
    assert "<strong>Lambda</strong>" in html


def test_help_lists_exactly_the_registered_commands() -> None:
    # !help's lines come from texts.COMMANDS, the answers from the handlers maubot registers:
    # a command added, renamed or removed on one side only fails here.
    registered = command_names(COMMAND_CLASSES)
    listed = [usage.split()[0].lstrip("!") for usage, _ in COMMANDS + ADMIN_COMMANDS]
    assert len(listed) == len(set(listed))
    assert set(listed) == registered
    for _, description in COMMANDS + ADMIN_COMMANDS:
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


@pytest.mark.parametrize(
    ("maubot_plugin_config_overrides", "alice_allowed"),
    [
        ({"language": "klingon"}, True),  # the operator's list: everyone
        ({"language": "klingon", "access": {"allowed_users": ["@boss:example.com"]}}, False),
        ({"language": "klingon", "access": {"allowed_users": "@alice:example.com"}}, False),
    ],
)
async def test_refused_config_starts_with_base_defaults(
    maubot_plugin, maubot_test_bot, homeserver, alice_allowed: bool
) -> None:
    # start() must never raise: a bad config falls back to base-config's values, but who may
    # use the bot stays the operator's (the defaults let everyone in); an access list that
    # can't be read lets nobody in.
    assert maubot_plugin.settings.language == "en"
    assert ("@alice:example.com" in maubot_plugin.settings.allowed_users) is alice_allowed
    content = await ask_help(maubot_test_bot, homeserver)
    assert "list the commands" in content["body"]


async def test_help_from_the_bot_itself_is_ignored(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    await maubot_test_bot.send("!help", room_id="!chat:example.com", sender="@lambda:example.com")
    assert notices(maubot_test_bot, homeserver) == []


async def test_start_wires_the_store(maubot_plugin) -> None:
    assert await maubot_plugin.database.fetchval("SELECT version FROM version") == 7
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


# --- commands at handler level: in the room's turn, snapshots, no maubot usage text ---------

ALICE = "@alice:example.com"
GUEST = "@guest:example.com"
ADMIN = "@admin:example.com"
CHAT = "!chat:example.com"
TWO_ECHOES = {
    "agents": {"default": "echo", "registry": {"echo": {"backend": "echo"}, "echo2": {"backend": "echo"}}},
    "access": {"admins": [ADMIN]},
}
_events = itertools.count(1)


async def dispatch(bot: MaubotTestBot, body: str, sender: str = ALICE, room_id: str = CHAT) -> None:
    """A text message as maubot hands it to the plugin's handlers (an event id of its own)."""
    event = make_message(body, room_id=room_id, sender=sender)
    event.event_id = EventID(f"$cmd{next(_events)}")
    await bot.dispatch(EventType.ROOM_MESSAGE, MaubotMessageEvent(event, bot.client))


async def chat_room(plugin: Any, agent_id: str = "echo") -> ChatRoomRow:
    """Alice's chat room, known to the plugin once its start is done."""
    assert await asyncio.wait_for(plugin.gate.wait(), TIMEOUT)
    row = ChatRoomRow(CHAT, ALICE, "C1", "Chat 1", agent_id, "pc-1", False, False, 1)
    await plugin.store.ensure_user(ALICE)
    await plugin.store.set_space(ALICE, "!space:example.com")
    await plugin.store.upsert_room(row)
    await plugin.registry.load()
    return row


def bodies(bot: MaubotTestBot, hs: FakeHomeserver) -> list[str]:
    return [content["body"] for _, content in notices(bot, hs)]


async def answered(bot: MaubotTestBot, hs: FakeHomeserver, count: int) -> list[str]:
    """The bodies of the plugin's notices once there are ``count`` of them."""
    deadline = time.monotonic() + TIMEOUT
    while len(bodies(bot, hs)) < count:
        assert time.monotonic() < deadline, bodies(bot, hs)
        await asyncio.sleep(0.01)
    return bodies(bot, hs)


def hold_room(plugin: Any) -> asyncio.Future:
    """Keeps the chat room busy (as a running answer does) until the future is set."""
    held = asyncio.get_running_loop().create_future()
    plugin.queues.worker(CHAT).push(held)
    return held


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("!save draft", "!load draft", "continues from snapshot **draft**"),
        ("!clear", "!context", "{pcid}"),
        ("!agent echo2", "!agent", "talks to `echo2`"),
        ("!agent echo2", "!context", "agent: `echo2`"),
        ("!rename Renamed", "!chats", "Renamed <https://matrix.to/#/!chat"),
        ("!archive", "!chats archived", "Chat 1 <https://matrix.to/#/!chat"),
        # The fork reads the snapshot, then the fake homeserver refuses the new room.
        ("!save draft", "!new Fork --from draft", "homeserver refused"),
    ],
)
async def test_a_command_reads_what_the_one_before_it_wrote_in_a_busy_room(
    maubot_plugin, maubot_test_bot, homeserver, first: str, second: str, expected: str
) -> None:
    await chat_room(maubot_plugin)
    await maubot_plugin.store.append_history("pc-1", [("user", "hi"), ("assistant", "echo: hi")])
    held = hold_room(maubot_plugin)
    await dispatch(maubot_test_bot, first)
    await dispatch(maubot_test_bot, second)
    assert bodies(maubot_test_bot, homeserver) == []  # both wait for the room's turn
    held.set_result(None)
    said = await answered(maubot_test_bot, homeserver, 2)
    pcid = maubot_plugin.registry.rooms[CHAT].platform_chat_id
    assert expected.format(pcid=pcid) in said[1], said


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
async def test_another_members_command_takes_no_place_in_the_owners_queue(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    await chat_room(maubot_plugin)
    held = hold_room(maubot_plugin)
    for command in ("!context", "!clear", "!save x", "!rename Hijacked", "!chats"):
        await dispatch(maubot_test_bot, command, sender=GUEST)
    assert maubot_plugin.queues.worker(CHAT).places == 0  # behind the owner's running answer
    # Told at once, not after it, and once (not once per command: no flooding the room).
    said = await answered(maubot_test_bot, homeserver, 2)
    assert sum("one of your chat rooms" in body for body in said) == 1, said
    held.set_result(None)
    await dispatch(maubot_test_bot, "!context")  # the owner's: answered after the others
    said = await answered(maubot_test_bot, homeserver, 3)
    assert sum("one of your chat rooms" in body for body in said) == 1, said
    assert maubot_plugin.registry.rooms[CHAT].name == "Chat 1"


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
async def test_load_continues_with_the_snapshots_agent_and_says_so(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    store = maubot_plugin.store
    await chat_room(maubot_plugin)
    await store.append_history("pc-1", [("user", "old"), ("assistant", "echo: old")])
    messages = json.dumps({"version": 1, "messages": [{"role": "user", "content": "saved"}]})
    await store.save_snapshot(SnapshotRow(ALICE, "elsewhere", "echo2", "pc-x", messages, 1))
    await dispatch(maubot_test_bot, "!load elsewhere")
    said = await answered(maubot_test_bot, homeserver, 1)
    room = maubot_plugin.registry.rooms[CHAT]
    assert room.agent_id == "echo2" and room.platform_chat_id != "pc-1"
    assert "with the agent `echo2`" in said[0] and room.platform_chat_id in said[0]
    assert [r.content for r in await store.history(room.platform_chat_id)] == ["saved"]
    assert await store.history("pc-1") == []  # the replaced conversation is dropped
    # A snapshot of an agent no longer configured continues with the default one.
    await store.save_snapshot(SnapshotRow(ALICE, "gone", "retired", "pc-y", messages, 1))
    await dispatch(maubot_test_bot, "!load gone")
    said = await answered(maubot_test_bot, homeserver, 2)
    assert maubot_plugin.registry.rooms[CHAT].agent_id == "echo" and "`echo`" in said[1]


SMALL_SNAPSHOTS = {**TWO_ECHOES, "history": {"max_turns": 4, "max_kb": 64, "max_snapshot_kb": 1}}


@pytest.mark.parametrize("maubot_plugin_config_overrides", [SMALL_SNAPSHOTS])
async def test_snapshots_past_their_bound_are_neither_saved_nor_loaded(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    store = maubot_plugin.store
    await chat_room(maubot_plugin)
    await store.append_history("pc-1", [("user", "x" * 1500)])
    await dispatch(maubot_test_bot, "!save big")
    said = await answered(maubot_test_bot, homeserver, 1)
    assert "nothing was saved" in said[0] and "2 KB" in said[0] and "1 KB" in said[0]
    assert await store.snapshot_names(ALICE) == []
    # One saved before the bound: refused unread, by !load and by !new --from.
    big = json.dumps({"version": 1, "messages": [{"role": "user", "content": "y" * 3000}]})
    await store.save_snapshot(SnapshotRow(ALICE, "old", "echo", "pc-old", big, 1))
    await dispatch(maubot_test_bot, "!load old")
    await dispatch(maubot_test_bot, "!new Fork --from old")
    said = await answered(maubot_test_bot, homeserver, 3)
    assert all("can't be used" in body for body in said[1:]), said
    assert maubot_plugin.registry.rooms[CHAT].platform_chat_id == "pc-1"
    assert len(maubot_plugin.registry.rooms) == 1


@pytest.mark.parametrize("maubot_plugin_config_overrides", [SMALL_SNAPSHOTS])
async def test_context_says_how_many_older_turns_were_pruned(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    await chat_room(maubot_plugin)
    for i in range(5):
        await maubot_plugin.store.append_history("pc-1", [("user", f"q{i}"), ("assistant", "a")])
    await dispatch(maubot_test_bot, "!context")
    said = await answered(maubot_test_bot, homeserver, 1)
    assert "messages: 4" in said[0] and "older turns pruned: 6" in said[0], said


def handlers_of(classes: tuple[type, ...]) -> list[CommandHandler]:
    found: list[CommandHandler] = []
    todo = [v for cls in classes for v in vars(cls).values() if isinstance(v, CommandHandler)]
    while todo:
        handler = todo.pop()
        found.append(handler)
        todo.extend(handler.__mb_subcommands__)
    return found


def test_no_command_leaves_its_words_to_maubots_usage_text() -> None:
    # maubot answers "**Usage:** …" itself to words a handler does not consume, to a missing
    # required argument and to an unknown subcommand, before any check of ours.
    handlers = handlers_of(COMMAND_CLASSES)
    assert len(handlers) > 15
    for handler in handlers:
        name = handler.__mb_prefix__
        args = handler.__mb_arguments__
        assert not any(arg.required for arg in args), name
        assert not handler.__mb_must_consume_args__ or any(arg.pass_raw for arg in args), name
        assert not handler.__mb_subcommands__ or not handler.__mb_require_subcommand__, name


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
@pytest.mark.parametrize(
    ("sender", "body", "expected"),
    [
        (ALICE, "!lambda status extra words", "for the bot's admins"),
        (ALICE, "!lambda bogus", "for the bot's admins"),
        (ALICE, "!lambda", "for the bot's admins"),
        (ADMIN, "!lambda bogus words", "`!lambda status`"),
        (ALICE, "!help me please", "list the commands"),
        (ALICE, "!cancel now", "Nothing is running"),
    ],
)
async def test_extra_words_get_our_answer_never_maubots_usage(
    maubot_plugin, maubot_test_bot, homeserver, sender: str, body: str, expected: str
) -> None:
    await chat_room(maubot_plugin)
    await dispatch(maubot_test_bot, body, sender=sender)
    said = await answered(maubot_test_bot, homeserver, 1)
    assert len(said) == 1 and expected in said[0], said
    assert "Usage:**" not in said[0] and "Subcommands" not in said[0]


# --- what a client shows: rooms linked by name, !help by role, the topic, the Space -------

SPACE = "!space:example.com"
CHAT_URL = "https://matrix.to/#/!chat:example.com?via=example.com"
# In the HTML the URL is normalised (CommonMark percent-encodes the "!"; matrix.to and the
# clients decode it, as the spec's matrix.to URIs allow).
CHAT_HREF = CHAT_URL.replace("!", "%21")
HOSTILE_NAMES = [
    "[x](https://evil.example)",
    "<b>bold</b> <a href='https://evil.example'>y</a>",
    "*star* _under_ **strong**",
    "`code` ]",
    "<https://evil.example>",
    "a\\",
    "&amp; &lt; 1. # !",
]


def contents(bot: MaubotTestBot, hs: FakeHomeserver) -> list[tuple[str, dict[str, Any]]]:
    return notices(bot, hs)


def html_text(name: str) -> str:
    """``name`` as the HTML shows it: its characters, escaped, never markup."""
    return name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
@pytest.mark.parametrize("name", ["Chat 1", *HOSTILE_NAMES])
async def test_chats_link_each_room_by_its_name_and_nothing_else(
    maubot_plugin, maubot_test_bot, homeserver, name: str
) -> None:
    row = await chat_room(maubot_plugin)
    await maubot_plugin.store.upsert_room(dataclasses.replace(row, name=name))
    await maubot_plugin.registry.load()
    await dispatch(maubot_test_bot, "!chats")
    await answered(maubot_test_bot, homeserver, 1)
    content = contents(maubot_test_bot, homeserver)[0][1]
    html, body = content["formatted_body"], content["body"]
    assert f'<a href="{CHAT_HREF}">{html_text(name)}</a>' in html, html
    assert html.count("<a ") == 1 and "evil.example\"" not in html, html
    for tag in ("<b>", "<em>", "<strong>", "<code>c", "<ol", "<h1"):
        assert tag not in html, html
    # The plain body: the name as it is and the URL; no Markdown link syntax.
    assert f"{name} <{CHAT_URL}> (C1)" in body, body
    assert "](" not in body.replace(name, "")


def test_a_link_in_a_text_is_an_anchor_in_html_and_name_and_url_in_the_body() -> None:
    link = Link("Ideas [draft]", "https://matrix.to/#/!r:hs?via=hs")
    content = notice_content(
        text("en", "new.created", link=link.markdown()),
        plain=text("en", "new.created", link=link.plain()),
    )
    assert '<a href="https://matrix.to/#/%21r:hs?via=hs">Ideas [draft]</a>' in content["formatted_body"]
    assert content["body"].startswith("Created Ideas [draft] <https://matrix.to/#/!r:hs?via=hs>")
    # A name of spaces only, or none, is linked by its URL: never an anchor nobody sees.
    assert ">https://matrix.to/#/!r:hs?via=hs</a>" in notice_content(Link(" ", link.url).markdown())[
        "formatted_body"
    ]


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
@pytest.mark.parametrize(("sender", "admin"), [(ALICE, False), (ADMIN, True)])
async def test_help_shows_admin_lines_and_operator_wording_to_admins_only(
    maubot_plugin, maubot_test_bot, homeserver, sender: str, admin: bool
) -> None:
    await chat_room(maubot_plugin)
    await dispatch(maubot_test_bot, "!help", sender=sender)
    body = (await answered(maubot_test_bot, homeserver, 1))[0]
    assert_in_order(body, [usage for usage, _ in COMMANDS])
    for usage, _ in ADMIN_COMMANDS:
        assert (usage in body) is admin, body
    for operator_word in ("operator", "config", "`transcription`"):
        assert (operator_word in body) is admin, body
    assert "Voice messages are not transcribed here" in body


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
@pytest.mark.parametrize("refused", [False, True])
async def test_agent_switch_sets_the_topic_and_a_refused_topic_fails_nothing(
    maubot_plugin, maubot_test_bot, homeserver, refused: bool
) -> None:
    await chat_room(maubot_plugin)
    if refused:
        homeserver.refused_state = {"m.room.topic"}
    await dispatch(maubot_test_bot, "!agent echo2")
    said = await answered(maubot_test_bot, homeserver, 1)
    assert said == ["This chat now talks to `echo2`."]
    assert maubot_plugin.registry.rooms[CHAT].agent_id == "echo2"
    topics = [(r, c) for r, t, c in homeserver.state if t == "m.room.topic"]
    assert topics == ([] if refused else [(CHAT, {"topic": "echo2 · !help"})])


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
async def test_the_space_answers_its_owner_with_the_chats_once_a_while(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    await chat_room(maubot_plugin)
    await dispatch(maubot_test_bot, "hello", room_id=SPACE)
    await answered(maubot_test_bot, homeserver, 1)
    room_id, content = contents(maubot_test_bot, homeserver)[0]
    assert room_id == SPACE
    assert f'<a href="{CHAT_HREF}">Chat 1</a>' in content["formatted_body"]
    assert f"Chat 1 <{CHAT_URL}>" in content["body"]
    assert "!space" not in content["body"] + content["formatted_body"]  # never itself
    # Again soon, or from another member: nothing (no amplifier); a command still answers,
    # in the Space's turn, after them.
    await dispatch(maubot_test_bot, "hello again", room_id=SPACE)
    await dispatch(maubot_test_bot, "hi", room_id=SPACE, sender=GUEST)
    await dispatch(maubot_test_bot, "!chats", room_id=SPACE)
    said = await answered(maubot_test_bot, homeserver, 2)
    assert len(said) == 2 and "Your chats:" in said[1], said


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
async def test_a_chat_command_in_the_space_gets_the_chats_with_it(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    await chat_room(maubot_plugin)
    await dispatch(maubot_test_bot, "!rename Elsewhere", room_id=SPACE)
    said = await answered(maubot_test_bot, homeserver, 1)
    room_id, content = contents(maubot_test_bot, homeserver)[0]
    assert room_id == SPACE and "one of your chat rooms" in said[0]
    assert f'<a href="{CHAT_HREF}">Chat 1</a>' in content["formatted_body"]
    assert maubot_plugin.registry.rooms[CHAT].name == "Chat 1"


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
async def test_another_room_points_to_the_space_by_a_named_link(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    await chat_room(maubot_plugin)
    await dispatch(maubot_test_bot, "hello", room_id="!elsewhere:example.com")
    said = await answered(maubot_test_bot, homeserver, 1)
    space_url = "https://matrix.to/#/!space:example.com?via=example.com"
    html = contents(maubot_test_bot, homeserver)[0][1]["formatted_body"]
    assert f'<a href="{space_url.replace("!", "%21")}">your Space</a>' in html
    assert f"your Space <{space_url}>" in said[0]


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
async def test_a_snapshot_name_adds_no_markup_or_link(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    await chat_room(maubot_plugin)
    await dispatch(maubot_test_bot, "!save a**[click](https://evil.example)**")
    await dispatch(maubot_test_bot, "!save `break` out")
    await dispatch(maubot_test_bot, "!load nope[x](https://evil.example)")
    await answered(maubot_test_bot, homeserver, 3)
    contents = [content for _, content in notices(maubot_test_bot, homeserver)]
    assert len(contents) == 3, contents
    assert all("<a " not in content.get("formatted_body", "") for content in contents)
    [saved] = [c["body"] for c in contents if c["body"].startswith("Saved")]
    assert "`!load a**[click](https://evil.example)**`" in saved
    # Refused: a backtick would end the code the name is shown in.
    assert any("e.g. `!save draft`" in c["body"] for c in contents)
    assert await maubot_plugin.store.snapshot_names(ALICE) == ["a**[click](https://evil.example)**"]


@pytest.mark.parametrize("maubot_plugin_config_overrides", [TWO_ECHOES])
async def test_a_command_stopped_while_it_runs_is_not_run_again_at_the_next_start(
    maubot_plugin, maubot_test_bot, homeserver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop (the instance's, an upgrade) while !new runs in its turn: the room may be made
    already, so the next start must not make it again."""
    from lambda_plugin.catchup import plan_start
    from lambda_plugin.spaces import Spaces

    await chat_room(maubot_plugin)
    made: list[str | None] = []

    async def new_chat(self: Any, user_id: str, name: str | None = None, *_: Any, **__: Any) -> Any:
        made.append(name)  # the room made on the homeserver here; the reply still to come
        await asyncio.Event().wait()

    monkeypatch.setattr(Spaces, "new_chat", new_chat)
    await dispatch(maubot_test_bot, "!new Research")
    deadline = time.monotonic() + TIMEOUT
    while not made:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await maubot_plugin.queues.stop()  # what the instance's stop does
    unfinished = await maubot_plugin.ledger.unfinished()
    plan = plan_start({}, unfinished, {}, "@lambda:example.com", 0)
    assert not [i for items in plan.rooms.values() for i in items if i.command == "new"]


ONE_CHAT = {**TWO_ECHOES, "access": {"admins": [], "max_chats_per_user": 1}}


@pytest.mark.parametrize("maubot_plugin_config_overrides", [ONE_CHAT])
async def test_a_refused_fork_leaves_no_restored_conversation(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    store = maubot_plugin.store
    await chat_room(maubot_plugin)
    turns = [{"role": "user", "content": "x" * 1000}] * 50
    await store.save_snapshot(
        SnapshotRow(ALICE, "big", "echo", "pc-x", json.dumps({"version": 1, "messages": turns}), 1)
    )
    for _ in range(3):
        await dispatch(maubot_test_bot, "!new Fork --from big")
    said = await answered(maubot_test_bot, homeserver, 3)
    assert all("at most 1" in body or "1 chat" in body for body in said), said
    orphans = await maubot_plugin.database.fetchval(
        "SELECT COUNT(*) FROM history"
        " WHERE platform_chat_id NOT IN (SELECT platform_chat_id FROM chat_room)"
    )
    assert orphans == 0


NOT_ALICE = {**TWO_ECHOES, "access": {"admins": [], "allowed_users": ["@boss:example.com"]}}


@pytest.mark.parametrize("maubot_plugin_config_overrides", [NOT_ALICE])
async def test_the_owners_command_waits_its_turn_even_when_no_longer_allowed(
    maubot_plugin, maubot_test_bot, homeserver
) -> None:
    # Out of turn, her !clear would run beside the answer already running.
    await chat_room(maubot_plugin)
    held = hold_room(maubot_plugin)
    await dispatch(maubot_test_bot, "!clear")
    assert maubot_plugin.queues.worker(CHAT).places == 1
    held.set_result(None)
