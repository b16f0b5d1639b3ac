"""Fixtures for the unit tests: the plugin's Store on a fresh SQLite or PostgreSQL database."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from mautrix.util.async_db import Database

from lambda_plugin.db import Store, upgrade_table

ENGINES = ["sqlite", "postgres"]


async def _drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


@pytest_asyncio.fixture(params=ENGINES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A Store on a database of its own, with the plugin's upgrade table applied."""
    pg = None
    if request.param == "sqlite":
        url = f"sqlite:{tmp_path / 'lambda.db'}"
    else:
        # The session-wide throwaway PostgreSQL of tests/conftest.py, started on first use.
        pg = request.getfixturevalue("postgres")
        name = f"lambda_unit_{uuid.uuid4().hex[:16]}"
        url = pg.create_database(name)
    db = Database.create(url, upgrade_table=upgrade_table, log=logging.getLogger("lambda.db"))
    await db.start()
    try:
        yield Store(db)
    finally:
        await db.stop()
        if pg is not None:
            await _drop_database(pg.url("postgres"), name)
