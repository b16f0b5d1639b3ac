"""Onboarding's join of an invite outlasts the federation race (the inviting server sends the
invite before it stored it: 403 "not invited" at first); a local invite really gone costs at
most one more try; a second sight of the invite while the join is retried starts nothing.
The rooms joined for one inviter are bounded (access.max_joins_per_inviter), in the database."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from lambda_plugin import onboarding
from lambda_plugin.db import ChatRoomRow, Store
from lambda_plugin.db.joins import JoinsTable
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.notices import Notices
from lambda_plugin.onboarding import Onboarding
from lambda_plugin.registry import Registry
from lambda_plugin.texts import TEXTS
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


class MemoryJoins:
    """JoinsTable's calls, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, str] = {}

    async def rooms_of(self, inviter: str) -> list[str]:
        return [room_id for room_id, by in self.rows.items() if by == inviter]

    async def add(self, room_id: str, inviter: str) -> None:
        self.rows[room_id] = inviter

    async def remove(self, room_id: str) -> bool:
        return self.rows.pop(room_id, None) is not None


def make(mx: FakeMx) -> Onboarding:
    return Onboarding(
        settings=make_settings, log=logging.getLogger("test.onboarding"), gate=None,
        mx=mx, spaces=None, chats=SimpleNamespace(registry=Registry(None)), notices=None,
        joins=MemoryJoins(), welcomes=None,
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


# The bound on rooms joined for one inviter

ANN, BOB = "@ann:bot.example", "@bob:bot.example"
MOST = 2  # rooms besides the DM: MOST + 1 joined for one inviter in all
TOO_MANY = TEXTS["en"]["invite.too_many"].format(max=MOST)


class RoomsMx(FakeMx):
    """Joins succeed (or fail for the rooms in ``refuse``), each after ``join_s``; leaves
    (a rejected invite, with its reason) and the rooms the bot is in are recorded."""

    def __init__(self, join_s: float = 0.0) -> None:
        super().__init__([])
        self.join_s = join_s
        self.refuse: set[str] = set()
        self.joined: list[str] = []
        self.left: list[tuple[str, str | None]] = []
        self.joined_rooms_asked = 0

    async def join(self, room_id: str) -> None:
        self.joins += 1
        await asyncio.sleep(self.join_s)
        if room_id in self.refuse:
            raise HomeserverError(400, "M_UNKNOWN", "no such room")
        self.joined.append(room_id)

    async def leave(self, room_id: str, reason: str | None = None) -> None:
        self.left.append((room_id, reason))
        if room_id in self.joined:
            self.joined.remove(room_id)

    async def joined_rooms(self) -> list[str]:
        self.joined_rooms_asked += 1
        return list(self.joined)


def bounded(store: Store, mx: RoomsMx, most: int = MOST) -> Onboarding:
    settings = make_settings(access__max_joins_per_inviter=most)
    return Onboarding(
        settings=lambda: settings, log=logging.getLogger("test.onboarding"), gate=None,
        mx=mx, spaces=None, chats=SimpleNamespace(registry=Registry(store)),
        notices=Notices(mx, lambda: settings), joins=JoinsTable(store.db), welcomes=None,
    )  # type: ignore[arg-type]  # fmt: skip


def rooms(count: int, of: str = "ann") -> list[str]:
    return [f"!{of}{i}:bot.example" for i in range(count)]


async def test_past_the_bound_an_invite_is_rejected_with_the_reason(store: Store) -> None:
    mx = RoomsMx()
    bot = bounded(store, mx)
    dm, *extra, last = rooms(MOST + 2)
    for room_id in (dm, *extra):
        assert await bot._accept(room_id, ANN)
    assert not await bot._accept(last, ANN)
    assert mx.joined == [dm, *extra]  # the last never joined
    assert mx.left == [(last, TOO_MANY)]
    assert await JoinsTable(store.db).rooms_of(ANN) == [dm, *extra]


async def test_each_inviter_has_a_bound_of_their_own(store: Store) -> None:
    mx = RoomsMx()
    bot = bounded(store, mx)
    for room_id in rooms(MOST + 1):
        assert await bot._accept(room_id, ANN)
    for room_id in rooms(MOST + 1, "bob"):
        assert await bot._accept(room_id, BOB)
    assert mx.left == []


async def test_many_invites_at_once_do_not_pass_the_bound(store: Store) -> None:
    mx = RoomsMx(join_s=0.05)  # every join under way while the others are counted
    bot = bounded(store, mx)
    invited = rooms(12)
    results = await asyncio.gather(*(bot._accept(room_id, ANN) for room_id in invited))
    assert sum(results) == MOST + 1
    assert len(mx.joined) == MOST + 1 and len(mx.left) == len(invited) - MOST - 1
    assert {reason for _, reason in mx.left} == {TOO_MANY}
    assert sorted(await JoinsTable(store.db).rooms_of(ANN)) == sorted(mx.joined)


async def test_the_count_survives_a_restart(store: Store) -> None:
    mx = RoomsMx()
    for room_id in rooms(MOST + 1):
        assert await bounded(store, mx)._accept(room_id, ANN)
    restarted = bounded(store, mx)  # a new instance: nothing in memory
    assert not await restarted._accept("!more:bot.example", ANN)
    assert mx.left == [("!more:bot.example", TOO_MANY)]


async def test_a_room_the_bot_is_removed_from_no_longer_counts(store: Store) -> None:
    mx = RoomsMx()
    bot = bounded(store, mx)
    first, *others = rooms(MOST + 1)
    for room_id in (first, *others):
        assert await bot._accept(room_id, ANN)
    mx.joined.remove(first)
    await bot.bot_removed(first, ANN)  # kicked
    assert await JoinsTable(store.db).rooms_of(ANN) == others
    assert await bot._accept("!new:bot.example", ANN)
    assert mx.joined_rooms_asked == 0  # the row went with the kick


async def test_rows_of_rooms_left_while_stopped_are_dropped_at_the_bound(store: Store) -> None:
    mx = RoomsMx()
    first, *others = rooms(MOST + 1)
    for room_id in (first, *others):
        assert await bounded(store, mx)._accept(room_id, ANN)
    mx.joined.remove(first)  # kicked while the plugin was stopped: no event seen
    bot = bounded(store, mx)
    assert await bot._accept("!new:bot.example", ANN)
    assert mx.joined_rooms_asked == 1
    assert await JoinsTable(store.db).rooms_of(ANN) == [*others, "!new:bot.example"]
    # At the bound again: rejected, and the homeserver not asked again within the minute.
    assert not await bot._accept("!newer:bot.example", ANN)
    assert mx.joined_rooms_asked == 1


async def test_a_join_under_way_is_not_taken_for_a_room_left(store: Store) -> None:
    mx = RoomsMx(join_s=0.2)
    bot = bounded(store, mx)
    for room_id in rooms(MOST):
        assert await bot._accept(room_id, ANN)
    slow = asyncio.create_task(bot._accept("!slow:bot.example", ANN))  # the last place
    while "!slow:bot.example" not in bot._joining:
        await asyncio.sleep(0.01)
    assert not await bot._accept("!over:bot.example", ANN)  # checks what the bot is in
    assert mx.joined_rooms_asked == 1
    assert await slow
    assert "!slow:bot.example" in await JoinsTable(store.db).rooms_of(ANN)


async def test_a_failed_join_is_not_counted(store: Store) -> None:
    mx = RoomsMx()
    bot = bounded(store, mx)
    mx.refuse = set(rooms(5))
    for room_id in rooms(5):
        assert not await bot._accept(room_id, ANN)
    assert await JoinsTable(store.db).rooms_of(ANN) == []
    assert mx.left == []  # nothing to reject: it never joined


async def test_managed_rooms_and_the_space_are_not_counted(store: Store) -> None:
    mx = RoomsMx()
    bot = bounded(store, mx, most=1)
    registry = bot.registry
    registry.spaces["!space:bot.example"] = ANN
    for i in range(3):
        room_id = f"!chat{i}:bot.example"
        registry.rooms[room_id] = ChatRoomRow(
            room_id, ANN, f"C{i + 1}", "Chat", "echo", f"pc{i}", archived=False, gone=True,
            created_at=0,
        )  # fmt: skip
        assert await bot._accept(room_id, ANN)  # invited back into a chat of theirs
    assert await bot._accept("!space:bot.example", ANN)
    assert await JoinsTable(store.db).rooms_of(ANN) == []
    for room_id in rooms(2):
        assert await bot._accept(room_id, ANN)
    assert not await bot._accept("!third:bot.example", ANN)


async def test_a_refused_inviter_is_rejected_as_before(store: Store) -> None:
    mx = RoomsMx()
    bot = bounded(store, mx)
    bot.settings = lambda: make_settings(access__allowed_users=[ANN])
    assert not await bot._accept("!x:bot.example", BOB)
    assert mx.left == [("!x:bot.example", TEXTS["en"]["refused.reason"])]
    assert await JoinsTable(store.db).rooms_of(BOB) == []


async def test_while_the_database_fails_nothing_is_joined_or_rejected(store: Store) -> None:
    mx = RoomsMx()
    bot = bounded(store, mx)

    async def down(inviter: str) -> list[str]:
        raise ConnectionRefusedError("database down")

    bot.joins.rooms_of = down  # type: ignore[method-assign]
    assert not await bot._accept("!x:bot.example", ANN)
    assert mx.joins == 0 and mx.left == []  # the invite stays: the next start takes it


async def test_the_bots_own_leave_uncounts_nothing(store: Store) -> None:
    mx = RoomsMx()
    bot = bounded(store, mx)
    assert await bot._accept("!dm:bot.example", ANN)
    # A late echo of its own leave (a rejection of an earlier invite into the room, say).
    await bot.bot_removed("!dm:bot.example", mx.user_id)
    assert await JoinsTable(store.db).rooms_of(ANN) == ["!dm:bot.example"]
