"""A NUL character (JSON allows \\u0000; PostgreSQL text does not) never breaks a turn."""

from __future__ import annotations

from lambda_plugin.db import Store


async def test_a_turn_with_a_nul_character_is_stored(store: Store) -> None:
    await store.append_history("pc", [("user", "a\x00b"), ("assistant", "c\x00")], "$m")
    texts = [row.content for row in await store.history("pc")]
    assert texts == ["a\ufffdb", "c\ufffd"]
