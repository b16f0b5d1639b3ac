"""Usage in the Store: tokens per user, chat room and UTC day, on SQLite and on PostgreSQL
(the ``store`` fixture runs each test on both)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import pytest_asyncio
from mautrix.util.async_db import Database, UpgradeTable

from lambda_plugin.agents import Usage
from lambda_plugin.db import Store, UsageRow, month_start, upgrade_table, utc_day
from lambda_plugin.usage import Quota
from tests.unit.conftest import ENGINES, _drop_database
from tests.unit.test_config import settings as make_settings

ALICE = "@alice:example.org"
BOB = "@bob:example.org"
CAROL = "@carol:example.org"
ROOM = "!one:example.org"
OTHER = "!two:example.org"
LATEST_VERSION = 7  # v7: where each file a user sent landed in the workspace


async def test_add_usage_adds_up_per_user_room_and_day(store: Store) -> None:
    await store.add_usage(ALICE, ROOM, "2026-05-01", 10, 20)
    await store.add_usage(ALICE, ROOM, "2026-05-01", 1, 2)
    await store.add_usage(ALICE, OTHER, "2026-05-01", 100, 200)
    await store.add_usage(ALICE, ROOM, "2026-05-02", 5, 0)
    await store.add_usage(BOB, ROOM, "2026-05-01", 7, 8)
    assert await store.usage_rows("2026-01-01") == [
        UsageRow(ALICE, ROOM, "2026-05-01", 11, 22, 2),
        UsageRow(ALICE, OTHER, "2026-05-01", 100, 200, 1),
        UsageRow(BOB, ROOM, "2026-05-01", 7, 8, 1),
        UsageRow(ALICE, ROOM, "2026-05-02", 5, 0, 1),
    ]


async def test_a_request_without_tokens_still_counts(store: Store) -> None:
    await store.add_usage(ALICE, ROOM, "2026-05-01", 0, 0)
    assert await store.usage_since(ALICE, "2026-05-01") == (0, 0, 1)


async def test_usage_since_counts_from_the_first_day_on(store: Store) -> None:
    assert await store.usage_since(ALICE, "2026-05-01") == (0, 0, 0)
    await store.add_usage(ALICE, ROOM, "2026-04-30", 1000, 1000)  # the month before
    await store.add_usage(ALICE, ROOM, "2026-05-01", 10, 20)
    await store.add_usage(ALICE, OTHER, "2026-05-09", 1, 2)
    await store.add_usage(BOB, ROOM, "2026-05-09", 50, 50)
    assert await store.usage_since(ALICE, "2026-05-01") == (11, 22, 2)
    assert await store.usage_since(ALICE, "2026-05-09") == (1, 2, 1)
    assert await store.usage_since(ALICE, "2026-05-10") == (0, 0, 0)
    assert await store.usage_since(ALICE, "2026-01-01") == (1011, 1022, 3)
    totals = await store.usage_since(ALICE, "2026-05-01")
    assert all(type(n) is int for n in totals)  # not PostgreSQL's Decimal sums


async def test_chat_usage_since_counts_every_user_of_the_room(store: Store) -> None:
    await store.add_usage(ALICE, ROOM, "2026-05-01", 10, 20)
    await store.add_usage(BOB, ROOM, "2026-05-02", 1, 2)
    await store.add_usage(ALICE, OTHER, "2026-05-02", 500, 500)
    await store.add_usage(ALICE, ROOM, "2026-04-01", 500, 500)
    assert await store.chat_usage_since(ROOM, "2026-05-01") == (11, 22, 2)
    assert await store.chat_usage_since(OTHER, "2026-05-01") == (500, 500, 1)
    assert await store.chat_usage_since("!none:example.org", "2026-05-01") == (0, 0, 0)
    assert all(type(n) is int for n in await store.chat_usage_since(ROOM, "2026-05-01"))


async def test_top_users_most_tokens_first(store: Store) -> None:
    await store.add_usage(ALICE, ROOM, "2026-05-01", 10, 10)
    await store.add_usage(ALICE, OTHER, "2026-05-02", 5, 5)
    await store.add_usage(BOB, ROOM, "2026-05-01", 100, 1)
    await store.add_usage(CAROL, ROOM, "2026-05-01", 0, 30)
    await store.add_usage(CAROL, ROOM, "2026-04-01", 999, 999)  # before the first day
    assert await store.top_users("2026-05-01", 10) == [
        (BOB, 100, 1, 1),
        (ALICE, 15, 15, 2),
        (CAROL, 0, 30, 1),  # a tie with Alice: by user id
    ]
    assert await store.top_users("2026-05-01", 1) == [(BOB, 100, 1, 1)]
    assert await store.top_users("2026-06-01", 10) == []
    [(_, *totals)] = await store.top_users("2026-05-01", 1)
    assert all(type(n) is int for n in totals)


async def test_usage_rows_for_an_export(store: Store) -> None:
    assert await store.usage_rows("2026-05-01") == []
    await store.add_usage(BOB, OTHER, "2026-05-03", 3, 4)
    await store.add_usage(ALICE, ROOM, "2026-04-30", 1, 2)
    await store.add_usage(ALICE, ROOM, "2026-05-03", 5, 6)
    rows = await store.usage_rows("2026-05-01")
    assert rows == [
        UsageRow(ALICE, ROOM, "2026-05-03", 5, 6, 1),
        UsageRow(BOB, OTHER, "2026-05-03", 3, 4, 1),
    ]
    assert all(type(getattr(rows[0], f)) is int for f in ("tokens_in", "tokens_out", "requests"))


async def test_concurrent_adds_lose_nothing(store: Store) -> None:
    await asyncio.gather(*(store.add_usage(ALICE, ROOM, "2026-05-01", 1, 2) for _ in range(40)))
    assert await store.usage_since(ALICE, "2026-05-01") == (40, 80, 40)


async def test_large_counts_fit(store: Store) -> None:
    # One answer may report up to 10**12 tokens (agents refuse more): sums of many fit too.
    for _ in range(3):
        await store.add_usage(ALICE, ROOM, "2026-05-01", 10**12, 10**12)
    assert await store.usage_since(ALICE, "2026-05-01") == (3 * 10**12, 3 * 10**12, 3)


async def test_usage_is_kept_per_user_id_exactly(store: Store) -> None:
    await store.add_usage("@Alice:example.org", ROOM, "2026-05-01", 1, 1)
    assert await store.usage_since(ALICE, "2026-05-01") == (0, 0, 0)


# Quota.hold: a running answer's estimate counts against its user's limits until recorded


def quota(store: Store, **overrides: object) -> Quota:
    current = dataclasses.replace(make_settings(), **overrides)
    return Quota(settings=lambda: current, log=logging.getLogger("test.quota"), store=store)


async def test_a_running_answer_holds_its_estimate_against_a_concurrent_check(
    store: Store,
) -> None:
    q = quota(store, daily_tokens=1000, answer_estimate_tokens=600)
    await store.add_usage(ALICE, ROOM, utc_day(), 300, 100)  # 400 spent today
    first_checked, first_done = asyncio.Event(), asyncio.Event()
    said: dict[str, object] = {}

    async def answer(name: str, finish: asyncio.Event | None = None) -> None:
        with q.hold(ALICE, 0) as held:  # an empty message: the estimate only
            said[name] = await q.refusal(ALICE, held)
            if finish is not None:
                first_checked.set()
                await finish.wait()  # the agent is still at work

    first = asyncio.create_task(answer("first", first_done))
    await asyncio.wait_for(first_checked.wait(), 5)
    await answer("second")  # in another room, while the first runs
    assert said["first"] is None  # 400 spent, nothing else running: within the limit
    assert said["second"] is not None and said["second"][0] == "quota.daily"  # 400 + 600
    assert said["second"][1]["limit"] == 1000
    first_done.set()
    await asyncio.wait_for(first, 5)
    await answer("third")  # the first's hold is gone (its answer cut: nothing recorded)
    assert said["third"] is None
    assert q._held == {}


async def test_concurrent_answers_pass_as_many_as_one_after_another_would(store: Store) -> None:
    # Each checks as it starts, the earlier ones still running: the check sees their
    # estimates as if they were spent (not its own: a user within a limit may ask).
    q = quota(store, daily_tokens=1000, answer_estimate_tokens=600)
    with q.hold(ALICE, 0) as one:
        assert await q.refusal(ALICE, one) is None
        with q.hold(ALICE, 0) as two:
            assert await q.refusal(ALICE, two) is None  # 600 < 1000, as after one answer
            with q.hold(ALICE, 0) as three:
                refused = await q.refusal(ALICE, three)  # 1200: over, as after two answers
                assert refused is not None and refused[0] == "quota.daily"
                with q.hold(BOB, 0) as bobs:  # another user's holds count for them only
                    assert await q.refusal(BOB, bobs) is None


async def test_the_hold_counts_the_message_too_and_ends_with_its_block(store: Store) -> None:
    q = quota(store, daily_tokens=0, monthly_tokens=1000, answer_estimate_tokens=0)
    with q.hold(ALICE, 3999) as long:  # about 4 characters a token: 1000
        assert long.tokens == 1000
        with q.hold(ALICE, 1) as short:
            assert short.tokens == 1
            refused = await q.refusal(ALICE, short)
            assert refused is not None and refused[0] == "quota.monthly"
            assert await q.refusal(ALICE, long) is None
    with pytest.raises(RuntimeError), q.hold(ALICE, 3999):
        raise RuntimeError("the agent failed")
    with q.hold(ALICE, 1) as short:
        assert await q.refusal(ALICE, short) is None  # released however the block ended
    assert q._held == {}
    # What the answer cost, once recorded, counts instead.
    await q.record(ALICE, ROOM, Usage(600, 400))
    with q.hold(ALICE, 0) as held:
        assert held.tokens == 0
        refused = await q.refusal(ALICE, held)
        assert refused is not None and refused[1]["limit"] == 1000


async def test_no_limit_ignores_the_holds(store: Store) -> None:
    q = quota(store, answer_estimate_tokens=10**6)  # base-config: no limits
    with q.hold(ALICE, 10**6) as one, q.hold(ALICE, 10**6) as two:
        assert await q.refusal(ALICE, one) is None and await q.refusal(ALICE, two) is None


# the days usage is counted by


def test_utc_day() -> None:
    # 23:30 on 31 May in UTC is already 1 June east of it: the UTC date counts.
    late = datetime(2026, 5, 31, 23, 30, tzinfo=timezone.utc).timestamp()
    assert utc_day(late) == "2026-05-31"
    assert utc_day(late + 3600) == "2026-06-01"
    assert utc_day() == datetime.now(timezone.utc).date().isoformat()


def test_month_start() -> None:
    assert month_start("2026-05-31") == "2026-05-01"
    assert month_start("2026-01-01") == "2026-01-01"
    assert month_start("2024-02-29") == "2024-02-01"


# the schema step


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


async def test_a_database_of_version_2_gains_the_usage_table(empty_url: str) -> None:
    # A database made by the steps up to version 2 only, then started with them all.
    shipped = UpgradeTable()
    shipped.upgrades = upgrade_table.upgrades[:2]
    old = Database.create(empty_url, upgrade_table=shipped, log=logging.getLogger("db.old"))
    await old.start()
    await Store(old).ensure_user(ALICE)
    assert not await old.table_exists("usage")
    await old.stop()
    new = Database.create(empty_url, upgrade_table=upgrade_table, log=logging.getLogger("db"))
    await new.start()
    try:
        assert await new.fetchval("SELECT version FROM version") == LATEST_VERSION
        assert await new.table_exists("usage") and await new.table_exists("ledger")
        upgraded = Store(new)
        assert await upgraded.get_user(ALICE) is not None
        await upgraded.add_usage(ALICE, ROOM, "2026-05-01", 1, 2)
        assert await upgraded.usage_since(ALICE, "2026-05-01") == (1, 2, 1)
    finally:
        await new.stop()
