"""Every Store query, on SQLite and on PostgreSQL (the ``store`` fixture runs each test on both)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mautrix.util.async_db import Database

from lambda_plugin.db import (
    UNIQUE_VIOLATION,
    ChatRoomRow,
    HistoryRow,
    SnapshotRow,
    Store,
    UserRow,
    now_ms,
    upgrade_table,
)

TABLES = ("lambda_user", "chat_room", "snapshot", "history", "handled_event", "usage")
SCHEMA_VERSION = 3
ALICE = "@alice:example.org"
BOB = "@bob:example.org"



# What the plugin does not need as API of its own, composed from the API it has.


async def upsert_user(
    store: Store, user_id: str, space_id: str | None, next_chat_index: int
) -> None:
    await store.upsert_users([UserRow(user_id, space_id, next_chat_index, now_ms())])


async def get_user_by_space(store: Store, space_id: str) -> UserRow | None:
    return next((u for u in await store.all_users() if u.space_id == space_id), None)


async def is_handled(store: Store, event_id: str) -> bool:
    return event_id in await store.handled_among([event_id])



def room(
    n: int,
    user_id: str = ALICE,
    *,
    room_id: str | None = None,
    chat_id: str | None = None,
    platform_chat_id: str | None = None,
    name: str | None = None,
    agent_id: str = "echo",
    archived: bool = False,
    gone: bool = False,
    created_at: int = 1_000,
) -> ChatRoomRow:
    tag = user_id[1:].split(":")[0]
    return ChatRoomRow(
        room_id=room_id or f"!{tag}{n}:example.org",
        user_id=user_id,
        chat_id=chat_id or f"C{n}",
        name=name or f"Chat {n}",
        agent_id=agent_id,
        platform_chat_id=platform_chat_id or f"pc-{tag}-{n}",
        archived=archived,
        gone=gone,
        created_at=created_at,
    )


def snapshot(name: str, user_id: str = ALICE, **kw: object) -> SnapshotRow:
    values: dict = {
        "agent_id": "echo",
        "platform_chat_id": f"pc-{name}",
        "messages": f'[{{"role": "user", "content": "{name}"}}]',
        "created_at": 1_000,
    }
    values.update(kw)
    return SnapshotRow(user_id=user_id, name=name, **values)


# schema


async def test_upgrade_table_applies(store: Store) -> None:
    assert await store.db.fetchval("SELECT version FROM version") == SCHEMA_VERSION
    assert await store.db.fetchval("SELECT COUNT(*) FROM version") == 1
    for table in TABLES:
        assert await store.db.table_exists(table), table
    assert await store.counts() == dict.fromkeys(TABLES, 0)


async def test_second_start_is_a_no_op(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.upsert_room(room(3))
    again = Database.create(
        store.db.url, upgrade_table=upgrade_table, log=logging.getLogger("lambda.db.again")
    )
    await again.start()
    try:
        assert await again.fetchval("SELECT COUNT(*) FROM version") == 1
        assert await again.fetchval("SELECT version FROM version") == SCHEMA_VERSION
        restarted = Store(again)
        assert await restarted.get_room(room(3).room_id) == room(3)
        assert (await restarted.get_user(ALICE)).next_chat_index == 4
    finally:
        await again.stop()


# users


async def test_ensure_user_creates_once(store: Store) -> None:
    assert await store.get_user(ALICE) is None
    before = now_ms()
    first = await store.ensure_user(ALICE)
    assert first.user_id == ALICE
    assert first.space_id is None
    assert first.next_chat_index == 1
    assert before <= first.created_at <= now_ms()
    await store.take_chat_index(ALICE)
    await store.set_space(ALICE, "!space:example.org")
    second = await store.ensure_user(ALICE)
    assert second == UserRow(ALICE, "!space:example.org", 2, first.created_at)
    assert await store.get_user(ALICE) == second
    assert await store.all_users() == [second]


async def test_upsert_user_inserts_and_updates(store: Store) -> None:
    await upsert_user(store, ALICE, "!s1:example.org", 5)
    user = await store.get_user(ALICE)
    assert (user.space_id, user.next_chat_index) == ("!s1:example.org", 5)
    await upsert_user(store, ALICE, "!s2:example.org", 9)
    user = await store.get_user(ALICE)
    assert (user.space_id, user.next_chat_index) == ("!s2:example.org", 9)


async def test_upsert_user_never_lowers_next_chat_index(store: Store) -> None:
    await upsert_user(store, ALICE, "!s1:example.org", 7)
    created = (await store.get_user(ALICE)).created_at
    await upsert_user(store, ALICE, "!s2:example.org", 2)
    user = await store.get_user(ALICE)
    assert user == UserRow(ALICE, "!s2:example.org", 7, created)
    await upsert_user(store, ALICE, None, 7)
    assert await store.get_user(ALICE) == UserRow(ALICE, None, 7, created)


async def test_set_space_and_get_user_by_space(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.ensure_user(BOB)
    assert await get_user_by_space(store, "!space-a:example.org") is None
    await store.set_space(ALICE, "!space-a:example.org")
    await store.set_space(BOB, "!space-b:example.org")
    assert (await get_user_by_space(store, "!space-a:example.org")).user_id == ALICE
    assert (await get_user_by_space(store, "!space-b:example.org")).user_id == BOB
    await store.set_space(ALICE, "!space-a2:example.org")
    assert await get_user_by_space(store, "!space-a:example.org") is None
    assert (await store.get_user(ALICE)).space_id == "!space-a2:example.org"


async def test_set_space_of_unknown_user_writes_nothing(store: Store) -> None:
    await store.set_space(ALICE, "!space:example.org")
    assert await store.get_user(ALICE) is None
    assert await store.all_users() == []


async def test_space_id_is_unique(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.ensure_user(BOB)
    await store.set_space(ALICE, "!space:example.org")
    with pytest.raises(UNIQUE_VIOLATION):
        await store.set_space(BOB, "!space:example.org")
    with pytest.raises(UNIQUE_VIOLATION):
        await upsert_user(store, BOB, "!space:example.org", 1)
    with pytest.raises(UNIQUE_VIOLATION):
        await upsert_user(store, "@carol:example.org", "!space:example.org", 1)
    assert (await store.get_user(BOB)).space_id is None
    assert await store.get_user("@carol:example.org") is None
    assert (await get_user_by_space(store, "!space:example.org")).user_id == ALICE


async def test_all_users(store: Store) -> None:
    assert await store.all_users() == []
    await store.ensure_user(ALICE)
    await upsert_user(store, BOB, "!b:example.org", 4)
    users = {u.user_id: u for u in await store.all_users()}
    assert set(users) == {ALICE, BOB}
    assert users[BOB].space_id == "!b:example.org"
    assert users[BOB].next_chat_index == 4


# chat numbers


async def test_take_chat_index_is_sequential(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.ensure_user(BOB)
    assert [await store.take_chat_index(ALICE) for _ in range(3)] == [1, 2, 3]
    assert await store.take_chat_index(BOB) == 1
    assert (await store.get_user(ALICE)).next_chat_index == 4
    assert (await store.get_user(BOB)).next_chat_index == 2


async def test_take_chat_index_of_unknown_user(store: Store) -> None:
    with pytest.raises(KeyError):
        await store.take_chat_index(ALICE)
    assert await store.get_user(ALICE) is None


async def test_take_chat_index_concurrently_gives_distinct_numbers(store: Store) -> None:
    await upsert_user(store, ALICE, None, 5)
    taken = await asyncio.gather(*(store.take_chat_index(ALICE) for _ in range(25)))
    assert sorted(taken) == list(range(5, 30))
    assert (await store.get_user(ALICE)).next_chat_index == 30


# chat rooms


async def test_upsert_room_inserts_and_gets(store: Store) -> None:
    await store.ensure_user(ALICE)
    assert await store.get_room(room(1).room_id) is None
    await store.upsert_room(room(1, archived=True, gone=False))
    got = await store.get_room(room(1).room_id)
    assert got == room(1, archived=True, gone=False)
    assert got.archived is True
    assert got.gone is False
    assert got.chat_number == 1


async def test_booleans_come_back_as_bool(store: Store) -> None:
    await store.ensure_user(ALICE)
    combos = [(False, False), (True, False), (False, True), (True, True)]
    for n, (archived, gone) in enumerate(combos, start=1):
        await store.upsert_room(room(n, archived=archived, gone=gone))
    rows = await store.rooms_of(ALICE)
    assert [(r.archived, r.gone) for r in rows] == combos
    for row in rows + await store.all_rooms():
        assert type(row.archived) is bool
        assert type(row.gone) is bool


async def test_upsert_room_updates_in_place(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.upsert_room(room(1, created_at=111))
    changed = room(
        1,
        name="Renamed",
        agent_id="gpt",
        platform_chat_id="pc-new",
        archived=True,
        gone=True,
        created_at=999,
    )
    await store.upsert_room(changed)
    got = await store.get_room(changed.room_id)
    assert got.name == "Renamed"
    assert got.agent_id == "gpt"
    assert got.platform_chat_id == "pc-new"
    assert (got.archived, got.gone) == (True, True)
    assert got.created_at == 111  # the creation time is kept
    assert len(await store.all_rooms()) == 1
    # Back to false again.
    await store.upsert_room(room(1, name="Renamed", archived=False, gone=False))
    got = await store.get_room(changed.room_id)
    assert (got.archived, got.gone) == (False, False)


async def test_upsert_room_bumps_next_chat_index(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.upsert_room(room(5))
    assert (await store.get_user(ALICE)).next_chat_index == 6
    await store.upsert_room(room(2))  # an older number never lowers the counter
    assert (await store.get_user(ALICE)).next_chat_index == 6
    await store.upsert_room(room(6))
    assert (await store.get_user(ALICE)).next_chat_index == 7
    assert await store.take_chat_index(ALICE) == 7


async def test_upsert_room_with_non_numbered_chat_id_keeps_counter(store: Store) -> None:
    await upsert_user(store, ALICE, None, 3)
    await store.upsert_room(room(1, chat_id="imported", room_id="!imp:example.org"))
    assert (await store.get_user(ALICE)).next_chat_index == 3
    assert (await store.get_room("!imp:example.org")).chat_number == 0


async def test_chat_id_is_unique_per_user(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.ensure_user(BOB)
    await store.upsert_room(room(1))
    with pytest.raises(UNIQUE_VIOLATION):
        await store.upsert_room(room(1, room_id="!other:example.org", platform_chat_id="pc-x"))
    assert await store.get_room("!other:example.org") is None
    # The same chat id for another user is fine.
    await store.upsert_room(room(1, BOB))
    assert [r.chat_id for r in await store.rooms_of(BOB)] == ["C1"]
    # The store still works after the refused write.
    assert (await store.counts())["chat_room"] == 2


async def test_platform_chat_id_is_unique(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.ensure_user(BOB)
    await store.upsert_room(room(1, platform_chat_id="pc-shared"))
    with pytest.raises(UNIQUE_VIOLATION):
        await store.upsert_room(room(9, BOB, platform_chat_id="pc-shared"))
    assert await store.rooms_of(BOB) == []
    # The refused room did not bump its owner's counter either.
    assert (await store.get_user(BOB)).next_chat_index == 1
    # An update of the same room that moves onto a taken platform id is refused too.
    await store.upsert_room(room(2))
    with pytest.raises(UNIQUE_VIOLATION):
        await store.upsert_room(room(2, platform_chat_id="pc-shared"))
    assert (await store.get_room(room(2).room_id)).platform_chat_id == room(2).platform_chat_id


async def test_rooms_of_sorted_by_chat_number(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.ensure_user(BOB)
    # Inserted (and created) in an order that matches neither text nor number order.
    for n, created in ((10, 1), (2, 2), (1, 3), (21, 4), (3, 5)):
        await store.upsert_room(room(n, created_at=created))
    await store.upsert_room(room(4, BOB))
    assert [r.chat_id for r in await store.rooms_of(ALICE)] == ["C1", "C2", "C3", "C10", "C21"]
    assert [r.chat_id for r in await store.rooms_of(BOB)] == ["C4"]
    assert await store.rooms_of("@nobody:example.org") == []
    assert len(await store.all_rooms()) == 6


# snapshots


async def test_save_and_get_snapshot(store: Store) -> None:
    assert await store.get_snapshot(ALICE, "first") is None
    await store.save_snapshot(snapshot("first"))
    assert await store.get_snapshot(ALICE, "first") == snapshot("first")
    assert await store.get_snapshot(BOB, "first") is None
    assert await store.get_snapshot(ALICE, "other") is None


async def test_save_snapshot_overwrites(store: Store) -> None:
    await store.save_snapshot(snapshot("s", created_at=1))
    newer = snapshot("s", agent_id="gpt", platform_chat_id="pc-2", messages="[]", created_at=2)
    await store.save_snapshot(newer)
    assert await store.get_snapshot(ALICE, "s") == newer
    assert await store.snapshots_of(ALICE) == [newer]
    assert (await store.counts())["snapshot"] == 1


async def test_snapshots_of_ordered_by_name(store: Store) -> None:
    for name in ("zeta", "alpha", "mid", "beta"):
        await store.save_snapshot(snapshot(name))
    await store.save_snapshot(snapshot("bobs", BOB))
    assert [s.name for s in await store.snapshots_of(ALICE)] == ["alpha", "beta", "mid", "zeta"]
    assert [s.name for s in await store.snapshots_of(BOB)] == ["bobs"]
    assert await store.snapshots_of("@nobody:example.org") == []


async def test_snapshot_keeps_text_exactly(store: Store) -> None:
    messages = '[{"role": "user", "content": "Привет — \\"quotes\\" и 🙂\\n"}]' + "x" * 10_000
    await store.save_snapshot(snapshot("big", messages=messages))
    assert (await store.get_snapshot(ALICE, "big")).messages == messages


# history


async def test_append_history_assigns_seq(store: Store) -> None:
    assert await store.history("pc-1") == []
    before = now_ms()
    await store.append_history("pc-1", [("user", "hi"), ("assistant", "hello")])
    await store.append_history("pc-1", [("user", "again")])
    await store.append_history("pc-1", [])
    rows = await store.history("pc-1")
    assert [(r.seq, r.role, r.content) for r in rows] == [
        (0, "user", "hi"),
        (1, "assistant", "hello"),
        (2, "user", "again"),
    ]
    assert all(r.platform_chat_id == "pc-1" for r in rows)
    assert all(before <= r.created_at <= now_ms() for r in rows)


async def test_history_is_per_chat(store: Store) -> None:
    await store.append_history("pc-1", [("user", "one")])
    await store.append_history("pc-2", [("user", "two"), ("assistant", "2")])
    await store.append_history("pc-1", [("assistant", "1")])
    assert [(r.seq, r.content) for r in await store.history("pc-1")] == [(0, "one"), (1, "1")]
    assert [(r.seq, r.content) for r in await store.history("pc-2")] == [(0, "two"), (1, "2")]


async def test_history_limit_gives_newest_in_order(store: Store) -> None:
    await store.append_history("pc-1", [("user", f"m{i}") for i in range(12)])
    newest = await store.history("pc-1", limit=3)
    assert [(r.seq, r.content) for r in newest] == [(9, "m9"), (10, "m10"), (11, "m11")]
    assert [r.seq for r in await store.history("pc-1", limit=100)] == list(range(12))
    assert await store.history("pc-1", limit=0) == []
    assert all(isinstance(r, HistoryRow) for r in newest)


async def test_drop_history(store: Store) -> None:
    await store.append_history("pc-1", [("user", "a"), ("assistant", "b")])
    await store.append_history("pc-2", [("user", "keep")])
    await store.drop_history("pc-1")
    assert await store.history("pc-1") == []
    assert [r.content for r in await store.history("pc-2")] == ["keep"]
    await store.append_history("pc-1", [("user", "fresh")])
    assert [(r.seq, r.content) for r in await store.history("pc-1")] == [(0, "fresh")]


async def test_append_history_concurrently(store: Store) -> None:
    """The docstring promises atomic appends: concurrent appends must all land, in distinct seqs."""
    await store.append_history("pc-1", [("user", "first")])
    await asyncio.gather(
        *(
            store.append_history("pc-1", [("user", f"q{i}"), ("assistant", f"a{i}")])
            for i in range(8)
        )
    )
    rows = await store.history("pc-1")
    assert [r.seq for r in rows] == list(range(17))
    # Each append's pair stays together.
    for question, answer in zip(rows[1::2], rows[2::2], strict=True):
        assert (question.role, answer.role) == ("user", "assistant")
        assert question.content[1:] == answer.content[1:]


# handled events


async def test_mark_handled_once(store: Store) -> None:
    assert await is_handled(store, "$e1") is False
    assert await store.mark_handled("$e1", "!room:example.org") is True
    assert await is_handled(store, "$e1") is True
    assert await store.mark_handled("$e1", "!room:example.org") is False  # a redelivery
    assert await store.mark_handled("$e1", "!other:example.org") is False
    assert await is_handled(store, "$e2") is False
    assert await store.mark_handled("$e2", "!room:example.org") is True
    assert (await store.counts())["handled_event"] == 2


async def test_mark_handled_concurrently_wins_once(store: Store) -> None:
    results = await asyncio.gather(
        *(store.mark_handled("$race", "!room:example.org") for _ in range(10))
    )
    assert sorted(results) == [False] * 9 + [True]
    assert await is_handled(store, "$race") is True


# maintenance


async def _fill(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.ensure_user(BOB)
    await store.upsert_room(room(1))
    await store.upsert_room(room(2))
    await store.upsert_room(room(1, BOB))
    await store.save_snapshot(snapshot("s"))
    await store.append_history("pc-1", [("user", "a"), ("assistant", "b"), ("user", "c")])
    await store.mark_handled("$e1", "!room:example.org")
    await store.add_usage(ALICE, room(1).room_id, "2026-05-01", 10, 20)


async def test_counts(store: Store) -> None:
    assert await store.counts() == dict.fromkeys(TABLES, 0)
    await _fill(store)
    counts = await store.counts()
    assert counts == {
        "lambda_user": 2,
        "chat_room": 3,
        "snapshot": 1,
        "history": 3,
        "handled_event": 1,
        "usage": 1,
    }
    assert all(type(v) is int for v in counts.values())


async def test_clear_all(store: Store) -> None:
    await _fill(store)
    await store.clear_all()
    assert await store.counts() == dict.fromkeys(TABLES, 0)
    assert await store.get_user(ALICE) is None
    assert await is_handled(store, "$e1") is False
    assert await store.usage_since(ALICE, "2026-01-01") == (0, 0, 0)
    # The schema stays: everything can be written again from scratch.
    await _fill(store)
    assert (await store.counts())["chat_room"] == 3
    assert await store.db.fetchval("SELECT version FROM version") == SCHEMA_VERSION


async def test_plugin_state_values(store: Store) -> None:
    assert await store.get_value("catch_up_since") is None
    await store.set_value("catch_up_since", "s1")
    await store.set_value("catch_up_since", "s2")
    assert await store.get_value("catch_up_since") == "s2"
    await store.clear_all()
    assert await store.get_value("catch_up_since") is None
