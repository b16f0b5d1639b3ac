"""What a hostile review of the ledger found, each as it was reproduced: a !cancel after the
answer was sent (or of a duplicate delivery) never turns it kept; a kept message's notice is
not its answer; a stop between two pieces of a split answer leaves it unfinished; a voice
transcript is not the answer to finish; what this process queued during a start keeps its
place; a usage increment is never counted twice after a connection lost mid-statement."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from lambda_plugin.catchup import plan_start
from lambda_plugin.db import LedgerRow, Store
from lambda_plugin.gate import StartGate
from lambda_plugin.intake import ABOUT, ANSWERING
from lambda_plugin.ledger import Fate
from lambda_plugin.notices import answering
from lambda_plugin.queue import RoomQueues
from lambda_plugin.replies import StreamingReply, notice_content, split_answer
from tests.unit.test_conversation import BOT, LOG, ROOM, USER, Env, message

TIMEOUT = 10


def event(event_id: str, sender: str, content: dict, ts: int) -> dict:
    return {
        "type": "m.room.message", "event_id": event_id, "sender": sender,
        "origin_server_ts": ts, "content": content,
    }  # fmt: skip


def taken_row(event_id: str) -> LedgerRow:
    return LedgerRow(
        event_id=event_id, room_id=ROOM, sender=USER, kind="message", state="taken", reason="",
        ts=1_000, event=None, answer_event=None, updated_at=1,
    )  # fmt: skip


async def _turns(count: int = 50) -> None:
    for _ in range(count):
        await asyncio.sleep(0.01)


async def test_a_cancel_while_the_answers_end_is_written_changes_nothing(store: Store) -> None:
    env = Env(store)
    gate = StartGate()
    gate.open()
    queues = RoomQueues(env.stage, gate, LOG)
    real_set = env.ledger.table.set_state
    writing, release = asyncio.Event(), asyncio.Event()

    async def slow_set_state(
        event_id: str, state: str, reason: str, keep_event: bool, answer_event: str = ""
    ) -> bool:
        if state == Fate.ANSWERED.value:
            writing.set()
            await release.wait()  # a slow or restarting database
        return await real_set(event_id, state, reason, keep_event, answer_event)

    env.ledger.table.set_state = slow_set_state  # type: ignore[method-assign]
    try:
        queues.worker(ROOM).push(message("$1"))
        await asyncio.wait_for(writing.wait(), TIMEOUT)
        queues.cancel(ROOM)  # !cancel, as the end is written
        release.set()
        await _turns()
        queues.retry(ROOM, await env.ledger.kept(ROOM))  # !retry
        await _turns()
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert env.answerer.asked == ["$1"]
    assert (await env.ledger.states_of(["$1"]))["$1"] == Fate.ANSWERED.value


async def test_a_cancel_of_a_duplicate_of_an_answered_message_changes_nothing(
    store: Store,
) -> None:
    env = Env(store)
    gate = StartGate()
    gate.open()
    queues = RoomQueues(env.stage, gate, LOG)
    await env.stage.message(ROOM, message("$1"), retried=False)  # answered
    real_insert = env.ledger.table.insert
    checking, release = asyncio.Event(), asyncio.Event()

    async def slow_insert(row: LedgerRow) -> LedgerRow:
        checking.set()
        await release.wait()
        return await real_insert(row)

    env.ledger.table.insert = slow_insert  # type: ignore[method-assign]
    try:
        queues.worker(ROOM).push(message("$1"))  # a second delivery
        await asyncio.wait_for(checking.wait(), TIMEOUT)
        assert queues.cancel(ROOM)
        release.set()
        await _turns()
    finally:
        env.ledger.table.insert = real_insert  # type: ignore[method-assign]
        await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert (await env.ledger.states_of(["$1"]))["$1"] == Fate.ANSWERED.value
    assert "cancelled" not in env.notices.said_keys()


def test_the_notice_of_a_kept_message_is_not_its_answer() -> None:
    # Kept (agent failed), !retry, then a SIGKILL mid-stream: the failure notice is no answer.
    user = event("$1", USER, {"msgtype": "m.text", "body": "hi"}, 1_000)
    failure = event("$err", BOT, answering(notice_content("The agent failed"), "$1", ABOUT), 1_100)
    partial = event("$p", BOT, answering(notice_content("Half …"), "$1", ANSWERING), 2_000)
    plan = plan_start(
        {ROOM: [user, failure, partial]}, [taken_row("$1")], {"$1": "taken"}, BOT, 0, {ROOM}
    )
    assert plan.answered == []
    [again] = plan.rooms[ROOM]
    assert again.event_id == "$1" and again.resume == "$p"


async def test_a_stop_between_two_pieces_of_a_split_answer_leaves_it_unfinished() -> None:
    long = "word " * 10_000
    assert len(split_answer(long)) > 1
    sent: list[dict] = []

    async def send(content: dict) -> str:
        sent.append(content)
        if len(sent) == 2:
            raise asyncio.CancelledError  # the stop, before the second piece is out
        return f"$piece{len(sent)}"

    reply = StreamingReply(lambda c: send(answering(c, "$1", ANSWERING)), 1.0)
    with pytest.raises(asyncio.CancelledError):
        await reply.finish(long, lambda c: send(answering(c, "$1")))
    room = [event("$1", USER, {"msgtype": "m.text", "body": "long please"}, 1_000)]
    room.append(event("$piece1", BOT, sent[0], 1_100))
    plan = plan_start({ROOM: room}, [taken_row("$1")], {"$1": "taken"}, BOT, 0, {ROOM})
    assert plan.answered == []
    assert [i.event_id for i in plan.rooms[ROOM]] == ["$1"]


def test_a_voice_transcript_is_not_the_answer_to_finish() -> None:
    content = {"msgtype": "m.audio", "body": "voice.ogg", "url": "mxc://x/y",
               "org.matrix.msc3245.voice": {}}  # fmt: skip
    voice = event("$v", USER, content, 1_000)
    transcript = event("$t", BOT, answering(notice_content("> what is 2+2"), "$v", ABOUT), 1_100)
    plan = plan_start({ROOM: [voice, transcript]}, [taken_row("$v")], {"$v": "taken"}, BOT, 0)
    [again] = plan.rooms[ROOM]
    assert again.resume == "" and plan.answered == []


async def test_what_this_process_queued_is_not_unfinished_work_of_a_dead_one(
    store: Store,
) -> None:
    env = Env(store)
    env.ledger.seen(message("$hi"))  # queued live during the start, behind a live !clear
    await _turns(5)
    assert (await env.ledger.states_of(["$hi"]))["$hi"] == "seen"
    assert await env.ledger.unfinished() == []  # in its queue already, in its place
    env.restart()  # another process: now it is the dead one's unfinished work
    assert [row.event_id for row in await env.ledger.unfinished()] == ["$hi"]


class DropsAfterCommit:
    """A database whose connection is lost right after an increment committed."""

    def __init__(self, db: object) -> None:
        self.db, self.dropped = db, False

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)

    async def execute(self, query: str, *args: object) -> object:
        result = await self.db.execute(query, *args)  # type: ignore[attr-defined]
        if query.startswith("INSERT INTO usage") and not self.dropped:
            self.dropped = True
            raise asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation")
        return result


async def test_a_usage_increment_is_not_repeated_after_a_connection_lost_mid_statement(
    store: Store,
) -> None:
    flaky = Store(DropsAfterCommit(store.db), outage_s=lambda: 30.0)  # type: ignore[arg-type]
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await flaky.add_usage("@a:x", "!r:x", "2026-12-01", 100, 50)
    assert await store.usage_since("@a:x", "2026-12-01") == (100, 50, 1)  # counted once


async def test_a_refused_redelivery_leaves_nothing_remembered(store: Store) -> None:
    env = Env(store)
    await env.stage.message(ROOM, message("$1"), retried=False)
    for _ in range(2):
        env.ledger.seen(message("$1"))  # delivered again, queued, then refused in its turn
        assert not await env.ledger.claim(message("$1"))
    await _turns(5)
    assert env.ledger._queued == set() and env.ledger._claimed == set()
