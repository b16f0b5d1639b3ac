"""Every Store query, on SQLite and on PostgreSQL (the ``store`` fixture runs each test on both)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from mautrix.util.async_db import Database, UpgradeTable

from lambda_plugin.db import (
    DATABASE_DOWN,
    UNIQUE_VIOLATION,
    ChatRoomRow,
    HistoryBounds,
    HistoryRow,
    HistorySize,
    LedgerRow,
    SnapshotRow,
    Store,
    UserRow,
    now_ms,
    upgrade_table,
)
from lambda_plugin.db import store as store_module
from lambda_plugin.db.ledger import LedgerTable
from lambda_plugin.intake import Incoming, Kind, classify
from lambda_plugin.ledger import DONE, Fate, Ledger, incoming_of
from lambda_plugin.reconcile import Reconciler, Report
from tests.unit.conftest import ENGINES, _drop_database
from tests.unit.test_config import settings as make_settings

TABLES = ("lambda_user", "chat_room", "snapshot", "history", "ledger", "usage")
SCHEMA_VERSION = 7
ALICE = "@alice:example.org"
BOB = "@bob:example.org"
ROOM = "!room:example.org"


# What the plugin does not need as API of its own, composed from the API it has.


async def upsert_user(
    store: Store, user_id: str, space_id: str | None, next_chat_index: int
) -> None:
    await store.upsert_users([UserRow(user_id, space_id, next_chat_index, now_ms())])


async def get_user_by_space(store: Store, space_id: str) -> UserRow | None:
    return next((u for u in await store.all_users() if u.space_id == space_id), None)


async def state_of(store: Store, event_id: str) -> str | None:
    """The event's state in the ledger (None: the ledger has no row of it)."""
    return (await LedgerTable(store.db).states_of([event_id])).get(event_id)


BOT = "@bot:example.org"
TIMEOUT = 10
OTHER_ROOM = "!other:example.org"


def message(event_id: str, room_id: str = ROOM, ts: int = 1_000, body: str = "hi") -> Incoming:
    """A user's message as intake makes it (the event kept with it, for the ledger)."""
    raw = {
        "type": "m.room.message", "event_id": event_id, "room_id": room_id, "sender": ALICE,
        "origin_server_ts": ts, "content": {"msgtype": "m.text", "body": body},
    }  # fmt: skip
    found = classify(raw, BOT)
    assert found.kind is Kind.MESSAGE
    return found


def make_ledger(store: Store, **overrides: Any) -> Ledger:
    current = dataclasses.replace(make_settings(), **overrides)
    return Ledger(
        settings=lambda: current, log=logging.getLogger("test.ledger"), store=store,
        bot_id=lambda: BOT,
    )  # fmt: skip


def ledger_row(event_id: str, state: str = "seen", **kw: Any) -> LedgerRow:
    values: dict[str, Any] = {
        "room_id": ROOM, "sender": ALICE, "kind": "message", "state": state, "reason": "",
        "ts": 1_000, "event": json.dumps({"event_id": event_id}), "answer_event": None,
        "updated_at": 5_000,
    }  # fmt: skip
    values.update(kw)
    return LedgerRow(event_id=event_id, **values)


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
    assert not await store.db.table_exists("handled_event")  # the ledger replaced it
    assert await store.db.table_exists("file_place")  # not counted: no plugin data of its own
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


@pytest_asyncio.fixture(params=ENGINES)
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database of each engine."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'old.db'}"
        return
    pg = request.getfixturevalue("postgres")
    name = f"lambda_unit_{uuid.uuid4().hex[:16]}"
    yield pg.create_database(name)
    await _drop_database(pg.url("postgres"), name)


async def test_a_database_of_version_3_upgrades_its_handled_log_into_the_ledger(
    empty_url: str,
) -> None:
    # A database made by the steps up to v3 only (the handled log), then started with all.
    shipped = UpgradeTable()
    shipped.upgrades = upgrade_table.upgrades[:3]
    old = Database.create(empty_url, upgrade_table=shipped, log=logging.getLogger("db.v3"))
    await old.start()
    try:
        assert await old.fetchval("SELECT version FROM version") == 3
        assert not await old.table_exists("ledger")
        await Store(old).ensure_user(ALICE)
        for seq, role, content in ((0, "user", "old"), (1, "assistant", "turn")):
            await old.execute(  # as v3 wrote history: no message id
                "INSERT INTO history (platform_chat_id, seq, role, content, created_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                "pc-1", seq, role, content, 1_000,
            )  # fmt: skip
        for event_id, room_id, handled_at in (("$a", ROOM, 1_000), ("$b", "!other:x", 2_000)):
            await old.execute(
                "INSERT INTO handled_event (event_id, room_id, handled_at) VALUES ($1, $2, $3)",
                event_id, room_id, handled_at,
            )  # fmt: skip
    finally:
        await old.stop()
    new = Database.create(empty_url, upgrade_table=upgrade_table, log=logging.getLogger("db"))
    await new.start()
    try:
        assert await new.fetchval("SELECT version FROM version") == SCHEMA_VERSION
        assert not await new.table_exists("handled_event")
        upgraded = Store(new)
        table = LedgerTable(new)
        assert await table.get("$a") == LedgerRow(
            event_id="$a", room_id=ROOM, sender="", kind="message", state="answered",
            reason="migrated", ts=1_000, event=None, answer_event=None, updated_at=1_000,
        )  # fmt: skip
        assert await table.states_of(["$a", "$b", "$c"]) == {"$a": "answered", "$b": "answered"}
        assert (await upgraded.counts())["ledger"] == 2
        # What was handled before is never run again: a redelivery finds it ended.
        ledger = make_ledger(upgraded)
        assert await ledger.claim(message("$a")) is False
        assert await ledger.claim(message("$c")) is True
        assert [row.event_id for row in await ledger.unfinished()] == ["$c"]
        # The migrated rows age out as they did (by when they were handled).
        await ledger.prune(1_500)
        assert await table.states_of(["$a", "$b"]) == {"$b": "answered"}
        # The history is kept; its old turns belong to no message and are never left out.
        assert await upgraded.get_user(ALICE) is not None
        old_turns = [(r.seq, r.content) for r in await upgraded.history("pc-1", excluding="$x")]
        assert old_turns == [(0, "old"), (1, "turn")]
        assert await new.fetchval("SELECT COUNT(*) FROM history WHERE message_id IS NULL") == 2
        await upgraded.append_history("pc-1", [("user", "new")], message_id="$c")
        assert [r.content for r in await upgraded.history("pc-1")] == ["old", "turn", "new"]
        assert [r.content for r in await upgraded.history("pc-1", excluding="$c")] == [
            "old", "turn",
        ]  # fmt: skip
    finally:
        await new.stop()


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


async def test_a_row_is_built_by_position_and_refuses_other_columns(store: Store) -> None:
    """from_row reads a ``SELECT {columns}`` by position (fast at thousands of rows): a
    row of another column count is refused, not misread (every query selects ``columns``:
    the same count in another order would be misread)."""
    await store.ensure_user(ALICE)
    await store.upsert_room(room(1))
    (got,) = await store.all_rooms()
    assert got == room(1)
    wrong = await store.db.fetchrow("SELECT room_id, user_id FROM chat_room")
    with pytest.raises(ValueError):
        ChatRoomRow.from_row(wrong)


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
    assert await store.snapshot_names(ALICE) == ["s"]
    assert (await store.counts())["snapshot"] == 1


async def test_snapshot_names_ordered_by_name(store: Store) -> None:
    for name in ("zeta", "alpha", "mid", "beta"):
        await store.save_snapshot(snapshot(name))
    await store.save_snapshot(snapshot("bobs", BOB))
    assert await store.snapshot_names(ALICE) == ["alpha", "beta", "mid", "zeta"]
    assert await store.snapshot_names(BOB) == ["bobs"]
    assert await store.snapshot_names("@nobody:example.org") == []


async def test_snapshot_bytes_is_the_utf8_size_of_its_contents(store: Store) -> None:
    messages = '{"content": "Привет 🙂"}' + "x" * 5_000
    await store.save_snapshot(snapshot("big", messages=messages))
    assert await store.snapshot_bytes(ALICE, "big") == len(messages.encode())
    assert await store.snapshot_bytes(ALICE, "missing") is None
    assert await store.snapshot_bytes(BOB, "big") is None


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


async def test_append_history_with_a_message_id_replaces_that_messages_turn(store: Store) -> None:
    await store.append_history("pc-1", [("user", "a"), ("assistant", "A")])
    await store.append_history("pc-1", [("user", "q"), ("assistant", "first try")], "$m")
    await store.append_history("pc-2", [("user", "q"), ("assistant", "elsewhere")], "$m")
    # Asked again (a crash between the write and the answer's send): one turn, the newer.
    await store.append_history("pc-1", [("user", "q"), ("assistant", "second try")], "$m")
    rows = await store.history("pc-1")
    assert [(r.role, r.content) for r in rows] == [
        ("user", "a"), ("assistant", "A"), ("user", "q"), ("assistant", "second try"),
    ]  # fmt: skip
    assert len({r.seq for r in rows}) == 4
    assert [r.content for r in await store.history("pc-2")] == ["q", "elsewhere"]
    # Another message's turn, and turns of no message, are never replaced.
    await store.append_history("pc-1", [("user", "r"), ("assistant", "R")], "$n")
    await store.append_history("pc-1", [("user", "b"), ("assistant", "B")])
    await store.append_history("pc-1", [("user", "q"), ("assistant", "third try")], "$m")
    contents = [r.content for r in await store.history("pc-1")]
    assert contents == ["a", "A", "r", "R", "b", "B", "q", "third try"]
    assert (await store.counts())["history"] == 10


async def test_history_excluding_a_message_leaves_its_turn_out(store: Store) -> None:
    await store.append_history("pc-1", [("user", "a"), ("assistant", "A")])
    await store.append_history("pc-1", [("user", "q"), ("assistant", "Q")], message_id="$m")
    await store.append_history("pc-1", [("user", "z"), ("assistant", "Z")], message_id="$z")
    assert [r.content for r in await store.history("pc-1", excluding="$m")] == ["a", "A", "z", "Z"]
    assert [r.content for r in await store.history("pc-1", excluding="$z")] == ["a", "A", "q", "Q"]
    assert len(await store.history("pc-1", excluding="")) == 6  # nothing left out
    assert len(await store.history("pc-1", excluding="$unknown")) == 6
    # With a limit, the newest of what is left.
    newest = await store.history("pc-1", limit=2, excluding="$z")
    assert [r.content for r in newest] == ["q", "Q"]
    assert [r.content for r in await store.history("pc-1", limit=3, excluding="$m")] == [
        "A", "z", "Z",
    ]  # fmt: skip


async def test_concurrent_appends_of_one_message_leave_one_turn(store: Store) -> None:
    await asyncio.gather(
        *(
            store.append_history("pc-1", [("user", "q"), ("assistant", f"try {i}")], "$m")
            for i in range(6)
        )
    )
    rows = await store.history("pc-1")
    assert [r.role for r in rows] == ["user", "assistant"]
    assert rows[1].content.startswith("try ")


def bounded(store: Store, max_turns: int = 200, max_bytes: int = 1024 * 1024) -> Store:
    """A Store on the same database whose history keeps ``max_turns`` and ``max_bytes``."""
    return Store(store.db, history_bounds=lambda: HistoryBounds(max_turns, max_bytes))


async def contents(store: Store, platform_chat_id: str = "pc-1") -> list[str]:
    return [r.content for r in await store.history(platform_chat_id)]


@pytest.mark.parametrize(
    ("max_turns", "max_bytes", "appends", "kept", "pruned"),
    [
        # Turns: the oldest go first, the newest max_turns stay.
        (4, 10_000, [["a", "A"], ["b", "B"], ["c", "C"]], ["b", "B", "c", "C"], 2),
        # Bytes (UTF-8, not characters): "éé" is 4 bytes, three of them 12 > 10.
        (100, 10, [["éé"], ["éé"], ["éé"]], ["éé", "éé"], 1),
        (100, 10, [["12345", "123456"]], ["123456"], 1),
        # One append past the bounds on its own (a restored snapshot): its newest stay.
        (3, 10_000, [[f"m{i}" for i in range(10)]], ["m7", "m8", "m9"], 7),
        # A turn bigger than the whole bound is not kept at all.
        (100, 4, [["ok"], ["far too big"]], [], 2),
    ],
)
async def test_history_is_pruned_to_its_bounds_as_turns_are_added(
    store: Store, max_turns: int, max_bytes: int, appends: list[list[str]], kept: list[str],
    pruned: int,
) -> None:  # fmt: skip
    small = bounded(store, max_turns, max_bytes)
    for append in appends:
        await small.append_history("pc-1", [("user", text) for text in append])
    await small.append_history("pc-other", [("user", "u")])
    assert await contents(small) == kept
    assert (await small.history_size("pc-1")).pruned == pruned
    assert await store.db.fetchval("SELECT COUNT(*) FROM history WHERE platform_chat_id='pc-1'") == len(kept)
    assert await contents(small, "pc-other") == ["u"]
    assert (await small.history_size("pc-other")).pruned == 0


async def test_pruned_turns_are_counted_until_the_history_is_dropped(store: Store) -> None:
    small = bounded(store, max_turns=2)
    for i in range(5):
        await small.append_history("pc-1", [("user", f"q{i}"), ("assistant", f"a{i}")])
    assert await contents(small) == ["q4", "a4"]
    size = await small.history_size("pc-1")
    assert (size.turns, size.chars, size.asked, size.pruned) == (2, 4, 1, 8)
    # A re-asked turn replaces its own: nothing more is pruned.
    await small.append_history("pc-1", [("user", "q5"), ("assistant", "a5")], message_id="$m")
    await small.append_history("pc-1", [("user", "q5"), ("assistant", "again")], message_id="$m")
    assert await contents(small) == ["q5", "again"]
    assert (await small.history_size("pc-1")).pruned == 10
    await small.drop_history("pc-1")
    assert await small.history_size("pc-1") == HistorySize(0, 0, 0, 0)
    assert await store.db.fetchval("SELECT COUNT(*) FROM plugin_state") == 0


async def test_history_size_is_read_in_sums(store: Store) -> None:
    await store.append_history("pc-1", [("user", "Привет"), ("assistant", "🙂 ok")])
    await store.append_history("pc-1", [("user", "q"), ("assistant", "Q")], message_id="$m")
    assert await store.history_size("pc-1") == HistorySize(turns=4, chars=12, asked=2, pruned=0)
    assert await store.history_size("pc-1", excluding="$m") == HistorySize(2, 10, 1, 0)
    assert await store.history_size("pc-none") == HistorySize(0, 0, 0, 0)


async def test_history_reads_at_most_max_turns_rows(store: Store) -> None:
    # Rows from before the bound (or a bound lowered since): reads stay bounded anyway.
    await store.append_history("pc-1", [("user", f"m{i}") for i in range(30)])
    small = bounded(store, max_turns=5)
    assert await contents(small) == [f"m{i}" for i in range(25, 30)]
    assert [r.content for r in await small.history("pc-1", limit=100)] == await contents(small)
    assert [r.content for r in await small.history("pc-1", limit=2)] == ["m28", "m29"]
    assert await small.history("pc-1", limit=0) == []
    # The next turn prunes the conversation to the bound.
    await small.append_history("pc-1", [("user", "new")])
    assert await store.db.fetchval("SELECT COUNT(*) FROM history") == 5
    assert (await small.history_size("pc-1")).pruned == 26


async def test_concurrent_appends_keep_the_bound(store: Store) -> None:
    small = bounded(store, max_turns=6)
    await asyncio.gather(
        *(small.append_history("pc-1", [("user", f"q{i}"), ("assistant", f"a{i}")]) for i in range(8))
    )
    rows = await small.history("pc-1")
    assert len(rows) == 6 and [r.seq for r in rows] == list(range(10, 16))
    assert (await small.history_size("pc-1")).pruned == 10


async def test_each_conversation_has_a_lock_of_its_own_that_goes_when_unused(store: Store) -> None:
    held = store.histories.lock("pc-busy")
    async with held:  # an append of pc-busy under way: another conversation does not wait
        await asyncio.wait_for(store.append_history("pc-1", [("user", "hi")]), TIMEOUT)
        assert store.histories.lock("pc-busy") is held  # while pc-busy's waits for it
    del held
    await asyncio.gather(*(store.append_history(f"pc-{i}", [("user", "x")]) for i in range(50)))
    await store.drop_history("pc-3")
    assert len(store.histories._locks) == 0  # none kept per conversation once unused


# constraint violations


async def test_a_room_of_an_unknown_owner_is_a_violation_on_both_engines(store: Store) -> None:
    # SQLite's IntegrityError covers a foreign key too; PostgreSQL's is no unique violation.
    with pytest.raises(UNIQUE_VIOLATION):
        await store.upsert_room(room(1, "@ghost:example.org"))
    assert await store.all_rooms() == []


async def test_reconciliation_writes_the_other_rooms_past_an_unknown_owner(store: Store) -> None:
    await store.ensure_user(ALICE)
    reconciler = Reconciler(None, store, None, make_settings, logging.getLogger("test"))  # type: ignore[arg-type]
    report = Report()
    await reconciler._write_rows([room(1), room(1, "@ghost:example.org")], report)
    assert [r.room_id for r in await store.all_rooms()] == [room(1).room_id]
    assert report.conflicts == 1


# the ledger's SQL (lambda_plugin.db.ledger)


async def test_ledger_insert_returns_the_existing_row_on_conflict(store: Store) -> None:
    table = LedgerTable(store.db)
    first = ledger_row("$e", ts=1_000, updated_at=5_000)
    assert await table.insert(first) == first
    # A second insert of the event changes nothing and hands back the row as it is.
    later = dataclasses.replace(
        first, room_id=OTHER_ROOM, state="taken", reason="x", event=None, updated_at=9_000
    )
    assert await table.insert(later) == first
    await table.set_state("$e", "kept", "rate", keep_event=True)
    kept = await table.get("$e")
    assert kept is not None and (kept.state, kept.reason) == ("kept", "rate")
    assert await table.insert(first) == kept
    assert await table.get("$missing") is None
    assert (await store.counts())["ledger"] == 1


async def test_ledger_insert_concurrently_keeps_one_row(store: Store) -> None:
    table = LedgerTable(store.db)
    rows = [ledger_row("$race", reason=f"r{i}") for i in range(10)]
    found = await asyncio.gather(*(table.insert(row) for row in rows))
    assert len(set(found)) == 1 and found[0] in rows
    assert (await store.counts())["ledger"] == 1


@pytest.mark.parametrize(
    ("state", "keep_event"), [("kept", True), ("taken", True), *[(s, False) for s in sorted(DONE)]]
)
async def test_set_state_drops_the_event_unless_it_may_run_again(
    store: Store, state: str, keep_event: bool
) -> None:
    table = LedgerTable(store.db)
    row = ledger_row("$e", updated_at=1)
    await table.insert(row)
    await table.insert(ledger_row("$untouched"))
    before = now_ms()
    await table.set_state("$e", state, "why", keep_event)
    changed = await table.get("$e")
    assert changed is not None
    assert (changed.state, changed.reason) == (state, "why")
    assert changed.event == (row.event if keep_event else None)
    assert before <= changed.updated_at <= now_ms()
    assert (changed.ts, changed.room_id, changed.sender) == (row.ts, row.room_id, row.sender)
    assert await table.get("$untouched") == ledger_row("$untouched")
    await table.set_state("$missing", state, "", keep_event)  # writes nothing
    assert (await store.counts())["ledger"] == 2


async def test_set_answer_event(store: Store) -> None:
    table = LedgerTable(store.db)
    await table.insert(ledger_row("$e", state="taken"))
    await table.set_answer_event("$e", "$answer")
    found = await table.get("$e")
    assert found == ledger_row("$e", state="taken", answer_event="$answer")


async def test_in_states_gives_the_rows_oldest_first(store: Store) -> None:
    table = LedgerTable(store.db)
    for event_id, state, ts, room_id, updated in [  # ids in no order of their own
        ("$x", "seen", 30, ROOM, 1),
        ("$z", "taken", 10, ROOM, 1),
        ("$k1", "kept", 25, ROOM, 1),
        ("$y", "seen", 20, OTHER_ROOM, 1),
        ("$done", "answered", 5, ROOM, 1),
        ("$k9", "kept", 15, ROOM, 1),
        ("$t1", "seen", 40, ROOM, 8),  # the same ts: the older write first
        ("$t2", "seen", 40, ROOM, 7),
        ("$k5", "kept", 1, OTHER_ROOM, 1),
    ]:
        await table.insert(ledger_row(event_id, state, ts=ts, room_id=room_id, updated_at=updated))
    unfinished = await table.in_states(("seen", "taken"))
    assert [r.event_id for r in unfinished] == ["$z", "$y", "$x", "$t2", "$t1"]
    assert all(isinstance(r, LedgerRow) for r in unfinished)
    assert [r.event_id for r in await table.in_states(("kept",), ROOM)] == ["$k9", "$k1"]
    assert [r.event_id for r in await table.in_states(("kept",), OTHER_ROOM)] == ["$k5"]
    assert [r.event_id for r in await table.in_states(("seen",), OTHER_ROOM)] == ["$y"]
    assert await table.in_states(("kept",), "!nowhere:example.org") == []
    assert await table.in_states(("left",)) == []


async def test_states_of_checks_any_number_of_ids_in_batches(store: Store) -> None:
    table = LedgerTable(store.db)
    states = ("seen", "taken", "answered", "kept")
    known = {f"$e{i}": states[i % 4] for i in range(1_100)}
    async with store.db.acquire() as conn:
        await conn.executemany(
            f"INSERT INTO ledger ({LedgerRow.columns})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            [dataclasses.astuple(ledger_row(e, s)) for e, s in known.items()],
        )
    asked = [*known, *(f"$unknown{i}" for i in range(103))]  # 1,203 ids: 3 batches
    queries: list[int] = []
    real_fetch = store.db.fetch

    async def counting_fetch(query: str, *args: Any) -> Any:
        queries.append(len(args))
        return await real_fetch(query, *args)

    table.db = SimpleNamespace(fetch=counting_fetch)  # type: ignore[assignment]
    assert await table.states_of(asked) == known
    assert queries == [500, 500, 203]
    assert await table.states_of([]) == {}
    assert queries == [500, 500, 203]  # no ids, no query
    assert await table.states_of(["$e1", "$e1", "$nope"]) == {"$e1": "taken"}


async def test_prune_forgets_rows_not_touched_since_the_cut_off(store: Store) -> None:
    table = LedgerTable(store.db)
    for event_id, updated_at in (("$old", 100), ("$edge", 200), ("$new", 300)):
        state = "seen" if event_id == "$edge" else "answered"
        await table.insert(ledger_row(event_id, state, updated_at=updated_at))
    await table.prune(200)
    left = await table.states_of(["$old", "$edge", "$new"])
    assert left == {"$edge": "seen", "$new": "answered"}  # strictly older ones only
    # A change touches the row: it is kept as long again.
    assert await table.set_state("$edge", "kept", "rate", keep_event=True)
    assert not await table.set_state("$new", "kept", "rate", keep_event=True)  # ends are final
    await table.prune(now_ms() - 60_000)
    assert await table.states_of(["$edge", "$new"]) == {"$edge": "kept"}
    await table.prune(now_ms() + 1)
    assert (await store.counts())["ledger"] == 0


# the ledger (lambda_plugin.ledger): one fate per event, claimed once


async def test_claim_once(store: Store) -> None:
    ledger = make_ledger(store)
    assert await state_of(store, "$e1") is None
    assert await ledger.claim(message("$e1")) is True
    assert await state_of(store, "$e1") == "seen"
    assert await ledger.claim(message("$e1")) is False  # a second delivery while it runs
    await ledger.end("$e1", Fate.ANSWERED)
    assert await state_of(store, "$e1") == "answered"
    assert await ledger.claim(message("$e1")) is False  # a redelivery
    assert await ledger.claim(message("$e1", room_id=OTHER_ROOM)) is False
    assert await ledger.claim(message("$e1"), retried=True) is False  # answered: never again
    assert await ledger.claim(message("$e2")) is True
    assert (await store.counts())["ledger"] == 2


async def test_claim_concurrently_wins_once(store: Store) -> None:
    ledger = make_ledger(store)
    results = await asyncio.gather(*(ledger.claim(message("$race")) for _ in range(10)))
    assert sorted(results) == [False] * 9 + [True]
    assert await state_of(store, "$race") == "seen"
    # The process died holding it: the next one claims it again, once however often asked.
    again = make_ledger(store)
    results = await asyncio.gather(*(again.claim(message("$race")) for _ in range(10)))
    assert sorted(results) == [False] * 9 + [True]
    await again.end("$race", Fate.ANSWERED)
    assert not any(await asyncio.gather(*(again.claim(message("$race")) for _ in range(10))))
    assert not await make_ledger(store).claim(message("$race"))  # nor after another start


@pytest.mark.parametrize("fate", sorted((Fate(s) for s in DONE), key=lambda f: f.value))
async def test_an_ended_event_is_never_claimed_again(store: Store, fate: Fate) -> None:
    ledger = make_ledger(store)
    assert await ledger.claim(message("$e"))
    await ledger.taken("$e")
    await ledger.end("$e", fate, "why")
    for retried in (False, True):
        assert await ledger.claim(message("$e"), retried) is False
        assert await make_ledger(store).claim(message("$e"), retried) is False  # after a start
    row = await LedgerTable(store.db).get("$e")
    assert row is not None and (row.state, row.reason, row.event) == (fate.value, "why", None)
    assert await ledger.unfinished() == []
    assert await ledger.kept(ROOM) == []


async def test_a_kept_event_is_claimed_only_when_retried(store: Store) -> None:
    ledger = make_ledger(store)
    incoming = message("$k", body="try me later")
    assert await ledger.claim(incoming)
    assert await ledger.keep(incoming, "rate") == []
    row = await LedgerTable(store.db).get("$k")
    assert row is not None and (row.state, row.reason) == ("kept", "rate")
    assert row.event is not None  # held to be sent again
    assert await ledger.claim(incoming) is False  # a redelivery does not run it
    assert await make_ledger(store).claim(incoming) is False  # nor does a start
    assert await ledger.unfinished() == []
    assert await ledger.kept(ROOM) == [incoming]  # as it was, from the stored event
    assert await ledger.claim(incoming, retried=True) is True  # !retry
    assert await ledger.claim(incoming, retried=True) is False  # held by that retry
    await ledger.end("$k", Fate.ANSWERED)
    assert await ledger.kept(ROOM) == []
    assert await ledger.claim(incoming, retried=True) is False


async def test_a_taken_event_keeps_what_a_start_needs_to_run_it_again(store: Store) -> None:
    ledger = make_ledger(store)
    incoming = message("$t", ts=1_234, body="a long question")
    assert await ledger.claim(incoming)
    await ledger.taken("$t")
    await ledger.answer_started("$t", "$partial")
    [row] = await ledger.unfinished()
    assert (row.event_id, row.state, row.answer_event) == ("$t", "taken", "$partial")
    again = incoming_of(row, BOT)
    assert again == incoming.resuming("$partial")
    assert (again.body, again.timestamp, again.resume) == ("a long question", 1_234, "$partial")
    assert await ledger.states_of(["$t", "$x"]) == {"$t": "taken"}


async def test_keep_drops_the_oldest_over_the_rooms_limit(store: Store) -> None:
    ledger = make_ledger(store, max_kept_per_room=2)
    # Oldest first by time, not by id.
    first, second, third = message("$c", ts=1), message("$a", ts=2), message("$b", ts=3)
    elsewhere = message("$o", room_id=OTHER_ROOM, ts=0)
    for incoming in (elsewhere, first, second):
        assert await ledger.claim(incoming)
        assert await ledger.keep(incoming, "quota") == []
    assert await ledger.claim(third)
    assert await ledger.keep(third, "quota") == [first]
    assert await ledger.kept(ROOM) == [second, third]
    assert await ledger.kept(OTHER_ROOM) == [elsewhere]
    dropped = await LedgerTable(store.db).get("$c")
    assert dropped is not None and (dropped.state, dropped.reason, dropped.event) == (
        "refused", "dropped", None,
    )  # fmt: skip
    assert await ledger.claim(first, retried=True) is False


async def test_seen_records_a_queued_message_in_the_background(store: Store) -> None:
    started: list[Any] = []
    ledger = make_ledger(store)
    ledger.background = started.append  # type: ignore[method-assign]
    ledger.seen(message("$s"))
    assert await state_of(store, "$s") is None  # nothing awaited by the caller
    await asyncio.gather(*started)
    assert await state_of(store, "$s") == "seen"
    assert await ledger.claim(message("$s")) is True  # its turn: still the handler's to run


async def test_a_failed_claim_leaves_no_claim_behind(store: Store) -> None:
    flaky = Flaky(store.db, failures=1, error=ValueError("not an outage"))
    ledger = make_ledger(Store(flaky))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await ledger.claim(message("$e"))
    assert await ledger.claim(message("$e")) is True


async def test_a_claim_waits_out_a_database_outage(store: Store, clock: FakeClock) -> None:
    flaky = Flaky(store.db, failures=2, error=ConnectionRefusedError(111, "refused"))
    ledger = make_ledger(Store(flaky), database_wait_s=60.0)  # type: ignore[arg-type]
    assert await ledger.claim(message("$e")) is True
    assert clock.slept == [0.5, 1.0]
    down = Flaky(store.db, failures=10**6, error=sqlite3.OperationalError("locked"))
    short = make_ledger(Store(down), database_wait_s=30.0)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.OperationalError):
        await short.claim(message("$f"))  # past database_wait_s
    assert 0 < sum(clock.slept[2:]) <= 30
    down.failures = 0  # back: the failed claim left nothing behind
    assert await short.claim(message("$f")) is True


# database outages: the message path's Store methods wait them out


class Flaky:
    """A database that is unreachable for its first ``failures`` calls, then the real one."""

    def __init__(self, db: Database, failures: int, error: BaseException) -> None:
        self.db = db
        self.failures = failures
        self.error = error
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.db, name)
        if name not in ("execute", "executemany", "fetch", "fetchrow", "fetchval", "acquire"):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls <= self.failures:
                raise self.error
            return real(*args, **kwargs)

        return call


class FakeClock:
    """The monotonic clock and sleep of lambda_plugin.db.store: a sleep moves the clock on
    at once, so an outage of minutes is waited out in no time."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    real_time, real_asyncio = store_module.time, store_module.asyncio
    monkeypatch.setattr(store_module, "time", _Both(fake, real_time))
    monkeypatch.setattr(store_module, "asyncio", _Both(fake, real_asyncio))
    return fake


class _Both:
    """``fake``'s monotonic and sleep, the real module's everything else."""

    def __init__(self, fake: FakeClock, real: Any) -> None:
        self.fake = fake
        self.real = real

    def __getattr__(self, name: str) -> Any:
        if name in ("monotonic", "sleep"):
            return getattr(self.fake, name)
        return getattr(self.real, name)


OUTAGES = [
    ConnectionRefusedError(111, "Connection refused"),  # PostgreSQL restarting
    sqlite3.OperationalError("database is locked"),
]
# Each method on a message's way, called as the plugin calls it, and what it gives back.
MESSAGE_PATH: dict[str, tuple[Callable[[Store], Any], Any]] = {
    "history": (lambda s: s.history("pc-1", limit=5, excluding="$m"), "history"),
    "append_history": (lambda s: s.append_history("pc-1", [("user", "q")], "$m"), None),
    "add_usage": (lambda s: s.add_usage(ALICE, ROOM, "2026-05-01", 3, 4), None),
    "usage_since": (lambda s: s.usage_since(ALICE, "2026-05-01"), (10, 20, 1)),
}


async def _seed(store: Store) -> None:
    await store.append_history("pc-1", [("user", "before"), ("assistant", "B")])
    await store.add_usage(ALICE, ROOM, "2026-05-01", 10, 20)


def test_the_outage_errors_are_database_down() -> None:
    assert all(isinstance(error, DATABASE_DOWN) for error in OUTAGES)


@pytest.mark.parametrize("error", OUTAGES, ids=type)
@pytest.mark.parametrize("method", sorted(MESSAGE_PATH))
async def test_a_message_path_method_waits_out_an_outage(
    store: Store, clock: FakeClock, method: str, error: BaseException
) -> None:
    await _seed(store)
    call, expected = MESSAGE_PATH[method]
    flaky = Flaky(store.db, failures=3, error=error)
    result = await call(Store(flaky, outage_s=lambda: 60.0))  # type: ignore[arg-type]
    assert flaky.calls == 4  # failed three times, then got through
    assert clock.slept == [0.5, 1.0, 2.0]  # backing off
    if expected == "history":
        assert [r.content for r in result] == ["before", "B"]
    else:
        assert result == expected
    # Done once: nothing of a failed attempt was written, nothing twice.
    assert [r.content for r in await store.history("pc-1")] == (
        ["before", "B", "q"] if method == "append_history" else ["before", "B"]
    )
    assert await store.usage_since(ALICE, "2026-05-01") == (
        (13, 24, 2) if method == "add_usage" else (10, 20, 1)
    )


@pytest.mark.parametrize("error", OUTAGES, ids=type)
@pytest.mark.parametrize("method", sorted(MESSAGE_PATH))
async def test_an_outage_longer_than_the_wait_is_raised(
    store: Store, clock: FakeClock, method: str, error: BaseException
) -> None:
    await _seed(store)
    call, _ = MESSAGE_PATH[method]
    flaky = Flaky(store.db, failures=10**6, error=error)
    with pytest.raises(type(error)):
        await call(Store(flaky, outage_s=lambda: 5.0))  # type: ignore[arg-type]
    assert clock.slept == [0.5, 1.0, 2.0]  # a fourth wait (4 s) would end past the 5 s
    assert flaky.calls == 4
    assert (await store.counts())["history"] == 2
    assert await store.usage_since(ALICE, "2026-05-01") == (10, 20, 1)


async def test_the_backoff_grows_to_four_seconds(store: Store, clock: FakeClock) -> None:
    flaky = Flaky(store.db, failures=9, error=OUTAGES[0])
    assert await Store(flaky, outage_s=lambda: 600.0).usage_since(ALICE, "2026-05-01") == (0, 0, 0)  # type: ignore[arg-type]
    assert clock.slept == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]  # back within seconds


async def test_the_wait_is_read_when_the_outage_begins(store: Store, clock: FakeClock) -> None:
    wait = [0.0]
    flaky = Flaky(store.db, failures=1, error=OUTAGES[0])
    waiting = Store(flaky, outage_s=lambda: wait[0])  # type: ignore[arg-type]
    with pytest.raises(ConnectionRefusedError):  # no wait: raised at once
        await waiting.add_usage(ALICE, ROOM, "2026-05-01", 1, 1)
    assert clock.slept == []
    wait[0] = 10.0  # a config change takes effect without a new Store
    flaky.calls, flaky.failures = 0, 1
    await waiting.add_usage(ALICE, ROOM, "2026-05-01", 1, 1)
    assert clock.slept == [0.5]
    assert await store.usage_since(ALICE, "2026-05-01") == (1, 1, 1)


async def test_by_default_an_outage_is_not_waited_out(store: Store, clock: FakeClock) -> None:
    flaky = Flaky(store.db, failures=1, error=OUTAGES[1])
    with pytest.raises(sqlite3.OperationalError):
        await Store(flaky).history("pc-1")  # type: ignore[arg-type]
    assert clock.slept == [] and flaky.calls == 1


async def test_other_errors_are_raised_at_once(store: Store, clock: FakeClock) -> None:
    flaky = Flaky(store.db, failures=1, error=ValueError("a bug, not an outage"))
    with pytest.raises(ValueError):
        await Store(flaky, outage_s=lambda: 600.0).add_usage(ALICE, ROOM, "2026-05-01", 1, 1)  # type: ignore[arg-type]
    assert clock.slept == [] and flaky.calls == 1


async def test_an_outage_is_waited_out_in_real_time(store: Store) -> None:
    flaky = Flaky(store.db, failures=1, error=OUTAGES[0])
    started = time.monotonic()
    await Store(flaky, outage_s=lambda: 5.0).append_history("pc-1", [("user", "q")], "$m")  # type: ignore[arg-type]
    assert 0.4 < time.monotonic() - started < 5.0
    assert [r.content for r in await store.history("pc-1")] == ["q"]


# maintenance


async def _fill(store: Store) -> None:
    await store.ensure_user(ALICE)
    await store.ensure_user(BOB)
    await store.upsert_room(room(1))
    await store.upsert_room(room(2))
    await store.upsert_room(room(1, BOB))
    await store.save_snapshot(snapshot("s"))
    await store.append_history("pc-1", [("user", "a"), ("assistant", "b"), ("user", "c")])
    ledger = make_ledger(store)
    assert await ledger.claim(message("$e1"))
    await ledger.end("$e1", Fate.ANSWERED)
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
        "ledger": 1,
        "usage": 1,
    }
    assert all(type(v) is int for v in counts.values())


async def test_clear_all(store: Store) -> None:
    await _fill(store)
    await store.clear_all()
    assert await store.counts() == dict.fromkeys(TABLES, 0)
    assert await store.get_user(ALICE) is None
    assert await state_of(store, "$e1") is None
    assert await make_ledger(store).unfinished() == []
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
