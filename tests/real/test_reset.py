"""The dev reset workflow: from the command line tool (with a dry run) and from the room."""

from __future__ import annotations

import shutil

import pytest
import pytest_asyncio

from devstack.matrix import MatrixUser
from devstack.reset import reset
from devstack.stack import deploy, undeploy

from ..conftest import PLAIN_ROOMS, _state_dir
from .helpers import notice_text, onboard

pytestmark = pytest.mark.real


@pytest_asyncio.fixture(scope="module")
async def own_stack(synapse):
    """A deployment of its own: a server reset leaves every room its bot manages."""
    state = _state_dir("lambda-reset-")
    deployment = await deploy(
        state, synapse, None, bot_localpart="lambda_reset", config=PLAIN_ROOMS
    )
    login = synapse.login(deployment.bot_id, "bot-password")
    bot = MatrixUser(synapse.url, deployment.bot_id, login["access_token"])
    deployment.users.append(bot)
    yield deployment, bot
    await undeploy(deployment)
    shutil.rmtree(state, ignore_errors=True)


async def test_reset_tool_local_then_server(own_stack) -> None:
    stack, bot = own_stack
    xia = await stack.user("xia")
    got = await onboard(xia, stack)
    assert "echo: hi" in notice_text(await xia.command(got.room, "hi", stack.bot_id))

    dry = await reset(stack, bot, "local", dry_run=True)
    assert "Would reset (local):" in dry[0] and "chat_room=1" in dry[1] and "history=2" in dry[1]
    assert await stack.sql("SELECT COUNT(*) AS n FROM history") == [{"n": 2}]

    done = await reset(stack, bot, "local", dry_run=False)
    assert "restored_chat_rows=1" in done[-1]
    rows = await stack.sql("SELECT room_id FROM chat_room")
    assert rows == [{"room_id": got.room}]
    assert await stack.sql("SELECT COUNT(*) AS n FROM history") == [{"n": 0}]

    dry = await reset(stack, bot, "server", dry_run=True)
    listed = "\n".join(dry)
    assert "managed rooms to leave: 2" in listed
    assert f"{got.room}: remove {xia.user_id}" in listed
    assert got.room in await bot.joined_rooms()

    done = await reset(stack, bot, "server", dry_run=False)
    assert "left 2 rooms" in done
    joined = await bot.joined_rooms()
    assert got.room not in joined and got.space not in joined
    await xia.wait_until(lambda: got.room in xia.left and got.space in xia.left, what="removed")
    assert await stack.sql("SELECT COUNT(*) AS n FROM chat_room") == [{"n": 0}]


async def test_reset_server_from_the_room(own_stack) -> None:
    stack, _ = own_stack
    yan = await stack.user("yan")
    got = await onboard(yan, stack)
    await stack.configure({"access": {"admins": [yan.user_id]}})
    try:
        ask = notice_text(await yan.command(got.dm, "!lambda reset server", stack.bot_id))
        assert "--confirm" in ask
        done = notice_text(
            await yan.command(got.dm, "!lambda reset server --confirm", stack.bot_id)
        )
        assert "left 2 rooms" in done
        await yan.wait_until(lambda: got.room in yan.left and got.space in yan.left, what="removed")
    finally:
        await stack.configure({"access": {"admins": []}})
