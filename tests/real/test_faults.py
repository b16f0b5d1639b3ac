"""Nothing lost, nothing twice, in order, whatever dies: maubot SIGKILLed or the instance
stopped while an answer streams (also after a quiet spell longer than the catch-up window),
Synapse stopped mid-stream, the plugin's PostgreSQL restarted mid-burst, a rate-held message
sent again by !retry after a restart, and "m1, !clear, m2" across a maubot process restart.
Each is killed for real; then the room is read as the user sees it and counted."""

from __future__ import annotations

import asyncio
import re

import pytest
import pytest_asyncio

from devstack.matrix import Event, MatrixUser
from devstack.stack import Deployment
from lambda_plugin.intake import ANSWERING, ANSWERS
from tests.servers.openai_server import OpenAIServer

from .helpers import ANSWER_TIMEOUT, answer_to, bot_messages, notice_text, onboard

pytestmark = pytest.mark.real
PCID = re.compile(r"platform_chat_id: `?([\w-]+)`?")


@pytest_asyncio.fixture(scope="module")
async def slow(stack: Deployment):
    """A streaming agent: each answer takes about six seconds, in six pieces."""
    server = OpenAIServer()
    url = await server.start()
    server.mode, server.chunks, server.chunk_delay_s = "stream", 6, 1.0
    await stack.configure(
        {
            "agents": {
                "registry": {
                    "slow": {"backend": "openai", "base_url": url, "model": "m", "timeout_s": 120}
                }
            },
            "replies": {"stream_edit_interval_s": 0.3},
        }
    )
    yield server
    await server.stop()


async def slow_chat(stack: Deployment, new_user, prefix: str) -> tuple[MatrixUser, str]:
    user = await new_user(prefix)
    got = await onboard(user, stack)
    switched = await user.command(got.room, "!agent slow", stack.bot_id)
    assert "slow" in notice_text(switched)
    return user, got.room


def naming(user: MatrixUser, room: str, bot: str, event_id: str) -> list[Event]:
    """The bot's messages (edits left out) that answer ``event_id`` or work on it."""
    return [
        e for e in bot_messages(user, room, bot)
        if event_id in (e["content"].get(ANSWERS), e["content"].get(ANSWERING))
    ]  # fmt: skip


def latest_text(user: MatrixUser, room: str, first: Event) -> str:
    body = notice_text(first)
    for e in user.timelines.get(room, []):
        relates = e["content"].get("m.relates_to") or {}
        if relates.get("rel_type") == "m.replace" and relates.get("event_id") == first["event_id"]:
            body = e["content"]["m.new_content"]["body"]
    return body


async def answered_once(
    user: MatrixUser, room: str, bot: str, event_id: str, text: str, timeout: float = ANSWER_TIMEOUT
) -> Event:
    """Waits until ``event_id`` has its complete answer ``text``; then checks that exactly one
    message of the bot names it (an interrupted stream was finished, not doubled)."""

    def done() -> Event | None:
        for first in naming(user, room, bot, event_id):
            if latest_text(user, room, first) == text:
                return first
        return None

    first = await user.wait_until(done, timeout, f"the complete answer to {event_id}")
    await user.sync_once(0)
    found = naming(user, room, bot, event_id)
    assert len(found) == 1, [latest_text(user, room, e) for e in found]
    return first


def in_order(user: MatrixUser, room: str, answers: list[Event]) -> None:
    ids = [e["event_id"] for e in user.timelines.get(room, [])]
    places = [ids.index(a["event_id"]) for a in answers]
    assert places == sorted(places), places


async def stream_started(user: MatrixUser, room: str, bot: str, event_id: str) -> None:
    await answer_to(user, room, bot, event_id, in_progress=True)


async def test_sigkill_mid_stream_gives_one_complete_answer_and_the_queued_ones(
    stack: Deployment, new_user, slow: OpenAIServer
) -> None:
    user, room = await slow_chat(stack, new_user, "kill")
    bot = stack.bot_id
    m1 = await user.send_text(room, "m1")
    await stream_started(user, room, bot, m1)
    m2 = await user.send_text(room, "m2")  # queued behind the streaming answer
    await stack.kill_server()  # no stop() runs: the ledger is all there is
    first = await answered_once(user, room, bot, m1, "reply to: m1")
    second = await answered_once(user, room, bot, m2, "reply to: m2")
    in_order(user, room, [first, second])


@pytest.mark.parametrize("quiet", [False, True], ids=["at-once", "after-a-quiet-spell"])
async def test_an_instance_stop_mid_stream_loses_nothing(
    stack: Deployment, new_user, slow: OpenAIServer, quiet: bool
) -> None:
    user, room = await slow_chat(stack, new_user, "stop")
    bot = stack.bot_id
    if quiet:  # a catch-up window of 3 s, and 4 s of silence before the messages
        await stack.configure({"reconcile": {"catch_up_minutes": 0.05}})
        await asyncio.sleep(4)  # the quiet spell itself is the input
    try:
        m1 = await user.send_text(room, "q1")
        await stream_started(user, room, bot, m1)
        m2 = await user.send_text(room, "q2")
        await stack.maubot.set_started(stack.instance_id, False)
        await stack.maubot.set_started(stack.instance_id, True)
        first = await answered_once(user, room, bot, m1, "reply to: q1")
        second = await answered_once(user, room, bot, m2, "reply to: q2")
        in_order(user, room, [first, second])
    finally:
        if quiet:
            await stack.configure({"reconcile": {"catch_up_minutes": 10}})


async def test_synapse_stopped_mid_stream_the_answer_arrives_when_it_is_back(
    stack: Deployment, new_user, slow: OpenAIServer
) -> None:
    user, room = await slow_chat(stack, new_user, "hs")
    bot = stack.bot_id
    m1 = await user.send_text(room, "s1")
    await stream_started(user, room, bot, m1)
    await asyncio.to_thread(stack.synapse.stop)
    try:
        await asyncio.sleep(10)  # the outage itself: the stream ends while Synapse is down
    finally:
        await asyncio.to_thread(stack.synapse.start)
    await answered_once(user, room, bot, m1, "reply to: s1")
    # The plugin goes on answering.
    m2 = await user.send_text(room, "s2")
    await answered_once(user, room, bot, m2, "reply to: s2")


async def test_a_postgres_restart_mid_burst_is_waited_out(
    stack: Deployment, new_user, request: pytest.FixtureRequest
) -> None:
    if stack.engine != "postgres":
        pytest.skip("the plugin's database is SQLite here")
    postgres = request.getfixturevalue("postgres")
    bot = stack.bot_id
    chats = []
    for n in range(3):
        user = await new_user(f"pg{n}")
        chats.append((user, (await onboard(user, stack)).room))
    sent: list[tuple[MatrixUser, str, str]] = []
    for i in range(4):
        for user, room in chats:
            sent.append((user, room, await user.send_text(room, f"b{i}")))
        if i == 1:
            await asyncio.to_thread(postgres.restart)
    answers: dict[str, list[Event]] = {}
    for user, room, event_id in sent:
        answer = await answer_to(user, room, bot, event_id)
        answers.setdefault(room, []).append(answer)
    for user, room in chats:
        await user.sync_once(0)
        for _, r, event_id in (s for s in sent if s[1] == room):
            assert len(naming(user, r, bot, event_id)) == 1
        in_order(user, room, answers[room])
        assert [notice_text(a).split("\n")[0] for a in answers[room]] == [
            f"echo: b{i}" for i in range(4)
        ]


async def test_a_rate_held_message_is_answered_by_retry_after_a_restart(
    stack: Deployment, new_user
) -> None:
    user = await new_user("rate")
    room = (await onboard(user, stack)).room
    bot = stack.bot_id
    await stack.configure({"access": {"requests_per_minute": 1}})
    try:
        first = await user.send_text(room, "r1")
        await answer_to(user, room, bot, first)
        held = await user.send_text(room, "r2")
        told = await answer_to(user, room, bot, held, in_progress=True)
        assert "Slow down" in notice_text(told)
        assert told["content"].get(ANSWERS) is None  # a notice about it, not its answer
        await stack.restart_instance()
        context = notice_text(await user.command(room, "!context", bot))
        assert "Kept for `!retry`: 1" in context
        retried = await user.command(room, "!retry", bot)
        assert "1 kept" in notice_text(retried)

        def echoed() -> Event | None:
            return next(
                (e for e in bot_messages(user, room, bot)
                 if e["content"].get(ANSWERS) == held and "echo: r2" in notice_text(e)), None,
            )  # fmt: skip

        await user.wait_until(echoed, ANSWER_TIMEOUT, "the kept message answered")
    finally:
        await stack.configure({"access": {"requests_per_minute": 30}})


async def test_m1_clear_m2_across_a_maubot_process_restart_keep_their_order(
    stack: Deployment, new_user
) -> None:
    user = await new_user("order")
    room = (await onboard(user, stack)).room
    bot = stack.bot_id
    old = PCID.search(notice_text(await user.command(room, "!context", bot))).group(1)
    sent: list[str] = []

    async def while_down() -> None:
        for text in ("o1", "!clear", "o2"):
            sent.append(await user.send_text(room, text))

    await stack.restart_server(while_down=while_down)
    answers = [await answer_to(user, room, bot, event_id) for event_id in sent]
    assert notice_text(answers[0]).startswith("echo: o1\n\n(message 1 ")
    assert "Cleared" in notice_text(answers[1])
    assert PCID.search(notice_text(answers[1])).group(1) != old
    assert notice_text(answers[2]).startswith("echo: o2\n\n(message 1 ")  # the new one
    in_order(user, room, answers)
    await user.sync_once(0)
    for event_id in sent:
        assert len(naming(user, room, bot, event_id)) == 1
