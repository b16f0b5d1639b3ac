"""Users on another homeserver (issue 21): the bot on ``home``, its users on ``remote``, the two
federating on 127.0.0.1 (tests/conftest.py ``federation``), on both plugin database engines.

One remote user per engine is onboarded once (with federation slowed down on purpose) and
shared by the tests that don't interfere with each other; the encrypted exchange has a user
of its own. Onboarding here doesn't wait for the welcome: whether it reaches a remote user's
sync at all (their sync starts at their join) is a test of its own."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from devstack.federation import FederatedPair, sign_up
from devstack.matrix import MatrixUser
from devstack.stack import Deployment
from lambda_plugin.files import user_dir
from lambda_plugin.intake import ANSWERS
from lambda_plugin.texts import TEXTS
from tests.servers.lambda_server import LambdaServer
from tests.servers.openai_server import OpenAIServer

from ..conftest import remote_name
from .helpers import (
    Onboarded,
    answer_to,
    answers_to,
    ask,
    bot_joined,
    bot_messages,
    is_room_invite,
    is_space_invite,
    join_chat,
    notice_text,
)
from .test_encryption import assert_sealed, need_crypto
from .test_order_and_noise import start_instance, stop_instance, wipe_plugin_database
from .test_voice_and_usage import (
    AUDIO,
    HEARD,
    config_text,
    from_bot,
    put_config_text,
    send_voice,
    transcription_requests,
)

pytestmark = pytest.mark.real
MARKER = "ai.lambda.matrix.room"
PCID = re.compile(r"platform_chat_id: `?([\w-]+)`?")
FEDERATION_DELAY_S = 1.5  # each federation request to the bot's server (and answer) waits
INVITES_WITHIN_S = 30
# A display name as a remote server may hold it: the one name rule makes it one clean line.
DISPLAY_NAME = "Zoë\u200b\nFar\u202eaway "
SPACE_NAME = "Lambda — Zoë Far away"
ROWS = "SELECT room_id, chat_id, name, agent_id, platform_chat_id, archived FROM chat_room"


@dataclass
class Timing:
    """How an onboarding went, as the user saw it."""

    space_after_s: float  # from the DM's creation to the Space invite
    room_after_s: float  # ... to the chat room invite
    spaces_invited: int  # Space invites the user had then


@dataclass
class Far:
    """The module's shared remote user, onboarded once per engine."""

    stack: Deployment
    user: MatrixUser
    got: Onboarded
    timing: Timing
    workspace: Path
    platform: LambdaServer
    openai: OpenAIServer


def is_welcome(body: object) -> bool:
    """Whether ``body`` is the welcome text (its start and end, around the names)."""
    welcome = TEXTS["en"]["welcome"]
    start, end = welcome.split("{", 1)[0], welcome.rsplit("}", 1)[1]
    return isinstance(body, str) and body.startswith(start) and body.endswith(end)


def link_in(notice: dict) -> str:
    return notice_text(notice).split("/#/")[1].split("?")[0]


async def onboard_remote(
    user: MatrixUser, stack: Deployment, encrypted: bool = False
) -> tuple[Onboarded, Timing]:
    """The DM to the bot, the Space and first chat invites (both within 30 s), both joined.
    No wait for the welcome (see the module)."""
    started = time.monotonic()
    dm = await user.dm(stack.bot_id, encrypted=encrypted)
    space = await user.wait_for_invite(is_space_invite, INVITES_WITHIN_S)
    space_after = time.monotonic() - started
    room = await user.wait_for_invite(is_room_invite, max(INVITES_WITHIN_S - space_after, 1))
    timing = Timing(
        space_after,
        time.monotonic() - started,
        len([r for r, s in user.invites.items() if is_space_invite(r, s)]),
    )
    await user.join(space)
    await user.join(room)
    await user.wait_for_event(room, bot_joined(user.user_id))
    return Onboarded(dm, space, room), timing


async def configure_services(stack: Deployment, root: Path, platform: str, openai: str) -> None:
    """A workspace for files, a Lambda platform agent ``fedfiles``, and a transcriber."""
    await stack.configure(
        {
            "files": {"workspace_root": str(root), "max_size_mb": 1},
            "agents": {"registry": {"fedfiles": {"backend": "lambda", "base_url": platform}}},
            "transcription": {"base_url": openai, "model": "whisper-1", "api_key": "sk-fed"},
        }
    )


@pytest_asyncio.fixture(scope="module")
async def far(
    federated_stack: Deployment, federation: FederatedPair, remote_synapse
) -> AsyncIterator[Far]:
    """A user of the remote server with a display name to clean, onboarded while every
    federation request to the bot's server waits 1.5 s; the agents' servers for files and
    voice, and a workspace."""
    stack = federated_stack
    platform, openai = LambdaServer(), OpenAIServer()
    root = Path(tempfile.mkdtemp(prefix="lambda-fed-workspace-"))
    before = await config_text(stack)
    user: MatrixUser | None = None
    try:
        await configure_services(stack, root, await platform.start(), await openai.start())
        user = await sign_up(remote_synapse, remote_name("zoe", stack.engine))
        path = f"/_matrix/client/v3/profile/{user.user_id}/displayname"
        await user.request("PUT", path, {"displayname": DISPLAY_NAME})
        assert federation.front is not None
        federation.front.delay_s = FEDERATION_DELAY_S
        try:
            got, timing = await onboard_remote(user, stack)
        finally:
            federation.front.delay_s = 0.0
        yield Far(stack, user, got, timing, root, platform, openai)
    finally:
        if user is not None:
            await user.close()
        await put_config_text(stack, before)
        await platform.stop()
        await openai.stop()
        shutil.rmtree(root, ignore_errors=True)


# onboarding


async def test_onboarding_over_slow_federation(far: Far, federation: FederatedPair) -> None:
    stack, user = far.stack, far.user
    assert far.timing.room_after_s <= INVITES_WITHIN_S, far.timing
    assert federation.front is not None and federation.front.requests > 0  # it went through
    await user.wait_for_event(far.got.dm, bot_joined(stack.bot_id))
    # Exactly one Space: one invite to one (none since), one record of it.
    assert far.timing.spaces_invited == 1, far.timing
    await user.sync_once(0)
    assert not [r for r, s in user.invites.items() if is_space_invite(r, s)], user.invites
    rows = await stack.sql(f"SELECT space_id FROM lambda_user WHERE user_id='{user.user_id}'")
    assert rows == [{"space_id": far.got.space}]
    chats = await stack.sql(f"{ROWS} WHERE user_id='{user.user_id}'")
    assert [(r["room_id"], r["chat_id"]) for r in chats] == [(far.got.room, "C1")]


async def test_the_welcome_reaches_the_remote_user(far: Far) -> None:
    """The welcome is in the remote user's own sync (so it notifies): sent once their join is
    seen, not before (issue 21 item 3), once. (Before the commands: a late one would pass for
    a command's reply.)"""
    bot = far.stack.bot_id
    await far.user.wait_for_event(
        far.got.room,
        lambda e: e["sender"] == bot and is_welcome(e["content"].get("body")),
        timeout=30,
    )
    welcomes = [
        e for e in bot_messages(far.user, far.got.room, bot) if is_welcome(e["content"].get("body"))
    ]
    assert len(welcomes) == 1, welcomes


async def test_space_via_power_levels_and_display_name(far: Far) -> None:
    stack, user, got = far.stack, far.user, far.got
    home = stack.synapse.server_name
    assert home != "localhost" and user.user_id.split(":", 1)[1] != home
    child = await user.state_event(got.space, "m.space.child", got.room)
    assert child["content"]["via"] == [home] and child["content"]["order"]
    parent = await user.state_event(got.room, "m.space.parent", got.space)
    assert parent["content"] == {"via": [home], "canonical": True}
    for room_id, kind in ((got.space, "space"), (got.room, "chat")):
        marker = await user.state_event(room_id, MARKER)
        assert marker["sender"] == stack.bot_id and marker["content"]["kind"] == kind
        assert marker["content"]["owner"] == user.user_id
        power = (await user.state_event(room_id, "m.room.power_levels"))["content"]
        assert power["users"][user.user_id] == 50
        assert power["events"][MARKER] == 100
    name = await user.state_event(got.space, "m.room.name")
    assert name["content"]["name"] == SPACE_NAME


# answers and commands


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("!help", "!save <name>"),
        ("!chats", "(C1)"),
        ("!context", "platform_chat_id"),
        ("!agent", "This chat talks to `echo`"),
        ("!usage", "Your usage"),
    ],
)
async def test_commands_answer_a_remote_user(far: Far, command: str, expected: str) -> None:
    reply = await far.user.command(far.got.room, command, far.stack.bot_id)
    assert expected in notice_text(reply)


async def test_answers_and_chat_commands(far: Far) -> None:
    stack, user, got = far.stack, far.user, far.got
    bot = stack.bot_id
    _, answer = await ask(user, got.room, "hello from afar", bot)
    assert notice_text(answer).startswith("echo: hello from afar\n\n(message ")

    assert "Far chat" in notice_text(await user.command(got.room, "!rename Far chat", bot))
    name = await user.state_event(got.room, "m.room.name")
    assert name["content"]["name"] == "Far chat" and name["sender"] == bot

    before = PCID.search(notice_text(await user.command(got.room, "!context", bot))).group(1)
    cleared = PCID.search(notice_text(await user.command(got.room, "!clear", bot))).group(1)
    assert cleared != before
    _, answer = await ask(user, got.room, "after the clear", bot)
    assert "(message 1 " in notice_text(answer)
    assert "Saved" in notice_text(await user.command(got.room, "!save far-snap", bot))
    loaded = notice_text(await user.command(got.room, "!load far-snap", bot))
    assert "far-snap" in loaded and PCID.search(loaded).group(1) != cleared
    _, answer = await ask(user, got.room, "continued", bot)
    assert "(message 2 " in notice_text(answer)  # the snapshot held one exchange

    # !new: a second room, invited to over federation and joined from the remote server.
    second = link_in(await user.command(got.room, "!new Second", bot))
    await user.wait_for_invite(lambda r, _s: r == second)
    await join_chat(user, second, bot)  # its welcome comes on the join
    _, answer = await ask(user, second, "in the second room", bot)
    assert "(message 1 " in notice_text(answer)
    listing = notice_text(await user.command(second, "!chats", bot))
    # Each room linked by its name; the plain body has the URL, via the bot's server.
    assert re.search(r"- Far chat <https://matrix\.to/#/![^ >]+> \(C1\)", listing), listing
    assert re.search(r"- Second <https://matrix\.to/#/![^ >]+> \(C2\)", listing), listing
    assert f"?via={stack.synapse.server_name}>" in listing
    assert "fedfiles" in notice_text(await user.command(second, "!agent fedfiles", bot))
    assert "`fedfiles`" in notice_text(await user.command(second, "!context", bot))


# files and voice


async def test_a_file_each_way(far: Far) -> None:
    stack, user, got = far.stack, far.user, far.got
    bot = stack.bot_id
    # In: uploaded to the remote server, fetched by the bot through its own homeserver's
    # authenticated media endpoints (which fetch it over federation).
    data = os.urandom(32 * 1024) + b"from afar\n"
    sent = await user.send_file(got.room, data, "far.bin", "application/octet-stream")
    answer = await answer_to(user, got.room, bot, sent)
    [rel] = [x.rsplit(": ", 1)[1] for x in notice_text(answer).splitlines() if x.startswith("- ")]
    assert rel.startswith(f"{user_dir(user.user_id)}/") and rel.endswith("-far.bin"), rel
    assert hashlib.sha256((far.workspace / rel).read_bytes()).digest() == (
        hashlib.sha256(data).digest()
    )

    # Out: the agent's file, uploaded to the bot's server, downloaded from the remote one.
    assert "fedfiles" in notice_text(await user.command(got.room, "!agent fedfiles", bot))
    report = os.urandom(4096)
    own = user_dir(user.user_id) / "out"
    (far.workspace / own).mkdir(parents=True, exist_ok=True)
    (far.workspace / own / "report.bin").write_bytes(report)
    far.platform.reply_attachments = [f"{own}/report.bin"]
    try:
        await user.sync_once(0)
        mark = user.mark()
        await user.send_text(got.room, "send me the report")
        file_event = await user.wait_until(
            lambda: next(
                (
                    e
                    for e in bot_messages(user, got.room, bot, mark)
                    if e["content"].get("msgtype") == "m.file"
                ),
                None,
            ),
            90,
            "the agent's file",
        )
    finally:
        far.platform.reply_attachments = []
        await user.command(got.room, "!agent echo", bot)
    url = file_event["content"]["url"]
    assert url.startswith(f"mxc://{stack.synapse.server_name}/"), url
    assert await user.download(url) == report


async def test_a_voice_message_is_answered_from_its_transcript(far: Far) -> None:
    stack, user, got = far.stack, far.user, far.got
    bot = stack.bot_id
    far.openai.transcript = "spoken on another server"
    seen = len(transcription_requests(far.openai))
    await user.sync_once(0)
    mark = user.mark()
    voice = await send_voice(user, got.room, AUDIO)
    heard = await user.wait_for_event(
        got.room, from_bot(bot, answers=voice, starts=HEARD), mark, 90
    )
    assert notice_text(heard) == f"{HEARD}> spoken on another server"
    answer = await user.wait_for_event(got.room, from_bot(bot, answers=voice, starts="echo:"), mark)
    assert notice_text(answer).startswith("echo: spoken on another server\n\n")
    [request] = transcription_requests(far.openai)[seen:]
    assert request.form["file"].data == AUDIO  # the remote media, whole


# an encrypted chat


async def test_an_encrypted_exchange(far: Far, remote_user) -> None:
    """The bot encrypts to the remote user's device (its keys over federation) and decrypts
    what that device sends."""
    stack = far.stack
    need_crypto(stack)
    bot = stack.bot_id
    ann = await remote_user("ann", e2e=True)
    await stack.configure({"spaces": {"encryption": "auto"}})
    try:
        got, _ = await onboard_remote(ann, stack, encrypted=True)
    finally:
        await stack.configure({"spaces": {"encryption": "never"}})
    encryption = await ann.state_event(got.room, "m.room.encryption")
    assert encryption is not None and encryption["sender"] == bot
    welcome = await ann.wait_for_event(
        got.room, lambda e: e["sender"] == bot and is_welcome(e["content"].get("body"))
    )
    await assert_sealed(ann, got.room, welcome, "!help")  # to their device, readable there
    question, answer = await ask(ann, got.room, "the far secret is heron", bot)
    assert notice_text(answer).startswith("echo: the far secret is heron\n\n")
    await assert_sealed(ann, got.room, answer, "heron")
    raw = await ann.request("GET", f"/_matrix/client/v3/rooms/{got.room}/event/{question}")
    assert raw["type"] == "m.room.encrypted"
    context = await ann.command(got.room, "!context", bot)
    await assert_sealed(ann, got.room, context, "platform_chat_id")
    assert not ann.undecryptable(got.room)


# a restart with the plugin database lost


async def test_lost_database_and_restart_catch_up(far: Far) -> None:
    stack, user, got = far.stack, far.user, far.got
    bot = stack.bot_id
    mine = f"{ROWS} WHERE user_id='{user.user_id}' ORDER BY chat_id"
    spaces = f"SELECT space_id, next_chat_index FROM lambda_user WHERE user_id='{user.user_id}'"
    before, space = await stack.sql(mine), await stack.sql(spaces)
    assert before and space
    await user.sync_once(0)
    mark = user.mark()

    log_mark = stack.log_mark()
    await wipe_plugin_database(stack)
    await stop_instance(stack)
    try:
        # Sent while the instance is stopped: only the catch-up after the start answers it.
        missed = await user.send_text(got.room, "sent from afar while you were away")
    finally:
        await start_instance(stack)
    answer = await answer_to(user, got.room, bot, missed)
    assert notice_text(answer).startswith("echo: sent from afar while you were away\n\n")
    assert f"Catching up {missed} " in stack.maubot.log_text()[log_mark:]
    # Rebuilt from the rooms (names and agents too), answered once.
    assert await stack.sql(mine) == before and await stack.sql(spaces) == space
    marker, _ = await ask(user, got.room, "marker", bot)
    said = [e["content"].get(ANSWERS) for e in bot_messages(user, got.room, bot, mark)]
    assert said.count(missed) == 1 and said.count(marker) == 1, said
    assert len(answers_to(user, got.room, bot, missed)) == 1
