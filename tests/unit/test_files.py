"""Files both ways: lambda_plugin.files against the fake media server of ``fake_media``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from lambda_plugin import files
from lambda_plugin.files import (
    FileRefused,
    caption,
    fetch_inline,
    image_size,
    inbox_dir,
    msgtype_for,
    resolve_outgoing,
    safe_name,
    safe_segment,
    save_incoming,
    send_outgoing,
)
from lambda_plugin.matrix import Matrix
from lambda_plugin.texts import TEXTS
from tests.unit.fake_media import (
    HOME,
    MAX,
    NOW,
    ROOM,
    STAMP,
    TOKEN,
    USER,
    FakeMedia,
    event,
    everything,
    hs_fixture,  # noqa: F401  (the fixture hs)
    make_home,
    mx_fixture,  # noqa: F401  (the fixture mx)
    only_files,
    root_fixture,  # noqa: F401  (the fixture root)
)

# names


@pytest.mark.parametrize(
    "raw",
    [
        "../../x",
        "/etc/passwd",
        "a/b",
        "a\\..\\..\\b",
        "..",
        "...",
        ".hidden",
        "evil\x00na\x1bme\r\n.txt",
        "\u202etxt.exe",
        "n" * 500,
        "я" * 300 + ".pdf",
        "",
        "   ",
        "CON.txt",
        'a<b>c:d"e|f?g*h',
    ],
)
def test_safe_name_is_one_harmless_component(raw: str) -> None:
    name = safe_name(raw)
    assert name
    assert "/" not in name and "\\" not in name
    assert name not in (".", "..") and not name.startswith(".")
    assert len(name.encode("utf-8")) <= 120
    assert all(ch.isprintable() for ch in name)
    assert "\u202e" not in name
    assert not set('<>:"|?*') & set(name)


def test_safe_name_keeps_ordinary_names_and_extensions() -> None:
    assert safe_name("report 2024.pdf") == "report 2024.pdf"
    assert safe_name("Отчёт.docx") == "Отчёт.docx"
    assert safe_name("e\u0301.txt") == "\u00e9.txt"  # NFC
    assert safe_name("../../x") == "x"
    assert safe_name("/etc/passwd") == "passwd"
    assert safe_name("a/b") == "b"
    assert safe_name("") == "file"
    assert safe_name("..") == "file"
    assert safe_name("tab\there.txt") == "tabhere.txt"
    long = safe_name("я" * 300 + ".pdf")
    assert long.endswith(".pdf") and len(long.encode()) <= 120
    assert safe_name("CON.txt") == "_CON.txt"


def test_ids_that_sanitise_alike_get_different_folders() -> None:
    a, b = safe_segment("@al/ice:example.org"), safe_segment("@al=ice:example.org")
    assert a != b
    assert a.startswith("al_ice_example.org-") and b.startswith("al_ice_example.org-")
    assert safe_segment(USER) == safe_segment(USER)
    for hostile in ("@..:x", "!../..:x", "@/:x", "@:", "", "@" + "a" * 300 + ":x"):
        segment = safe_segment(hostile)
        assert "/" not in segment and not segment.startswith(".") and len(segment) <= 80


# incoming


async def test_saves_the_same_bytes_at_the_expected_relative_path(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    data = os.urandom(5000)
    hs.media["m1"] = data
    att = await save_incoming(mx, str(root), USER, ROOM, event("m1", "notes.txt", 5000), MAX, NOW)
    expected = f"{inbox_dir(USER, ROOM)}/{STAMP}-notes.txt"
    assert att.workspace_path == expected
    assert expected.startswith("surfaces/matrix/alice_example.org-")
    assert (root / expected).read_bytes() == data
    assert (att.name, att.mime_type, att.size, att.data) == ("notes.txt", "text/plain", 5000, None)
    assert only_files(root) == [expected]  # no temp file left
    # the authenticated endpoint, with the bot's token
    assert hs.requests == [
        ("GET", "/_matrix/client/v1/media/download/example.org/m1", f"Bearer {TOKEN}")
    ]


async def test_image_with_filename_and_caption(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    hs.media["img"] = b"\x89PNG fake"
    content = {
        "msgtype": "m.image",
        "body": "look at this",
        "filename": "cat.png",
        "url": "mxc://example.org/img",
        "info": {"mimetype": "image/png", "size": 10},
    }
    att = await save_incoming(mx, str(root), USER, ROOM, content, MAX, NOW)
    assert att.workspace_path.endswith(f"/inbox/{STAMP}-cat.png")
    assert att.mime_type == "image/png"
    assert caption(content) == "look at this"
    assert caption(event("m1", "notes.txt")) == ""


async def test_missing_mimetype_is_guessed_from_the_name(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.media["m1"] = b"%PDF-1.4"
    content = {"msgtype": "m.file", "body": "a.pdf", "url": "mxc://example.org/m1"}
    att = await save_incoming(mx, str(root), USER, ROOM, content, MAX, NOW)
    assert att.mime_type == "application/pdf"


@pytest.mark.parametrize(
    "raw",
    ["../../x", "/etc/passwd", "a/b", "ctl\x00\x07\x1b[31m\n.txt", "n" * 500, "", ".."],
)
async def test_hostile_names_end_inside_the_workspace(
    hs: FakeMedia, mx: Matrix, root: Path, raw: str
) -> None:
    hs.media["m1"] = b"payload"
    att = await save_incoming(mx, str(root), USER, ROOM, event("m1", raw), MAX, NOW)
    path = (root / att.workspace_path).resolve()
    assert path.is_relative_to(root.resolve())
    assert path.parent == (root / inbox_dir(USER, ROOM)).resolve()
    assert path.read_bytes() == b"payload"
    assert path.name == f"{STAMP}-{att.name}" and att.name == safe_name(raw)
    assert only_files(root) == [att.workspace_path]


async def test_same_name_same_second_gets_a_unique_name(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.media["m1"], hs.media["m2"] = b"one", b"two"
    first = await save_incoming(mx, str(root), USER, ROOM, event("m1", "a.txt"), MAX, NOW)
    second = await save_incoming(mx, str(root), USER, ROOM, event("m2", "a.txt"), MAX, NOW)
    assert first.workspace_path.endswith(f"{STAMP}-a.txt")
    assert second.workspace_path.endswith(f"{STAMP}-a-1.txt")
    assert (root / first.workspace_path).read_bytes() == b"one"
    assert (root / second.workspace_path).read_bytes() == b"two"


async def test_users_and_rooms_that_sanitise_alike_never_mix(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.media["m1"] = b"x"
    paths = set()
    for user, room in [
        ("@al/ice:example.org", ROOM),
        ("@al=ice:example.org", ROOM),
        (USER, "!a/b:example.org"),
        (USER, "!a=b:example.org"),
    ]:
        att = await save_incoming(mx, str(root), user, room, event("m1", "a.txt"), MAX, NOW)
        paths.add(str(Path(att.workspace_path).parent))
    assert len(paths) == 4


async def test_oversize_by_declared_size_is_refused_before_download(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.media["big"] = b"x" * (MAX + 1)
    with pytest.raises(FileRefused) as refused:
        await save_incoming(mx, str(root), USER, ROOM, event("big", "big.bin", MAX + 1), MAX, NOW)
    assert refused.value.key == "file.too_large"
    assert refused.value.values == {"name": "big.bin", "max_mb": "0.0625"}
    assert hs.requests == []
    assert everything(root) == []
    with pytest.raises(FileRefused):
        await fetch_inline(mx, event("big", "big.bin", MAX + 1), MAX)
    assert hs.requests == []


async def test_oversize_by_content_length_is_refused_unread(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.media["big"] = b"x" * (MAX + 1)
    with pytest.raises(FileRefused) as refused:
        await save_incoming(mx, str(root), USER, ROOM, event("big", "big.bin", 10), MAX, NOW)
    assert refused.value.key == "file.too_large"
    assert only_files(root) == []


async def test_lying_size_is_aborted_while_streaming(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    hs.endless.add("liar")
    with pytest.raises(FileRefused) as refused:
        await save_incoming(mx, str(root), USER, ROOM, event("liar", "small.txt", 10), MAX, NOW)
    assert refused.value.key == "file.too_large"
    assert only_files(root) == []  # neither the file nor its temp file
    await asyncio.wait_for(hs.stream_done.wait(), 30)
    assert hs.client_went_away  # the plugin hung up instead of reading 64 MiB


async def test_exactly_the_limit_is_taken_and_chunked_bodies_work(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    data = os.urandom(MAX)
    hs.media["m1"] = data
    hs.no_length.add("m1")
    att = await save_incoming(mx, str(root), USER, ROOM, event("m1", "a.bin"), MAX, NOW)
    assert (root / att.workspace_path).read_bytes() == data
    hs.media["m2"] = data + b"!"
    hs.no_length.add("m2")
    with pytest.raises(FileRefused):
        await save_incoming(mx, str(root), USER, ROOM, event("m2", "b.bin"), MAX, NOW)
    assert only_files(root) == [att.workspace_path]


async def test_legacy_endpoint_when_the_server_lacks_authenticated_media(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    hs.authenticated = False
    hs.media["m1"] = b"legacy bytes"
    att = await save_incoming(mx, str(root), USER, ROOM, event("m1", "a.txt"), MAX, NOW)
    assert (root / att.workspace_path).read_bytes() == b"legacy bytes"
    assert hs.downloads() == [
        "/_matrix/client/v1/media/download/example.org/m1",
        "/_matrix/media/v3/download/example.org/m1",
    ]


async def test_missing_media_is_a_failed_download(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    with pytest.raises(FileRefused) as refused:
        await save_incoming(mx, str(root), USER, ROOM, event("gone", "a.txt"), MAX, NOW)
    assert refused.value.key == "file.download_failed"
    assert refused.value.values == {"name": "a.txt"}
    assert only_files(root) == []


@pytest.mark.parametrize(
    "url", [None, 42, "https://example.org/x", "mxc://example.org/../x", "mxc:///m1", "mxc://a/b/c"]
)
async def test_bad_urls_are_refused_without_a_request(
    hs: FakeMedia, mx: Matrix, root: Path, url: Any
) -> None:
    content = {"msgtype": "m.file", "body": "a.txt", "url": url}
    with pytest.raises(FileRefused) as refused:
        await save_incoming(mx, str(root), USER, ROOM, content, MAX, NOW)
    assert refused.value.key == "file.download_failed"
    assert hs.requests == []


async def test_fetch_inline_returns_the_bytes(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    hs.media["m1"] = b"inline text"
    att = await fetch_inline(mx, event("m1", "a.txt"), MAX)
    assert (att.name, att.mime_type, att.size, att.data) == (
        "a.txt",
        "text/plain",
        11,
        b"inline text",
    )
    assert att.workspace_path is None
    hs.endless.add("liar")
    with pytest.raises(FileRefused) as refused:
        await fetch_inline(mx, event("liar", "a.txt", 1), MAX)
    assert refused.value.key == "file.too_large"


async def test_missing_workspace_root_is_a_save_failure(
    hs: FakeMedia, mx: Matrix, tmp_path
) -> None:
    hs.media["m1"] = b"x"
    with pytest.raises(FileRefused) as refused:
        await save_incoming(mx, str(tmp_path / "nowhere"), USER, ROOM, event("m1", "a"), MAX, NOW)
    assert refused.value.key == "file.save_failed"
    assert not (tmp_path / "nowhere").exists()


async def test_inbox_link_swapped_out_of_the_root_is_not_followed(
    hs: FakeMedia, mx: Matrix, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    user_dir = root / "surfaces" / "matrix" / safe_segment(USER)
    user_dir.parent.mkdir(parents=True)
    user_dir.symlink_to(outside, target_is_directory=True)
    hs.media["m1"] = b"x"
    with pytest.raises(FileRefused) as refused:
        await save_incoming(mx, str(root), USER, ROOM, event("m1", "a.txt"), MAX, NOW)
    assert refused.value.key == "file.save_failed"
    assert everything(outside) == []


# outgoing


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + b"\x00" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof + b"\xff\xd9"


def test_image_sizes_from_headers() -> None:
    assert image_size(png(3, 2)) == (3, 2)
    assert image_size(b"GIF89a" + struct.pack("<HH", 640, 480) + b"\x00" * 10) == (640, 480)
    assert image_size(jpeg(800, 600)) == (800, 600)
    assert image_size(b"\xff\xd8\xff") is None
    assert image_size(b"not an image") is None
    assert image_size(b"") is None


def test_msgtypes() -> None:
    assert msgtype_for("image/png") == "m.image"
    assert msgtype_for("image/svg+xml") == "m.file"
    assert msgtype_for("audio/mpeg") == "m.audio"
    assert msgtype_for("video/mp4") == "m.video"
    assert msgtype_for("application/pdf") == "m.file"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("secret")
    return path


@pytest.mark.parametrize(
    ("rel", "key"),
    [
        ("../x", "file.outside_workspace"),
        ("../outside/secret.txt", "file.outside_workspace"),
        ("a/../../outside/secret.txt", "file.outside_workspace"),
        ("/etc/passwd", "file.outside_workspace"),
        ("link-out", "file.outside_workspace"),
        ("dir-out/secret.txt", "file.outside_workspace"),
        ("link-nowhere", "file.outside_workspace"),
        ("missing.txt", "file.missing"),
        ("sub", "file.missing"),
        ("", "file.missing"),
        ("a\x00b", "file.missing"),
        ("big.bin", "file.too_large_out"),
    ],
)
async def test_outgoing_refusals(
    hs: FakeMedia, mx: Matrix, root: Path, outside: Path, rel: str, key: str
) -> None:
    # Everything in the user's own folder, the only place an agent's files are sent from.
    home = make_home(root)
    (home / "sub").mkdir()
    (home / "link-out").symlink_to(outside / "secret.txt")
    (home / "dir-out").symlink_to(outside, target_is_directory=True)
    (home / "link-nowhere").symlink_to(outside / "nothing-here")
    (home / "big.bin").write_bytes(b"x" * (MAX + 1))
    rel = rel if not rel or rel.startswith("/") else f"{HOME}/{rel}"
    with pytest.raises(FileRefused) as refused:
        resolve_outgoing(str(root), rel, MAX, USER)
    assert refused.value.key == key
    with pytest.raises(FileRefused) as refused:
        await send_outgoing(mx, ROOM, str(root), rel, MAX, USER)
    assert refused.value.key == key
    assert refused.value.message("en") and refused.value.message("ru")
    assert hs.requests == []


def test_links_inside_the_root_are_followed(root: Path) -> None:
    home = make_home(root)
    (home / "real").mkdir()
    (home / "real" / "a.txt").write_text("a")
    (home / "alias").symlink_to(home / "real", target_is_directory=True)
    resolved = resolve_outgoing(str(root), f"{HOME}/alias/a.txt", MAX, USER)
    assert resolved == (home / "real" / "a.txt").resolve()


@pytest.mark.parametrize(
    ("name", "data", "msgtype", "mime", "dims"),
    [
        ("out/chart.png", png(3, 2), "m.image", "image/png", (3, 2)),
        ("photo.jpg", jpeg(800, 600), "m.image", "image/jpeg", (800, 600)),
        ("song.mp3", b"ID3 fake", "m.audio", "audio/mpeg", None),
        ("clip.mp4", b"fake mp4", "m.video", "video/mp4", None),
        ("report.pdf", b"%PDF-1.4 fake", "m.file", "application/pdf", None),
        ("notes", b"no extension", "m.file", "application/octet-stream", None),
    ],
)
async def test_allowed_file_is_uploaded_and_sent(
    hs: FakeMedia,
    mx: Matrix,
    root: Path,
    name: str,
    data: bytes,
    msgtype: str,
    mime: str,
    dims: tuple[int, int] | None,
) -> None:
    path = make_home(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    event_id = await send_outgoing(mx, ROOM, str(root), f"{HOME}/{name}", MAX, USER)
    assert event_id == "$sent1"
    base = name.rsplit("/", 1)[-1]
    assert hs.uploads == [(data, mime, base)]
    [(room, content)] = hs.sent
    assert room == ROOM
    info = {"mimetype": mime, "size": len(data)}
    if dims:
        info["w"], info["h"] = dims
    assert content == {
        "msgtype": msgtype,
        "body": base,
        "filename": base,
        "url": "mxc://example.org/up1",
        "info": info,
    }
    assert hashlib.sha256(hs.uploads[0][0]).digest() == hashlib.sha256(data).digest()


async def test_a_link_swapped_in_after_the_check_is_not_followed(
    hs: FakeMedia, mx: Matrix, root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = make_home(root)
    (home / "sub").mkdir()
    (home / "sub" / "secret.txt").write_text("inside")
    check = files.resolve_outgoing

    def check_then_swap(workspace_root: str, rel_path: str, max_bytes: int, user: str) -> Path:
        real = check(workspace_root, rel_path, max_bytes, user)
        (home / "sub" / "secret.txt").unlink()
        (home / "sub").rmdir()
        (home / "sub").symlink_to(outside, target_is_directory=True)
        return real

    monkeypatch.setattr(files.outgoing, "resolve_outgoing", check_then_swap)
    with pytest.raises(FileRefused) as refused:
        await send_outgoing(mx, ROOM, str(root), f"{HOME}/sub/secret.txt", MAX, USER)
    assert refused.value.key == "file.outside_workspace"
    assert hs.requests == []


def test_every_file_text_exists_in_both_languages() -> None:
    keys = {
        "file.too_large",
        "file.encrypted",
        "file.download_failed",
        "file.save_failed",
        "file.not_accepted",
        "file.outside_workspace",
        "file.missing",
        "file.too_large_out",
        "file.upload_failed",
    }
    for language in ("en", "ru"):
        assert keys <= set(TEXTS[language])
        for key in keys:
            TEXTS[language][key].format(name="a.txt", path="a/b", max_mb="50")


async def test_mautrix_content_objects_are_taken_too(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    from mautrix.types import ImageInfo, MediaMessageEventContent, MessageType

    hs.media["m1"] = b"gif"
    content = MediaMessageEventContent(
        msgtype=MessageType.IMAGE,
        body="a caption",
        url="mxc://example.org/m1",
        info=ImageInfo(mimetype="image/gif", size=3),
    )
    content["filename"] = "anim.gif"
    assert content.serialize()["msgtype"] in files.FILE_MSGTYPES and caption(content) == "a caption"
    att = await save_incoming(mx, str(root), USER, ROOM, content, MAX, NOW)
    assert att.workspace_path.endswith(f"{STAMP}-anim.gif") and att.mime_type == "image/gif"
    assert "m.text" not in files.FILE_MSGTYPES
