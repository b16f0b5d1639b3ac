"""The files of one answer are bounded (files.max_files_per_answer): at most that many are
tried, each refusal among them said; the rest are named in one notice, never one each."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from lambda_plugin.attachments import FileService
from lambda_plugin.config import Settings
from lambda_plugin.matrix import Matrix
from lambda_plugin.notices import Notices
from lambda_plugin.texts import TEXTS
from tests.unit.fake_media import (
    HOME,
    ROOM,
    USER,
    FakeMedia,
    hs_fixture,  # noqa: F401  (the fixture hs)
    make_home,
    mx_fixture,  # noqa: F401  (the fixture mx)
    root_fixture,  # noqa: F401  (the fixture root)
)
from tests.unit.test_config import settings as make_settings

BOGUS = 10_000


def service(mx: Matrix, settings: Settings) -> FileService:
    return FileService(
        mx=mx, notices=Notices(mx, lambda: settings), settings=lambda: settings,
        log=logging.getLogger("test.files.bound"),
    )  # fmt: skip


def notices(hs: FakeMedia) -> list[str]:
    return [c["body"] for _, c in hs.sent if c.get("msgtype") == "m.notice"]


def not_sent(count: int, most: int) -> str:
    return TEXTS["en"]["file.not_sent"].format(count=count, max=most)


@pytest.mark.parametrize("workspace", [True, False], ids=["workspace", "no-workspace"])
async def test_ten_thousand_bogus_paths_cost_a_bounded_number_of_notices(
    hs: FakeMedia, mx: Matrix, root: Path, workspace: bool
) -> None:
    settings = make_settings(files__workspace_root=str(root) if workspace else None)
    most = settings.max_files_per_answer
    paths = tuple(f"{HOME}/nothing-{i}.txt" for i in range(BOGUS))
    sent = await service(mx, settings).send(ROOM, USER, paths)
    assert sent == 0
    said = notices(hs)
    assert len(said) == most + 1  # one per path tried, then one for all the rest
    assert said[-1] == not_sent(BOGUS - most, most)
    assert hs.uploads == []


async def test_files_past_the_bound_are_named_in_one_notice(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    home = make_home(root)
    for i in range(5):
        (home / f"f{i}.txt").write_text(f"file {i}")
    settings = make_settings(files__workspace_root=str(root), files__max_files_per_answer=3)
    paths = tuple(f"{HOME}/f{i}.txt" for i in range(5))
    sent = await service(mx, settings).send(ROOM, USER, paths)
    assert sent == 3
    assert [name for _, _, name in hs.uploads] == ["f0.txt", "f1.txt", "f2.txt"]
    assert notices(hs) == [not_sent(2, 3)]


async def test_within_the_bound_every_file_goes_and_nothing_more_is_said(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    home = make_home(root)
    (home / "a.txt").write_text("a")
    settings = make_settings(files__workspace_root=str(root), files__max_files_per_answer=2)
    paths = (f"{HOME}/a.txt", f"{HOME}/missing.txt")
    assert await service(mx, settings).send(ROOM, USER, paths) == 1
    said = notices(hs)
    assert len(said) == 1 and "missing.txt" in said[0]  # the refusal, said; no "more"


@pytest.mark.parametrize("language", ["en", "ru"])
def test_the_notice_exists_in_both_languages(language: str) -> None:
    values: dict[str, Any] = {"count": 9990, "max": 10}
    assert "9990" in TEXTS[language]["file.not_sent"].format(**values)
