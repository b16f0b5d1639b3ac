"""Answerer.ask on fakes: the answer goes out before its usage is written (a database write
must not delay it), and the usage is written whether or not the answer reaches the room."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from lambda_plugin.agents import AgentReply, AgentRequest
from lambda_plugin.agents.base import Usage
from lambda_plugin.answering import Answerer
from lambda_plugin.db import ChatRoomRow
from lambda_plugin.matrix import HomeserverError

ROOM, USER = "!chat:example.org", "@ann:example.org"
USAGE = Usage(tokens_in=3, tokens_out=5)


class Recorder:
    """Every fake writes what it was asked into one list, in order."""

    def __init__(self, send_fails: bool = False) -> None:
        self.calls: list[Any] = []
        self.send_fails = send_fails

    async def send(self, room_id: str, content: dict) -> str:  # the Matrix wrapper's
        self.calls.append(("send", content["body"]))
        if self.send_fails:
            raise HomeserverError(500, "M_UNKNOWN", "the homeserver fell over")
        return "$answer"

    async def typing(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("typing")

    async def record(self, user_id: str, room_id: str, usage: Usage | None) -> None:  # Quota
        self.calls.append(("record", user_id, usage))

    async def send_files(self, room_id: str, user_id: str, paths: tuple[str, ...]) -> None:
        self.calls.append("files")

    async def say(self, room_id: str, key: str, **kwargs: Any) -> None:  # Notices
        self.calls.append(("notice", key))


class Agent:
    agent_id = "echo"

    async def respond(self, request: AgentRequest, partial: Any) -> AgentReply:
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
    )


ROW = ChatRoomRow(ROOM, USER, "C1", "Chat 1", "echo", "p1", False, False, 0)
REQUEST = AgentRequest("p1", "hello", USER)


async def test_the_answer_goes_out_before_its_usage_is_written() -> None:
    recorder = Recorder()
    assert await answerer(recorder).ask(ROW, Agent(), REQUEST, "$question")  # type: ignore[arg-type]
    assert recorder.calls == [("send", "echo: hello"), "files", ("record", USER, USAGE)]


async def test_usage_is_written_when_the_answer_cannot_be_sent() -> None:
    recorder = Recorder(send_fails=True)
    assert not await answerer(recorder).ask(ROW, Agent(), REQUEST, "$question")  # type: ignore[arg-type]
    assert recorder.calls == [
        ("send", "echo: hello"),
        ("notice", "send.failed"),
        ("record", USER, USAGE),
    ]
