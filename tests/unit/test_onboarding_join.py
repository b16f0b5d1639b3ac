"""Onboarding's join of an invite outlasts the federation race (the inviting server sends the
invite before it stored it: 403 "not invited" at first); a local invite really gone costs at
most one more try; a second sight of the invite while the join is retried starts nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from lambda_plugin import onboarding
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.onboarding import Onboarding
from tests.unit.test_config import settings as make_settings

ROOM = "!dm:remote.example"
NOT_INVITED = HomeserverError(403, "M_FORBIDDEN", "You are not invited to this room.")


class FakeMx:
    user_id = "@lambda:bot.example"
    server_name = "bot.example"

    def __init__(self, failures: list[HomeserverError]) -> None:
        self.failures = list(failures)
        self.joins = 0

    async def join(self, room_id: str) -> None:
        self.joins += 1
        if self.failures:
            raise self.failures.pop(0)


def make(mx: FakeMx) -> Onboarding:
    return Onboarding(
        settings=make_settings, log=logging.getLogger("test.onboarding"), gate=None,
        mx=mx, spaces=None, chats=None, notices=None,
    )  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture(autouse=True)
def no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onboarding, "JOIN_RETRY_S", (0.0,) * 5)  # the same tries, no waits


@pytest.mark.parametrize(
    "failure",
    [NOT_INVITED, HomeserverError(404, "M_NOT_FOUND", "no room"),
     HomeserverError(502, None, "bad gateway"), HomeserverError(0, None, "connection failed")],
)  # fmt: skip
async def test_a_remote_invite_is_joined_after_the_race(failure: HomeserverError) -> None:
    mx = FakeMx([failure] * 4)
    assert await make(mx)._join(ROOM, "@ann:remote.example")
    assert mx.joins == 5


async def test_a_remote_join_gives_up_after_five_retries() -> None:
    mx = FakeMx([NOT_INVITED] * 10)
    assert not await make(mx)._join(ROOM, "@ann:remote.example")
    assert mx.joins == 6


async def test_a_local_invite_really_gone_costs_one_more_try() -> None:
    mx = FakeMx([NOT_INVITED] * 10)
    assert not await make(mx)._join(ROOM, "@ann:bot.example")
    assert mx.joins == 2


async def test_a_final_refusal_is_not_retried() -> None:
    mx = FakeMx([HomeserverError(400, "M_UNKNOWN", "bad room id")])
    assert not await make(mx)._join(ROOM, "@ann:remote.example")
    assert mx.joins == 1


async def test_the_invite_seen_again_while_the_join_is_retried_starts_nothing() -> None:
    release = asyncio.Event()

    class SlowMx(FakeMx):
        async def join(self, room_id: str) -> None:
            self.joins += 1
            await release.wait()
            raise HomeserverError(400, "M_UNKNOWN", "stop here")

    mx = SlowMx([])
    bot = make(mx)
    first = asyncio.create_task(bot.handle_invite(ROOM, "@ann:remote.example"))
    while mx.joins == 0:
        await asyncio.sleep(0)
    await bot.handle_invite(ROOM, "@ann:remote.example")  # maubot delivered it twice
    release.set()
    await asyncio.wait_for(first, 5)
    assert mx.joins == 1
