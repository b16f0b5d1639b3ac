"""Chats: the one writer of a chat's row and marker. Two changes at once to one chat both
survive (registry, database, marker), nothing is written for no change, the marker only for
a marker field, and a failed marker write leaves the row as it was. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from lambda_plugin.chats import Chats
from lambda_plugin.db import ChatRoomRow, Store
from lambda_plugin.marker import MARKER_TYPE, Marker
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.registry import Registry

OWNER = "@alice:example.org"
ROOM = "!chat:example.org"
SPACE = "!space:example.org"
TIMEOUT = 10.0
LOG = logging.getLogger("test.chats")


@dataclass
class FakeMatrix:
    """Records state sends; each send yields to the loop a few times (as a real request
    would), so changes that are not serialised would interleave."""

    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    fail: bool = False
    yields: int = 5

    async def send_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> str:
        for _ in range(self.yields):
            await asyncio.sleep(0)
        if self.fail:
            raise HomeserverError(403, "M_FORBIDDEN", "no")
        self.sent.append((room_id, event_type, content))
        return f"$state{len(self.sent)}"

    def markers(self, room_id: str = ROOM) -> list[dict[str, Any]]:
        return [c for r, t, c in self.sent if r == room_id and t == MARKER_TYPE]


def row(**overrides: Any) -> ChatRoomRow:
    fields: dict[str, Any] = {
        "room_id": ROOM,
        "user_id": OWNER,
        "chat_id": "C1",
        "name": "Chat 1",
        "agent_id": "echo",
        "platform_chat_id": "pc-1",
        "archived": False,
        "gone": False,
        "created_at": 1,
    }
    fields.update(overrides)
    return ChatRoomRow(**fields)


@pytest.fixture
async def setup(store: Store) -> tuple[Chats, Registry, FakeMatrix]:
    registry = Registry(store)
    await registry.ensure_user(OWNER)
    await registry.set_space(OWNER, SPACE)
    mx = FakeMatrix()
    chats = Chats(registry, mx, LOG)  # type: ignore[arg-type]
    await chats.add(row())
    assert mx.sent == []  # a new room's marker was part of its creation
    return chats, registry, mx


async def stored(store: Store, room_id: str = ROOM) -> ChatRoomRow:
    rooms = {r.room_id: r for r in await store.all_rooms()}
    return rooms[room_id]


def marker_of(room: ChatRoomRow) -> dict[str, Any]:
    return Marker.for_chat(room, SPACE).content()


async def both(*changes: Any) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*changes), TIMEOUT)


# --- two changes at once --------------------------------------------------------------------


async def test_a_new_conversation_and_a_rename_at_once_both_survive(
    setup: tuple[Chats, Registry, FakeMatrix], store: Store
) -> None:
    chats, registry, mx = setup
    await both(
        chats.update(ROOM, platform_chat_id="pc-2"),
        chats.update(ROOM, name="Renamed"),
    )
    expected = row(platform_chat_id="pc-2", name="Renamed")
    assert registry.rooms[ROOM] == expected
    assert await stored(store) == expected
    assert mx.markers()[-1] == marker_of(expected)
    assert mx.markers()[-1]["platform_chat_id"] == "pc-2"


async def test_a_rename_then_a_new_conversation_at_once_both_survive(
    setup: tuple[Chats, Registry, FakeMatrix], store: Store
) -> None:
    chats, registry, mx = setup
    await both(
        chats.update(ROOM, name="Renamed"),
        chats.update(ROOM, platform_chat_id="pc-2"),
    )
    expected = row(platform_chat_id="pc-2", name="Renamed")
    assert registry.rooms[ROOM] == expected
    assert await stored(store) == expected
    assert mx.markers() == [marker_of(expected)]


async def test_agent_and_archive_at_once_both_survive_in_the_marker(
    setup: tuple[Chats, Registry, FakeMatrix], store: Store
) -> None:
    chats, registry, mx = setup
    results = await both(
        chats.update(ROOM, agent_id="gpt"),
        chats.update(ROOM, archived=True),
    )
    expected = row(agent_id="gpt", archived=True)
    assert results[-1] == expected  # the second sees the first's change
    assert registry.rooms[ROOM] == expected
    assert await stored(store) == expected
    assert len(mx.markers()) == 2
    last = mx.markers()[-1]
    assert last == marker_of(expected)
    assert last["agent_id"] == "gpt"
    assert last["archived"] is True
    assert Marker.from_content(last) == Marker.for_chat(expected, SPACE)


async def test_many_changes_at_once_all_survive(
    setup: tuple[Chats, Registry, FakeMatrix], store: Store
) -> None:
    chats, registry, mx = setup
    await both(
        chats.update(ROOM, agent_id="gpt"),
        chats.update(ROOM, name="Renamed"),
        chats.update(ROOM, archived=True),
        chats.update(ROOM, platform_chat_id="pc-9"),
    )
    expected = row(agent_id="gpt", name="Renamed", archived=True, platform_chat_id="pc-9")
    assert registry.rooms[ROOM] == expected
    assert await stored(store) == expected
    assert mx.markers()[-1] == marker_of(expected)


async def test_a_change_reads_the_row_as_it_is_now(
    setup: tuple[Chats, Registry, FakeMatrix], store: Store
) -> None:
    chats, registry, mx = setup
    seen: list[ChatRoomRow] = []

    async def next_conversation(current: ChatRoomRow) -> ChatRoomRow:
        seen.append(current)
        await asyncio.sleep(0)
        return replace(current, platform_chat_id=current.platform_chat_id + "+")

    await both(*(chats.change(ROOM, next_conversation) for _ in range(3)))
    assert [r.platform_chat_id for r in seen] == ["pc-1", "pc-1+", "pc-1++"]
    assert registry.rooms[ROOM].platform_chat_id == "pc-1+++"
    assert (await stored(store)).platform_chat_id == "pc-1+++"
    assert [m["platform_chat_id"] for m in mx.markers()] == ["pc-1+", "pc-1++", "pc-1+++"]


# --- what is written ------------------------------------------------------------------------


class CountingRegistry(Registry):
    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.saved: list[ChatRoomRow] = []

    async def save_room(self, room: ChatRoomRow) -> None:
        self.saved.append(room)
        await super().save_room(room)


@pytest.fixture
async def counted(store: Store) -> tuple[Chats, CountingRegistry, FakeMatrix]:
    registry = CountingRegistry(store)
    await registry.ensure_user(OWNER)
    await registry.set_space(OWNER, SPACE)
    mx = FakeMatrix()
    chats = Chats(registry, mx, LOG)  # type: ignore[arg-type]
    await chats.add(row())
    registry.saved.clear()
    return chats, registry, mx


async def test_a_change_that_returns_the_row_unchanged_writes_nothing(
    counted: tuple[Chats, CountingRegistry, FakeMatrix],
) -> None:
    chats, registry, mx = counted

    async def same(current: ChatRoomRow) -> ChatRoomRow:
        return current

    async def equal(current: ChatRoomRow) -> ChatRoomRow:
        return replace(current)

    async def nothing(current: ChatRoomRow) -> None:
        return None

    assert await chats.change(ROOM, same) == row()
    assert await chats.change(ROOM, equal) == row()
    assert await chats.change(ROOM, nothing) == row()
    assert await chats.update(ROOM, name="Chat 1", archived=False) == row()
    assert registry.saved == []
    assert mx.sent == []


async def test_a_name_change_writes_the_row_and_no_marker(
    counted: tuple[Chats, CountingRegistry, FakeMatrix], store: Store
) -> None:
    chats, registry, mx = counted
    updated = await chats.update(ROOM, name="Renamed")
    assert updated == row(name="Renamed")
    assert registry.saved == [updated]
    assert await stored(store) == updated
    assert mx.sent == []


@pytest.mark.parametrize(
    "changes",
    [
        {"platform_chat_id": "pc-2"},
        {"agent_id": "gpt"},
        {"archived": True},
        {"chat_id": "C7"},
    ],
)
async def test_a_marker_field_change_writes_the_marker_then_the_row(
    counted: tuple[Chats, CountingRegistry, FakeMatrix], store: Store, changes: dict
) -> None:
    chats, registry, mx = counted
    updated = await chats.update(ROOM, **changes)
    assert updated == row(**changes)
    assert mx.sent == [(ROOM, MARKER_TYPE, marker_of(updated))]
    assert registry.saved == [updated]
    assert await stored(store) == updated


async def test_change_on_an_unknown_room_raises_key_error(
    counted: tuple[Chats, CountingRegistry, FakeMatrix],
) -> None:
    chats, registry, mx = counted
    with pytest.raises(KeyError):
        await chats.update("!unknown:example.org", name="x")

    async def never(current: ChatRoomRow) -> ChatRoomRow:
        raise AssertionError("must not run")

    with pytest.raises(KeyError):
        await chats.change("!unknown:example.org", never)
    assert registry.saved == []
    assert mx.sent == []


async def test_a_failing_marker_write_leaves_the_row_as_it_was(
    counted: tuple[Chats, CountingRegistry, FakeMatrix], store: Store
) -> None:
    chats, registry, mx = counted
    mx.fail = True
    with pytest.raises(HomeserverError):
        await chats.update(ROOM, platform_chat_id="pc-2", name="Renamed")
    assert registry.rooms[ROOM] == row()
    assert await stored(store) == row()
    assert registry.saved == []
    mx.fail = False  # the lock was let go: the next change goes through
    updated = await asyncio.wait_for(chats.update(ROOM, agent_id="gpt"), TIMEOUT)
    assert updated == row(agent_id="gpt")
    assert await stored(store) == updated


async def test_a_failing_change_among_concurrent_ones_loses_only_itself(
    counted: tuple[Chats, CountingRegistry, FakeMatrix], store: Store
) -> None:
    chats, registry, mx = counted

    async def broken(current: ChatRoomRow) -> ChatRoomRow:
        await asyncio.sleep(0)
        raise RuntimeError("change broke")

    results = await asyncio.wait_for(
        asyncio.gather(
            chats.update(ROOM, name="Renamed"),
            chats.change(ROOM, broken),
            chats.update(ROOM, agent_id="gpt"),
            return_exceptions=True,
        ),
        TIMEOUT,
    )
    assert isinstance(results[1], RuntimeError)
    expected = row(name="Renamed", agent_id="gpt")
    assert registry.rooms[ROOM] == expected
    assert await stored(store) == expected
    assert mx.markers() == [marker_of(expected)]
