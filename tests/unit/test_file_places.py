"""Where a user's file landed in the workspace, kept for a reply to its message: the table
(both engines), the file stage that records it, the quote that names it, the pruning."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lambda_plugin.answering import Answerer
from lambda_plugin.attachments import FileService
from lambda_plugin.db import ChatRoomRow, FilePlaceRow, Store, now_ms
from lambda_plugin.db.places import FilePlaceTable
from lambda_plugin.intake import Incoming, classify
from lambda_plugin.matrix import Matrix
from lambda_plugin.notices import Notices
from lambda_plugin.quotes import file_quote, quoted_text
from lambda_plugin.startup import Startup
from tests.unit.fake_media import (
    ROOM,
    USER,
    FakeMedia,
    event,
    hs_fixture,  # noqa: F401  (the fixture hs)
    mx_fixture,  # noqa: F401  (the fixture mx)
    root_fixture,  # noqa: F401  (the fixture root)
)
from tests.unit.test_config import settings as make_settings
from tests.unit.test_quotes import REPLY, Events, message

BOT = "@lambda:example.org"
OTHER = "!other:example.org"
PATH = "surfaces/matrix/alice/chat/inbox/20231114T221320Z-notes.txt"
LOG = logging.getLogger("test.file_places")


class Places:
    """A FilePlaceTable's reads and writes in memory, or failing as a database that is down."""

    def __init__(self, rows: dict[tuple[str, str], str] | None = None, down: bool = False) -> None:
        self.rows = dict(rows or {})
        self.down = down
        self.asked: list[tuple[str, str]] = []

    async def put(self, room_id: str, event_id: str, path: str) -> None:
        if self.down:
            raise ConnectionRefusedError("database down")
        self.rows[room_id, event_id] = path

    async def get(self, room_id: str, event_id: str) -> FilePlaceRow | None:
        self.asked.append((room_id, event_id))
        if self.down:
            raise ConnectionRefusedError("database down")
        path = self.rows.get((room_id, event_id))
        return None if path is None else FilePlaceRow(room_id, event_id, path, 0)

    async def prune(self, older_than_ms: int) -> None:
        if self.down:
            raise ConnectionRefusedError("database down")
        self.rows.clear()


# the table, on SQLite and PostgreSQL


async def test_a_place_is_found_by_its_room_and_event_only(store: Store) -> None:
    table = FilePlaceTable(store.db)
    before = now_ms()
    await table.put(ROOM, "$file", PATH)
    row = await table.get(ROOM, "$file")
    assert row is not None and (row.room_id, row.event_id, row.path) == (ROOM, "$file", PATH)
    assert before <= row.ts <= now_ms()
    # The same event id named from another room finds nothing, and can't move this one.
    assert await table.get(OTHER, "$file") is None
    await table.put(OTHER, "$file", "elsewhere.txt")
    assert (await table.get(ROOM, "$file")).path == PATH  # type: ignore[union-attr]
    assert await table.get(ROOM, "$nothing") is None


async def test_a_file_written_again_moves_its_place(store: Store) -> None:
    table = FilePlaceTable(store.db)
    await table.put(ROOM, "$file", PATH)
    await table.put(ROOM, "$file", PATH + "-again")
    assert (await table.get(ROOM, "$file")).path == PATH + "-again"  # type: ignore[union-attr]
    count = await store.db.fetchval("SELECT COUNT(*) FROM file_place")
    assert int(count) == 1


async def test_places_are_pruned_by_age_and_cleared_by_a_reset(store: Store) -> None:
    table = FilePlaceTable(store.db)
    for event_id, ts in (("$old", 100), ("$edge", 200), ("$new", 300)):
        await store.db.execute(
            "INSERT INTO file_place (room_id, event_id, path, ts) VALUES ($1, $2, $3, $4)",
            ROOM, event_id, f"{event_id[1:]}.txt", ts,
        )  # fmt: skip
    await table.prune(200)
    assert [await table.get(ROOM, e) is not None for e in ("$old", "$edge", "$new")] == [
        False, True, True,
    ]  # fmt: skip  # strictly older ones only
    await table.put(ROOM, "$kept", PATH)
    await store.clear_all()  # the dev reset: the store's tables emptied, this one too
    assert await store.db.fetchval("SELECT COUNT(*) FROM file_place") == 0


# the file stage records where a file landed


def file_message(event_id: str = "$file", **content: Any) -> Incoming:
    raw = {
        "type": "m.room.message", "room_id": ROOM, "sender": USER, "event_id": event_id,
        "origin_server_ts": 1, "content": {**event("m1", "notes.txt"), **content},
    }  # fmt: skip
    return classify(raw, BOT)


def service(mx: Matrix, root: Path | None, places: Places | None) -> FileService:
    settings = make_settings(files__workspace_root=str(root) if root else None)
    return FileService(
        mx=mx, notices=Notices(mx, lambda: settings), settings=lambda: settings,
        log=LOG, places=places,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_a_file_in_the_workspace_is_recorded_where_it_landed(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.media["m1"] = b"hello"
    places = Places()
    attachment = await service(mx, root, places).take(ROOM, file_message(), None)
    assert attachment is not None and attachment.workspace_path
    assert places.rows == {(ROOM, "$file"): attachment.workspace_path}
    assert (root / attachment.workspace_path).read_bytes() == b"hello"


async def test_a_file_answered_again_is_recorded_for_its_message(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    # A 🔁 of a file message runs as the reaction's event, in the file message's turn.
    hs.media["m1"] = b"hello"
    places = Places()
    again = replace(file_message("$reaction"), replaces="$file")
    attachment = await service(mx, root, places).take(ROOM, again, None)
    assert attachment is not None
    assert places.rows == {(ROOM, "$file"): attachment.workspace_path}


@pytest.mark.parametrize("places", [Places(down=True), None], ids=["database-down", "no-table"])
async def test_a_place_not_recorded_never_costs_the_file(
    hs: FakeMedia, mx: Matrix, root: Path, places: Places | None, caplog: pytest.LogCaptureFixture
) -> None:
    hs.media["m1"] = b"hello"
    attachment = await service(mx, root, places).take(ROOM, file_message(), None)
    assert attachment is not None and (root / str(attachment.workspace_path)).is_file()
    warned = [r for r in caplog.records if "landed failed" in r.getMessage()]
    assert len(warned) == (1 if places is not None else 0)
    assert all(r.levelno == logging.WARNING for r in warned)


async def test_a_file_taken_inline_has_no_place(hs: FakeMedia, mx: Matrix) -> None:
    hs.media["m1"] = b"hello"
    places = Places()
    agent = SimpleNamespace(backend="openai")
    attachment = await service(mx, None, places).take(ROOM, file_message(), agent)  # type: ignore[arg-type]
    assert attachment is not None and attachment.data == b"hello"
    assert places.rows == {}


# the quote of a reply to a file


def image(sender: str = USER, body: str = "photo.png", **content: Any) -> dict[str, Any]:
    return {**message(body, "m.image", **content), "sender": sender}


@pytest.mark.parametrize(
    ("replied", "rows", "room", "quote"),
    [
        (image(), {(ROOM, "$earlier"): PATH}, ROOM, f"[file: photo.png, in the workspace at {PATH}]"),
        (image(), {}, ROOM, "[file: photo.png]"),  # no workspace then, or pruned since
        # Another member's file in a room both are in: they see it, and where it is.
        (image("@bob:example.org"), {(ROOM, "$earlier"): PATH}, ROOM,
         f"[file: photo.png, in the workspace at {PATH}]"),
        # An event id named from another room: that room's record only, never this one's.
        (image(), {(ROOM, "$earlier"): PATH}, OTHER, "[file: photo.png]"),
        # A caption names the file; the record gives where it is.
        (image(body="look at this", filename="photo.png"), {(ROOM, "$earlier"): PATH}, ROOM,
         f"[file: look at this, in the workspace at {PATH}]"),
        # Text replied to is quoted as ever, whatever is recorded under its id.
        (message("plain words"), {(ROOM, "$earlier"): PATH}, ROOM, "plain words"),
    ],
    ids=["recorded", "not-recorded", "another-member", "other-room", "caption", "text"],
)  # fmt: skip
async def test_a_reply_to_a_file_names_its_place_when_recorded(
    replied: dict[str, Any], rows: dict[tuple[str, str], str], room: str, quote: str
) -> None:
    places = Places(rows)
    got = await quoted_text(Events(replied), room, "$earlier", 2000, LOG, places)  # type: ignore[arg-type]
    assert got == quote
    assert places.asked == ([(room, "$earlier")] if "[file" in quote else [])


async def test_a_place_not_readable_leaves_the_file_named(caplog: pytest.LogCaptureFixture) -> None:
    places = Places({(ROOM, "$earlier"): PATH}, down=True)
    got = await quoted_text(Events(image()), ROOM, "$earlier", 2000, LOG, places)  # type: ignore[arg-type]
    assert got == "[file: photo.png]"
    assert any("landed failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("most", [1, 40, 2000])
def test_a_long_name_is_cut_never_the_path(most: int) -> None:
    quote = file_quote("n" * 3000, PATH, most)
    assert quote.startswith("[file: ") and quote.endswith(f"…, in the workspace at {PATH}]")
    assert len(quote) <= max(most, len(file_quote("n", PATH, 1)))
    assert file_quote("short.txt", PATH, 2000) == f"[file: short.txt, in the workspace at {PATH}]"


@pytest.mark.parametrize(("workspace", "named"), [("/srv/workspace", True), (None, False)])
async def test_the_agent_gets_the_path_only_while_a_workspace_is_set(
    workspace: str | None, named: bool
) -> None:
    places = Places({(ROOM, "$earlier"): PATH})
    settings = SimpleNamespace(
        max_quote_chars=2000, transcription_for=lambda agent: None, workspace_root=workspace
    )
    answerer = Answerer(
        settings=lambda: settings, log=LOG, mx=Events(image()), registry=None, agents=None,
        files=None, notices=None, voice=None, quota=None, ledger=None, places=places,
    )  # type: ignore[arg-type]  # fmt: skip
    row = ChatRoomRow(ROOM, USER, "C1", "Chat 1", "echo", "p1", False, False, 0)
    reply = message("> <@ann:example.org> photo.png\n\nwhat is in it?", **{"m.relates_to": REPLY})
    reply.update(event_id="$reply", room_id=ROOM)
    request = await answerer._request(row, None, classify(reply, BOT))  # type: ignore[arg-type]
    assert request is not None
    where = f", in the workspace at {PATH}" if named else ""
    assert request.text == f"> [file: photo.png{where}]\n\nwhat is in it?"


# pruned with the ledger


@pytest.mark.parametrize("ledger_down", [False, True])
async def test_places_are_pruned_with_the_ledger(ledger_down: bool) -> None:
    pruned: list[int] = []

    async def prune_ledger(older_than_ms: int) -> None:
        if ledger_down:
            raise ConnectionRefusedError("database down")
        pruned.append(older_than_ms)

    places = Places({(ROOM, "$file"): PATH})
    startup = SimpleNamespace(
        settings=lambda: SimpleNamespace(handled_kept_s=7 * 86400), log=LOG, places=places,
        ledger=SimpleNamespace(prune=prune_ledger),
    )  # fmt: skip
    await Startup.prune_handled(startup)  # type: ignore[arg-type]
    assert places.rows == {}  # pruned, whether or not the ledger's prune failed
    assert len(pruned) == (0 if ledger_down else 1)
