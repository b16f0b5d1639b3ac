"""Limits that keep answers bounded and quiet: a rate-limited user is told once a window, a
long list ends with "… and N more", and every notice names what it answers and pings nobody.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from lambda_plugin.commands.base import LIST_BYTES, NAMES_BYTES, CommandBase
from lambda_plugin.config import Settings
from lambda_plugin.gate import StartGate
from lambda_plugin.intake import ANSWERS
from lambda_plugin.notices import Notices, answering
from lambda_plugin.policy import RateLimiter
from lambda_plugin.replies import edit_content, notice_content
from lambda_plugin.texts import text
from tests.unit.test_config import settings as make_settings

ALICE = "@alice:example.org"
BOB = "@bob:example.org"
ROOM = "!a:example.org"


class Clock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def base() -> Settings:
    return make_settings()


# --- RateLimiter.tell -----------------------------------------------------------------------


def test_tell_is_true_once_per_window_per_user() -> None:
    clock = Clock()
    limiter = RateLimiter(lambda: 1, clock=clock)
    assert limiter.tell(ALICE)
    assert not limiter.tell(ALICE)
    clock.now += 30
    assert not limiter.tell(ALICE)
    clock.now += 29.9  # 59.9 s after the first notice
    assert not limiter.tell(ALICE)
    clock.now += 0.1  # 60 s: a new window
    assert limiter.tell(ALICE)
    assert not limiter.tell(ALICE)
    clock.now += 59
    assert not limiter.tell(ALICE)
    clock.now += 1
    assert limiter.tell(ALICE)


def test_tell_is_per_user() -> None:
    clock = Clock()
    limiter = RateLimiter(lambda: 1, clock=clock)
    assert limiter.tell(ALICE)
    clock.now += 10
    assert limiter.tell(BOB)
    assert not limiter.tell(ALICE)
    assert not limiter.tell(BOB)
    clock.now += 50  # Alice's window is over, Bob's not
    assert limiter.tell(ALICE)
    assert not limiter.tell(BOB)
    clock.now += 10
    assert limiter.tell(BOB)


def test_a_flood_over_the_limit_is_told_once() -> None:
    clock = Clock()
    limiter = RateLimiter(lambda: 2, clock=clock)
    told = []
    for _ in range(20):
        if not limiter.allow(ALICE):
            told.append(limiter.tell(ALICE))
        clock.now += 1  # 20 messages in 20 s
    assert told.count(True) == 1
    assert len(told) == 18


def test_tell_does_not_count_as_a_request() -> None:
    clock = Clock()
    limiter = RateLimiter(lambda: 1, clock=clock)
    assert limiter.tell(ALICE)
    assert limiter.allow(ALICE)
    assert not limiter.allow(ALICE)


def test_tell_forgets_users_whose_window_is_over() -> None:
    clock = Clock()
    limiter = RateLimiter(lambda: 1, clock=clock)
    for i in range(100):
        limiter.tell(f"@user{i}:example.org")
    clock.now += 61
    limiter.tell(ALICE)
    assert set(limiter._told) == {ALICE}  # bounded: no entry per user forever


# --- CommandBase.fitting --------------------------------------------------------------------


@pytest.fixture
def command(base: Settings) -> CommandBase:
    notices = Notices(mx=None, settings=lambda: base)  # type: ignore[arg-type]
    return CommandBase(
        settings=lambda: base,
        log=logging.getLogger("test.limits"),
        gate=StartGate(),
        store=None,  # type: ignore[arg-type]
        ledger=None,  # type: ignore[arg-type]
        notices=notices,
    )


def more(count: int) -> str:
    return text("en", "list.more", count=count)


def test_the_more_text_is_what_the_tests_assume() -> None:
    assert more(6) == "… and 6 more."


def test_a_list_that_fits_is_unchanged(command: CommandBase) -> None:
    lines = [f"line-{i:04d}" for i in range(4)]  # 9 bytes + 2 each
    assert command.fitting(lines, 44) == lines  # exactly the budget
    assert command.fitting(lines, 1_000) == lines
    assert command.fitting([], 0) == []
    assert command.fitting([], 10) == []


def test_a_long_list_keeps_what_fits_and_counts_the_rest(command: CommandBase) -> None:
    lines = [f"line-{i:04d}" for i in range(10)]  # 11 bytes each with the separator
    assert command.fitting(lines, 43) == [*lines[:3], more(7)]
    assert command.fitting(lines, 44) == [*lines[:4], more(6)]
    assert command.fitting(lines, 109) == [*lines[:9], more(1)]
    assert command.fitting(lines, 110) == lines


def test_nothing_fits(command: CommandBase) -> None:
    lines = ["a long line of text", "another"]
    assert command.fitting(lines, 5) == [more(2)]
    assert command.fitting(lines, 0) == [more(2)]


def test_the_budget_is_in_bytes_not_characters(command: CommandBase) -> None:
    lines = ["ééééé"] * 3  # 5 characters, 10 bytes (+2)
    assert command.fitting(lines, 24) == [*lines[:2], more(1)]
    assert command.fitting(lines, 23) == [lines[0], more(2)]
    assert command.fitting(lines, 36) == lines


def test_a_huge_list_fits_one_event(command: CommandBase) -> None:
    lines = [
        f"- **Chat {i}** — https://matrix.to/#/!room{i}:example.org — echo" for i in range(5000)
    ]
    kept = command.fitting(lines, LIST_BYTES)
    assert kept[-1] == more(len(lines) - (len(kept) - 1))
    assert len("\n".join(kept).encode()) <= LIST_BYTES + len(kept[-1].encode())
    body = "\n".join(kept)
    assert len(json.dumps(notice_content(body))) < 65_536
    names = command.fitting([f"`snap-{i}`" for i in range(2000)], NAMES_BYTES)
    assert names[-1].startswith("… and ")
    assert len(", ".join(names[:-1]).encode()) <= NAMES_BYTES


def test_the_more_text_follows_the_language(base: Settings) -> None:
    russian = replace(base, language="ru")
    notices = Notices(mx=None, settings=lambda: russian)  # type: ignore[arg-type]
    command = CommandBase(
        settings=lambda: russian,
        log=logging.getLogger("test.limits"),
        gate=StartGate(),
        store=None,  # type: ignore[arg-type]
        ledger=None,  # type: ignore[arg-type]
        notices=notices,
    )
    assert command.fitting(["abc"] * 3, 5) == ["abc", "… и ещё 2."]


# --- notices name what they answer and mention nobody --------------------------------------


def test_answering_adds_the_answered_event_only_when_given_one() -> None:
    content = {"msgtype": "m.notice", "body": "hi", "m.mentions": {}}
    marked = answering(content, "$event")
    assert marked == {**content, ANSWERS: "$event"}
    assert ANSWERS == "ai.lambda.matrix.answers"
    assert ANSWERS not in content  # the input is not changed
    assert answering(content, None) == content
    assert ANSWERS not in answering(content, None)
    assert ANSWERS not in answering(content, "")


@pytest.mark.parametrize(
    "body",
    ["plain", "@room look", "**bold** and `code`", "@alice:example.org said hi", ""],
)
def test_notice_content_mentions_nobody(body: str) -> None:
    content = notice_content(body)
    assert content["m.mentions"] == {}
    assert content["msgtype"] == "m.notice"
    assert content["body"] == body


@pytest.mark.parametrize("body", ["plain", "@room **look**", "line\n\n- a\n- b"])
def test_edit_content_mentions_nobody(body: str) -> None:
    content = edit_content("$orig", body)
    assert content["m.mentions"] == {}
    assert content["m.new_content"]["m.mentions"] == {}
    assert content["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$orig"}
    assert content["body"] == f"* {body}"


@dataclass
class FakeMatrix:
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def send(self, room_id: str, content: dict[str, Any]) -> str:
        self.sent.append((room_id, content))
        return f"$sent{len(self.sent)}"


async def test_a_notice_says_what_it_answers_and_mentions_nobody(base: Settings) -> None:
    mx = FakeMatrix()
    notices = Notices(mx=mx, settings=lambda: base)  # type: ignore[arg-type]
    assert await notices.say(ROOM, "queue.full", max=3, reply_to="$user-msg") == "$sent1"
    await notices.say(ROOM, "list.more", count=2)
    await notices.send(ROOM, "@room hello", reply_to="$other")
    [(_, full), (_, plain), (_, sent)] = mx.sent
    assert full[ANSWERS] == "$user-msg"
    assert full["body"] == text("en", "queue.full", max=3)
    assert ANSWERS not in plain
    assert sent[ANSWERS] == "$other"
    assert all(content["m.mentions"] == {} for _, content in mx.sent)
