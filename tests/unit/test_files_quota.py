"""The per-user workspace quota on incoming files: the user's folder (all their rooms) and
the new file must fit, checked before the download and while it runs, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambda_plugin.files import FileRefused, disk, inbox_dir, save_incoming, user_dir
from lambda_plugin.matrix import Matrix
from tests.unit.fake_media import (
    MAX,
    NOW,
    ROOM,
    USER,
    FakeMedia,
    event,
    hs_fixture,  # noqa: F401  (the fixture hs)
    make_home,
    mx_fixture,  # noqa: F401  (the fixture mx)
    only_files,
    root_fixture,  # noqa: F401  (the fixture root)
)

KB = 1024
QUOTA = 100 * KB  # shown as 0.0976562 MB
OTHER_ROOM = "!other:example.org"


def fill(root: Path, used: int) -> list[str]:
    """The user already has ``used`` bytes, in another room's inbox; the files, as listed."""
    inbox = root / inbox_dir(USER, OTHER_ROOM)
    inbox.mkdir(parents=True)
    (inbox / "old.bin").write_bytes(b"o" * used)
    return only_files(root)


async def save(mx: Matrix, root: Path, media_id: str, size: int | None = None) -> str:
    att = await save_incoming(
        mx, str(root), USER, ROOM, event(media_id, "new.bin", size), MAX, NOW, quota_bytes=QUOTA
    )
    assert att.workspace_path is not None
    return att.workspace_path


async def refused(mx: Matrix, root: Path, media_id: str, size: int | None = None) -> FileRefused:
    with pytest.raises(FileRefused) as error:
        await save(mx, root, media_id, size)
    assert error.value.key == "file.quota"
    assert error.value.values == {"name": "new.bin", "max_mb": "0.0976562"}
    return error.value


async def test_a_declared_size_past_the_quota_is_refused_before_download(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    before = fill(root, 60 * KB)
    hs.media["m1"] = b"n" * (50 * KB)
    await refused(mx, root, "m1", 50 * KB)
    assert hs.requests == []
    assert only_files(root) == before


async def test_an_undeclared_size_is_refused_by_content_length_or_while_streaming(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    before = fill(root, 60 * KB)
    hs.media["m1"] = b"n" * (50 * KB)
    await refused(mx, root, "m1")  # Content-Length
    hs.no_length.add("m1")
    await refused(mx, root, "m1")  # chunked: stopped once past the quota
    assert only_files(root) == before  # no partial file, no temp file


async def test_what_fits_is_saved_to_the_last_byte(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    fill(root, 60 * KB)
    hs.media["m1"] = b"n" * (40 * KB)
    hs.no_length.add("m1")
    rel = await save(mx, root, "m1")
    assert (root / rel).stat().st_size == 40 * KB
    hs.media["m2"] = b"1"
    await refused(mx, root, "m2", 1)  # now full


async def test_a_folder_already_over_the_quota_takes_not_even_an_empty_file(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    fill(root, QUOTA + 1)
    hs.media["m1"] = b""
    await refused(mx, root, "m1")
    assert hs.requests == []


async def test_only_the_users_own_regular_files_count(
    hs: FakeMedia, mx: Matrix, root: Path, tmp_path: Path
) -> None:
    bob = root / user_dir("@bob:example.org")
    bob.mkdir(parents=True)
    (bob / "big.bin").write_bytes(b"b" * QUOTA)  # another user's files
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * QUOTA)
    home = make_home(root)
    (home / "link.bin").symlink_to(outside)  # links are not followed
    (home / "deep" / "er").mkdir(parents=True)
    (home / "deep" / "er" / "a.bin").write_bytes(b"a" * (30 * KB))  # folders are walked
    hs.media["m1"] = b"n" * (60 * KB)
    await save(mx, root, "m1", 60 * KB)
    hs.media["m2"] = b"n" * (20 * KB)
    await refused(mx, root, "m2", 20 * KB)  # 30 + 60 + 20 > 100


async def test_no_quota_is_no_limit(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    fill(root, 10 * QUOTA)
    hs.media["m1"] = b"n"
    att = await save_incoming(mx, str(root), USER, ROOM, event("m1", "a.txt", 1), MAX, NOW)
    assert att.size == 1


async def test_the_walk_is_capped(
    hs: FakeMedia, mx: Matrix, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disk, "MAX_WALK_ENTRIES", 50)
    home = make_home(root)
    for i in range(51):
        (home / f"f{i}").touch()
    hs.media["m1"] = b"n"
    error = await refused(mx, root, "m1", 1)  # too many entries to measure: taken as full
    assert "more than 50 entries" in str(error)
    assert hs.requests == []
    (home / "f0").unlink()
    await save(mx, root, "m1", 1)  # 50 entries are measured
    monkeypatch.setattr(disk, "MAX_WALK_ENTRIES", 1000)
    monkeypatch.setattr(disk, "MAX_WALK_DEPTH", 3)
    (home / "a" / "b" / "c" / "d").mkdir(parents=True)
    assert "deep" in str(await refused(mx, root, "m1", 1))
