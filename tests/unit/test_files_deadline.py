"""Downloads have an overall deadline, and a cancelled download leaves nothing behind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from lambda_plugin.files import FileRefused, fetch_inline, inbox_dir, save_incoming
from lambda_plugin.matrix import Matrix
from tests.unit.fake_media import (
    MAX,
    NOW,
    ROOM,
    USER,
    FakeMedia,
    event,
    hs_fixture,  # noqa: F401  (the fixture hs)
    mx_fixture,  # noqa: F401  (the fixture mx)
    only_files,
    root_fixture,  # noqa: F401  (the fixture root)
)

SLOW = b"s" * 20_000  # 200 pieces of 100 bytes, 50 ms apart: 10 s in all


async def test_a_trickling_download_is_abandoned_at_the_deadline(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.media["slow"] = SLOW
    hs.trickle["slow"] = 0.05
    started = time.monotonic()
    with pytest.raises(FileRefused) as refused:
        await save_incoming(
            mx, str(root), USER, ROOM, event("slow", "slow.bin"), MAX, NOW, deadline_s=0.5
        )
    assert time.monotonic() - started < 3  # not the 10 s the server would take
    assert refused.value.key == "file.timeout"
    assert refused.value.values == {"name": "slow.bin", "seconds": "0.5"}
    assert only_files(root) == []  # neither the file nor its temp file
    await asyncio.wait_for(hs.stream_done.wait(), 10)
    assert hs.client_went_away  # the plugin hung up


async def test_inline_downloads_have_the_deadline_too(hs: FakeMedia, mx: Matrix) -> None:
    hs.media["slow"] = SLOW
    hs.trickle["slow"] = 0.05
    with pytest.raises(FileRefused) as refused:
        await fetch_inline(mx, event("slow", "slow.bin"), MAX, deadline_s=0.3)
    assert refused.value.key == "file.timeout"


async def test_a_download_within_its_deadline_is_saved(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.media["quick"] = b"q" * 1000
    hs.trickle["quick"] = 0.01
    att = await save_incoming(
        mx, str(root), USER, ROOM, event("quick", "q.bin"), MAX, NOW, deadline_s=10
    )
    assert att.size == 1000
    inline = await fetch_inline(mx, event("quick", "q.bin"), MAX, deadline_s=10)
    assert inline.data == b"q" * 1000


async def test_cancelling_a_download_leaves_nothing_and_propagates(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.media["slow"] = SLOW
    hs.trickle["slow"] = 0.05
    inbox = root / inbox_dir(USER, ROOM)
    for deadline_s in (None, 30.0):  # as !cancel stops it, with and without a deadline
        hs.trickled = 0
        task = asyncio.create_task(
            save_incoming(
                mx, str(root), USER, ROOM, event("slow", "a.bin"), MAX, NOW, deadline_s=deadline_s
            )
        )
        for _ in range(500):  # until the download is under way, into its temporary file
            await asyncio.sleep(0.01)
            if hs.trickled >= 1000 and inbox.exists() and list(inbox.glob(".incoming-*.part")):
                break
        else:
            pytest.fail("the download never got going")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert only_files(root) == []
