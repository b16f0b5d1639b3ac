"""Answerer.ask on fakes: the message is taken in the ledger before the agent is asked, the
answer goes out before its usage is written (a database write must not delay it), the usage
is written whether or not the answer reaches the room, and the message's fate is returned."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from lambda_plugin.agents import AgentError, AgentReply, AgentRequest
from lambda_plugin.agents.base import Usage
from lambda_plugin.answering import Answerer
from lambda_plugin.db import ChatRoomRow
from lambda_plugin.intake import ANSWERING, ANSWERS, Incoming, Kind
from lambda_plugin.ledger import Fate
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.replies import STREAM_CURSOR

ROOM, USER = "!chat:example.org", "@ann:example.org"
USAGE = Usage(tokens_in=3, tokens_out=5)


class Recorder:
    """Every fake writes what it was asked into one list, in order."""

    def __init__(self, send_fails: bool = False) -> None:
        self.calls: list[Any] = []
        self.contents: list[dict] = []
        self.send_fails = send_fails

    async def send(self, room_id: str, content: dict, **kwargs: Any) -> str:  # Matrix's
        self.calls.append(("send", content["body"]))
        self.contents.append(content)
        if self.send_fails and content["body"].startswith("echo"):  # the answer, not notices
            raise HomeserverError(500, "M_UNKNOWN", "the homeserver fell over")
        return f"$sent{len(self.contents)}"

    async def typing(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("typing")

    async def record(self, user_id: str, room_id: str, usage: Usage | None) -> None:  # Quota
        self.calls.append(("record", user_id, usage))

    async def send_files(self, room_id: str, user_id: str, paths: tuple[str, ...]) -> None:
        self.calls.append("files")

    async def say(self, room_id: str, key: str, **kwargs: Any) -> None:  # Notices
        self.calls.append(("notice", key))

    note = say  # a notice that does not end the message (Notices.note)

    def text(self, key: str, **kwargs: Any) -> str:  # Notices
        return key

    async def taken(self, event_id: str) -> None:  # Ledger
        self.calls.append(("taken", event_id))

    async def answer_started(self, event_id: str, answer_event: str) -> None:  # Ledger
        self.calls.append(("answer_started", event_id, answer_event))

    def delivered(self, event_id: str, answer_event: str = "") -> None:  # Ledger
        self.calls.append(("delivered", event_id))


class Agent:
    agent_id = "echo"

    async def respond(self, request: AgentRequest, partial: Any) -> AgentReply:
        return AgentReply(f"echo: {request.text}", usage=USAGE)


class StreamingAgent(Agent):
    async def respond(self, request: AgentRequest, partial: Any) -> AgentReply:
        await partial("echo")  # the first partial is sent at once
        return AgentReply(f"echo: {request.text}", usage=USAGE)


def answerer(recorder: Recorder) -> Answerer:
    settings = SimpleNamespace(stream_edit_interval_s=1.0, language="en")
    return Answerer(
        settings=lambda: settings,  # type: ignore[arg-type,return-value]
        log=logging.getLogger("test.answering"),
        mx=recorder,  # type: ignore[arg-type]
        registry=None,  # type: ignore[arg-type]
        agents=None,  # type: ignore[arg-type]
        files=SimpleNamespace(send=recorder.send_files),  # type: ignore[arg-type]
        notices=recorder,  # type: ignore[arg-type]
        voice=None,  # type: ignore[arg-type]
        quota=recorder,  # type: ignore[arg-type]
        ledger=recorder,  # type: ignore[arg-type]
    )


ROW = ChatRoomRow(ROOM, USER, "C1", "Chat 1", "echo", "p1", False, False, 0)
REQUEST = AgentRequest("p1", "hello", USER, message_id="$question")
QUESTION = Incoming(Kind.MESSAGE, "$question", ROOM, USER, "hello", 1_000)


async def test_the_answer_goes_out_before_its_usage_is_written() -> None:
    recorder = Recorder()
    fate = await answerer(recorder).ask(ROW, Agent(), REQUEST, QUESTION)  # type: ignore[arg-type]
    assert fate == (Fate.ANSWERED, "")
    assert recorder.calls == [
        ("taken", "$question"),  # before the agent is asked: a crash now re-asks it
        ("send", "echo: hello"),
        "files",
        ("delivered", "$question"),  # done from here on, whatever cancels it
        ("record", USER, USAGE),
    ]
    [answer] = recorder.contents
    assert answer[ANSWERS] == "$question"  # the finished answer names the message


async def test_usage_is_written_when_the_answer_cannot_be_sent() -> None:
    recorder = Recorder(send_fails=True)
    fate = await answerer(recorder).ask(ROW, Agent(), REQUEST, QUESTION)  # type: ignore[arg-type]
    assert fate == (Fate.KEPT, "send")  # kept for !retry, and why
    assert recorder.calls == [
        ("taken", "$question"),
        ("send", "echo: hello"),
        ("notice", "send.failed"),
        ("record", USER, USAGE),
    ]


async def test_a_streamed_answer_names_its_first_event_in_the_ledger_and_finishes_it() -> None:
    recorder = Recorder()
    fate = await answerer(recorder).ask(ROW, StreamingAgent(), REQUEST, QUESTION)  # type: ignore[arg-type]
    assert fate == (Fate.ANSWERED, "")
    assert recorder.calls[:3] == [
        ("taken", "$question"),
        ("send", f"echo{STREAM_CURSOR}"),
        ("answer_started", "$question", "$sent1"),
    ]
    partial, final = recorder.contents
    assert partial[ANSWERING] == "$question" and ANSWERS not in partial  # not the answer yet
    assert final[ANSWERS] == "$question"
    assert final["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$sent1"}
    assert recorder.calls[-1] == ("record", USER, USAGE)


async def test_an_unfinished_answer_of_an_earlier_attempt_is_finished_in_place() -> None:
    recorder = Recorder()
    resumed = QUESTION.resuming("$partial-before-the-crash")
    fate = await answerer(recorder).ask(ROW, Agent(), REQUEST, resumed)  # type: ignore[arg-type]
    assert fate == (Fate.ANSWERED, "")
    [final] = recorder.contents  # no second answer: the old one is edited
    assert final["m.relates_to"] == {"rel_type": "m.replace", "event_id": resumed.resume}
    assert final[ANSWERS] == "$question"


class CutAgent(Agent):
    """Streams 40 characters, then fails as ``error`` says (or blocks until cancelled)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    async def respond(self, request: AgentRequest, partial: Any) -> AgentReply:
        await partial("x" * 40)
        if self.error is None:
            await asyncio.Event().wait()  # until cancelled
        raise self.error  # type: ignore[misc]


@pytest.mark.parametrize(
    "error",
    [AgentError.of("agent.too_long", "past max_answer_chars", limit=40),
     AgentError.of("agent.timeout", "deadline", seconds=1)],
    ids=["size-cap", "deadline"],
)  # fmt: skip
async def test_a_cut_answer_is_counted_and_marked_interrupted(error: AgentError) -> None:
    recorder = Recorder()
    fate = await answerer(recorder).ask(ROW, CutAgent(error), REQUEST, QUESTION)  # type: ignore[arg-type]
    assert fate == (Fate.KEPT, "agent")
    # What streamed is counted (estimated: about 4 characters a token), once.
    assert [c for c in recorder.calls if c[0] == "record"] == [("record", USER, Usage(2, 10))]
    assert recorder.contents[-1]["m.new_content"]["body"].endswith("answer.interrupted")


async def test_a_cancelled_answer_is_counted_and_marked_interrupted() -> None:
    recorder = Recorder()
    call = asyncio.create_task(
        answerer(recorder).ask(ROW, CutAgent(None), REQUEST, QUESTION)  # type: ignore[arg-type]
    )
    while ("answer_started", "$question", "$sent1") not in recorder.calls:
        await asyncio.sleep(0.01)
    call.cancel()  # !cancel
    with pytest.raises(asyncio.CancelledError):
        await call
    assert [c for c in recorder.calls if c[0] == "record"] == [("record", USER, Usage(2, 10))]
    assert recorder.contents[-1]["m.new_content"]["body"].endswith("answer.interrupted")


class FailingAgent(Agent):
    """Streams ``streams`` characters (none: nothing), then fails."""

    def __init__(self, streams: int) -> None:
        self.streams = streams

    async def respond(self, request: AgentRequest, partial: Any) -> AgentReply:
        if self.streams:
            await partial("y" * self.streams)
        raise AgentError.of("agent.timeout", "deadline", seconds=1)


@pytest.mark.parametrize(("streams", "cut"), [(0, False), (40, True)], ids=["silent", "streamed"])
async def test_a_failed_reanswer_leaves_the_finished_answer_unless_it_streamed_into_it(
    streams: int, cut: bool
) -> None:
    """An edit's or a 🔁's answer that fails before showing anything leaves the old answer
    as it was (not turned into "interrupted"); one that streamed into it is cut off."""
    recorder = Recorder()
    edit = replace(QUESTION, event_id="$edit", replaces="$question").resuming("$old-answer")
    fate = await answerer(recorder).ask(ROW, FailingAgent(streams), REQUEST, edit)  # type: ignore[arg-type]
    assert fate == (Fate.KEPT, "agent")
    edits = [c for c in recorder.contents if c.get("m.relates_to", {}).get("event_id") == "$old-answer"]
    assert bool(edits) is cut
    if cut:
        assert edits[-1]["m.new_content"]["body"].endswith("answer.interrupted")


class FilesOnlyAgent(Agent):
    async def respond(self, request: AgentRequest, partial: Any) -> AgentReply:
        return AgentReply("", ("out/report.pdf",), usage=USAGE)


async def test_a_files_only_answer_is_named_by_a_notice_after_its_files() -> None:
    recorder = Recorder()
    fate = await answerer(recorder).ask(ROW, FilesOnlyAgent(), REQUEST, QUESTION)  # type: ignore[arg-type]
    assert fate == (Fate.ANSWERED, "")
    assert recorder.calls[1:3] == ["files", ("send", "answer.files")]
    assert recorder.contents[-1][ANSWERS] == "$question"  # a lost database answers it not again


class FlakyFirst(Recorder):
    """The homeserver fails the stream's first event once (did it arrive? nobody knows)."""

    def __init__(self) -> None:
        super().__init__()
        self.txns: list[str | None] = []

    async def send(self, room_id: str, content: dict, **kwargs: Any) -> str:
        if content.get(ANSWERING) and "m.relates_to" not in content:
            self.txns.append(kwargs.get("txn"))
            if len(self.txns) == 1:
                raise HomeserverError(0, None, "connection failed")
        return await super().send(room_id, content, **kwargs)


class TwoPartials(Agent):
    async def respond(self, request: AgentRequest, partial: Any) -> AgentReply:
        await partial("one")
        await partial("one two")  # (the throttle is 0 in these settings only via the clock)
        return AgentReply("one two three", usage=USAGE)


async def test_every_try_of_a_streams_first_event_carries_one_transaction_id() -> None:
    recorder = FlakyFirst()
    made = answerer(recorder)
    made.settings = lambda: SimpleNamespace(stream_edit_interval_s=0.0, language="en")  # type: ignore[assignment,return-value]
    fate = await made.ask(ROW, TwoPartials(), REQUEST, QUESTION)  # type: ignore[arg-type]
    assert fate == (Fate.ANSWERED, "")
    assert len(recorder.txns) == 2 and recorder.txns[0] == recorder.txns[1] is not None
