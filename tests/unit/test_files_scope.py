"""An agent's files are sent only from the requesting user's own folder of the workspace."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambda_plugin.files import (
    FileRefused,
    inbox_dir,
    resolve_outgoing,
    save_incoming,
    send_outgoing,
    user_dir,
)
from lambda_plugin.matrix import Matrix
from tests.unit.fake_media import (
    HOME,
    MAX,
    NOW,
    ROOM,
    USER,
    FakeMedia,
    event,
    hs_fixture,  # noqa: F401  (the fixture hs)
    make_home,
    mx_fixture,  # noqa: F401  (the fixture mx)
    root_fixture,  # noqa: F401  (the fixture root)
)

BOB = "@bob:example.org"


async def bobs_file(hs: FakeMedia, mx: Matrix, root: Path) -> str:
    """A file Bob sent, saved in his inbox the usual way; its path relative to the root."""
    hs.media["bob"] = b"bob's secret"
    att = await save_incoming(mx, str(root), BOB, ROOM, event("bob", "secret.txt"), MAX, NOW)
    assert att.workspace_path is not None
    hs.requests.clear()
    return att.workspace_path


async def refused(mx: Matrix, root: Path, rel: str) -> FileRefused:
    with pytest.raises(FileRefused) as by_check:
        resolve_outgoing(str(root), rel, MAX, USER)
    with pytest.raises(FileRefused) as by_send:
        await send_outgoing(mx, ROOM, str(root), rel, MAX, USER)
    assert by_check.value.key == by_send.value.key
    return by_send.value


async def test_another_users_inbox_file_is_refused(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    rel = await bobs_file(hs, mx, root)
    assert rel.startswith(f"{user_dir(BOB)}/")  # its name is easy to compute
    error = await refused(mx, root, rel)
    assert error.key == "file.outside"
    assert error.values == {"path": rel}
    assert hs.requests == []  # nothing uploaded, nothing sent
    # ... while Bob's own agent may send it
    assert await send_outgoing(mx, ROOM, str(root), rel, MAX, BOB) == "$sent1"


async def test_the_users_own_file_is_sent(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    hs.media["m1"] = b"mine"
    att = await save_incoming(mx, str(root), USER, ROOM, event("m1", "mine.txt"), MAX, NOW)
    assert att.workspace_path is not None
    assert await send_outgoing(mx, ROOM, str(root), att.workspace_path, MAX, USER) == "$sent1"
    assert hs.uploads[0][0] == b"mine"
    (make_home(root) / "out").mkdir()  # a file the agent made, anywhere in the user's folder
    (root / HOME / "out" / "chart.txt").write_text("made by the agent")
    made = resolve_outgoing(str(root), f"{HOME}/out/chart.txt", MAX, USER)
    assert made.read_text() == "made by the agent"


async def test_no_way_round_into_another_users_folder(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    rel = await bobs_file(hs, mx, root)
    home = make_home(root)
    (home / "link").symlink_to(root / rel)  # a link in the user's folder to Bob's file
    (home / "bobs").symlink_to(root / user_dir(BOB), target_is_directory=True)
    inside_bobs = rel[len(str(user_dir(BOB))) + 1 :]
    (root / "top.txt").write_text("in the root, outside every user's folder")
    cases = {
        f"{HOME}/link": "file.outside",
        f"{HOME}/bobs/{inside_bobs}": "file.outside",
        "top.txt": "file.outside",
        f"{HOME}/../{user_dir(BOB).name}/{inside_bobs}": "file.outside_workspace",  # ..
        str(root / rel): "file.outside_workspace",  # absolute
    }
    for path, key in cases.items():
        assert (await refused(mx, root, path)).key == key, path
    assert hs.requests == []


async def test_a_user_folder_that_is_a_link_to_another_is_refused(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    rel = await bobs_file(hs, mx, root)
    (root / HOME).symlink_to(root / user_dir(BOB), target_is_directory=True)
    inside_bobs = rel[len(str(user_dir(BOB))) + 1 :]
    assert (await refused(mx, root, f"{HOME}/{inside_bobs}")).key == "file.outside"
    assert str(inbox_dir(USER, ROOM)).startswith(HOME)
    assert hs.requests == []
