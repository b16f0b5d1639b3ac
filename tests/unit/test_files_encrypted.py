"""Files in encrypted rooms both ways: ``content.file`` downloaded, its hash checked and
decrypted into the workspace or memory; an agent's file uploaded encrypted and sent as
``file``. Garbage and tampering are refused (FileRefused only), nothing left behind."""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mautrix.crypto.attachments import decrypt_attachment
from mautrix.types import EncryptedFile, FileInfo, MediaMessageEventContent, MessageType

from lambda_plugin.files import FileRefused, fetch_inline, inbox_dir, save_incoming, send_outgoing
from lambda_plugin.matrix import Matrix
from tests.unit.fake_media import (
    HOME,
    MAX,
    NOW,
    ROOM,
    STAMP,
    USER,
    FakeMedia,
    encrypted_event,
    event,
    everything,
    hs_fixture,  # noqa: F401  (the fixture hs)
    make_home,
    mx_fixture,  # noqa: F401  (the fixture mx)
    only_files,
    root_fixture,  # noqa: F401  (the fixture root)
)

SECRET = b"the plaintext nobody else may read\n" * 100


async def save(mx: Matrix, root: Path, content: Any, **kwargs: Any) -> str:
    att = await save_incoming(mx, str(root), USER, ROOM, content, MAX, NOW, **kwargs)
    assert att.workspace_path is not None
    return att.workspace_path


async def refused(mx: Matrix, root: Path, content: Any, key: str, **kwargs: Any) -> FileRefused:
    """Refused with ``key`` by both ways in, nothing left in the workspace."""
    with pytest.raises(FileRefused) as saved:
        await save(mx, root, content, **kwargs)
    assert saved.value.key == key
    assert only_files(root) == []
    with pytest.raises(FileRefused) as inline:
        await fetch_inline(mx, content, MAX, deadline_s=kwargs.get("deadline_s"))
    assert inline.value.key == key
    assert saved.value.message("en") and saved.value.message("ru")
    return saved.value


# in


async def test_an_encrypted_file_lands_decrypted(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    content = encrypted_event(hs, "enc", "secret.txt", SECRET, len(SECRET))
    assert hs.media["enc"] != SECRET and len(hs.media["enc"]) == len(SECRET)
    att = await save_incoming(mx, str(root), USER, ROOM, content, MAX, NOW)
    expected = f"{inbox_dir(USER, ROOM)}/{STAMP}-secret.txt"
    assert att.workspace_path == expected
    assert (root / expected).read_bytes() == SECRET
    assert (att.name, att.mime_type, att.size, att.data) == (
        "secret.txt",
        "text/plain",
        len(SECRET),
        None,
    )
    assert only_files(root) == [expected]  # no temp file left
    assert hs.downloads() == ["/_matrix/client/v1/media/download/example.org/enc"]


async def test_an_encrypted_file_comes_inline_decrypted(hs: FakeMedia, mx: Matrix) -> None:
    content = encrypted_event(hs, "enc", "secret.txt", SECRET)
    att = await fetch_inline(mx, content, MAX)
    assert (att.name, att.size, att.data, att.workspace_path) == (
        "secret.txt",
        len(SECRET),
        SECRET,
        None,
    )
    assert isinstance(att.data, bytes)


async def test_encrypted_empty_and_limit_sized_files(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    empty = await save(mx, root, encrypted_event(hs, "e0", "empty.bin", b""))
    assert (root / empty).read_bytes() == b""
    data = os.urandom(MAX)
    hs.no_length.add("e1")
    full = await save(mx, root, encrypted_event(hs, "e1", "full.bin", data))
    assert (root / full).read_bytes() == data


async def test_a_mautrix_content_object_with_file_is_taken(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    raw = encrypted_event(hs, "enc", "doc.txt", SECRET)
    content = MediaMessageEventContent(
        msgtype=MessageType.FILE,
        body="doc.txt",
        file=EncryptedFile.deserialize(raw["file"]),
        info=FileInfo(mimetype="text/plain", size=len(SECRET)),
    )
    assert (root / await save(mx, root, content)).read_bytes() == SECRET


async def test_a_tampered_ciphertext_is_refused_before_decrypting(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    content = encrypted_event(hs, "enc", "secret.txt", SECRET)
    tampered = bytearray(hs.media["enc"])
    tampered[10] ^= 0x01
    hs.media["enc"] = bytes(tampered)
    error = await refused(mx, root, content, "file.download_failed")
    assert error.values == {"name": "secret.txt"}
    assert "SHA-256" in str(error)
    assert everything(root / inbox_dir(USER, ROOM)) == []  # not even a temp file


async def test_a_hash_that_names_other_bytes_is_refused(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    content = encrypted_event(hs, "enc", "secret.txt", SECRET)
    other = encrypted_event(hs, "other", "other.txt", b"something else")
    content["file"]["hashes"] = other["file"]["hashes"]
    await refused(mx, root, content, "file.download_failed")


def valid_file(hs: FakeMedia) -> dict[str, Any]:
    return encrypted_event(hs, "enc", "secret.txt", SECRET)["file"]


DROP = object()  # the field left out


def garbled(hs: FakeMedia, path: str, value: Any) -> Any:
    """A valid ``file`` object with one field (``key.k`` for a field of the key) set to
    ``value`` or dropped; ``value`` itself for the path ``""``."""
    if not path:
        return value
    file = valid_file(hs)
    outer, _, inner = path.partition(".")
    target, field = (file[outer], inner) if inner else (file, outer)
    if value is DROP:
        del target[field]
    else:
        target[field] = value
    return file


GARBAGE: list[tuple[str, Any]] = [
    ("", None),
    ("", []),
    ("", "mxc://example.org/enc"),
    ("", 42),
    ("", {}),
    ("key", DROP),
    ("key", None),
    ("key", "a2V5"),
    ("key", [1, 2]),
    ("key.k", DROP),
    ("key.k", None),
    ("key.k", 42),
    ("key.k", ""),
    ("key.k", "c2hvcnQ"),
    ("key.k", "!!!!"),
    ("key.k", "\u00e9" * 43),
    ("key.k", "A" * 100000),
    ("key.alg", "A128CTR"),
    ("key.kty", "RSA"),
    ("iv", DROP),
    ("iv", None),
    ("iv", 16),
    ("iv", ["AAAAAAAAAAAAAAAAAAAAAA"]),
    ("iv", ""),
    ("iv", "AAAA"),
    ("iv", "AAAAAAAAAAAAAAAAAAAAAA\n"),
    ("iv", "AAAAAAAAAAAAAAAAAAAAA"),
    ("hashes", DROP),
    ("hashes", None),
    ("hashes", "abc"),
    ("hashes", {}),
    ("hashes.sha256", None),
    ("hashes.sha256", b"bytes"),
    ("hashes.sha256", "too short"),
    ("v", DROP),
    ("v", "v1"),
    ("v", None),
    ("v", 2),
    ("url", DROP),
    ("url", None),
    ("url", "https://example.org/enc"),
    ("url", "mxc://example.org/../enc"),
    ("url", ["mxc://example.org/enc"]),
]


@pytest.mark.parametrize(
    ("path", "value"), GARBAGE, ids=[f"{path or 'file'}-{i}" for i, (path, _) in enumerate(GARBAGE)]
)
async def test_garbage_file_objects_are_refused_without_a_request(
    hs: FakeMedia, mx: Matrix, root: Path, path: str, value: Any
) -> None:
    content = {"msgtype": "m.file", "body": "secret.txt", "file": garbled(hs, path, value)}
    content["url"] = "mxc://example.org/enc"  # never used instead of a broken ``file``
    error = await refused(mx, root, content, "file.download_failed")
    assert error.values == {"name": "secret.txt"}
    assert hs.requests == [] and everything(root) == []


JUNK: list[Any] = [None, True, 0, -1, 1.5, "", "x" * 5000, [], [None], {}, {"a": {}}, b"raw"]


async def test_any_field_of_any_junk_type_raises_nothing_but_file_refused(
    hs: FakeMedia, mx: Matrix
) -> None:
    base = valid_file(hs)
    fields = [(k,) for k in base] + [("key", k) for k in base["key"]] + [("hashes", "sha256")]
    for where in fields:
        for junk in JUNK:
            file = copy.deepcopy(base)
            target = file[where[0]] if len(where) == 2 else file
            target[where[-1]] = junk
            content = {"msgtype": "m.file", "body": "a.txt", "file": file}
            try:
                await fetch_inline(mx, content, MAX)
            except FileRefused:
                continue
            # Only what the helper ignores may change and still work.
            assert where in {("key", "ext"), ("key", "key_ops")}, (where, junk)


async def test_an_encrypted_file_obeys_the_limits(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    big = encrypted_event(hs, "big", "big.bin", b"b" * (MAX + 1), MAX + 1)
    await refused(mx, root, big, "file.too_large")
    assert hs.requests == []  # by its declared size, before any download
    liar = encrypted_event(hs, "liar", "small.bin", b"b" * (MAX + 1), 10)
    await refused(mx, root, liar, "file.too_large")
    quota = encrypted_event(hs, "q", "q.bin", b"q" * 1000)
    with pytest.raises(FileRefused) as error:
        await save(mx, root, quota, quota_bytes=500)
    assert error.value.key == "file.quota" and only_files(root) == []


async def test_an_encrypted_download_has_the_deadline_and_cancels_cleanly(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    slow = encrypted_event(hs, "slow", "slow.bin", b"s" * 20_000)
    hs.trickle["slow"] = 0.05  # 10 s in all
    await refused(mx, root, slow, "file.timeout", deadline_s=0.3)
    hs.trickled = 0
    task = asyncio.create_task(save(mx, root, slow))
    for _ in range(500):
        await asyncio.sleep(0.01)
        if hs.trickled >= 1000 and list((root / inbox_dir(USER, ROOM)).glob(".incoming-*")):
            break
    else:
        pytest.fail("the download never got going")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert only_files(root) == []


@pytest.fixture
def no_crypto(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if maubot were installed without its encryption extra."""
    monkeypatch.setitem(sys.modules, "mautrix.crypto", None)


async def test_without_crypto_an_encrypted_file_is_refused_unread(
    hs: FakeMedia, mx: Matrix, root: Path, no_crypto: None
) -> None:
    content = {
        "msgtype": "m.file",
        "body": "secret.pdf",
        "file": {"url": "mxc://example.org/enc", "key": {}, "iv": "", "hashes": {}, "v": "v2"},
    }
    error = await refused(mx, root, content, "file.encrypted")
    assert error.values == {"name": "secret.pdf"}
    assert "secret.pdf" in error.message("en") and "зашифрован" in error.message("ru")
    assert hs.requests == [] and everything(root) == []
    hs.media["plain"] = b"plain"  # plain files still come in
    assert (root / await save(mx, root, event("plain", "a.txt"))).read_bytes() == b"plain"


# out


async def test_an_encrypted_room_gets_ciphertext_and_the_key_in_file(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    (make_home(root) / "report.txt").write_bytes(SECRET)
    event_id = await send_outgoing(
        mx, ROOM, str(root), f"{HOME}/report.txt", MAX, USER, encrypt=True
    )
    assert event_id == "$sent1"
    [(uploaded, content_type, filename)] = hs.uploads
    assert uploaded != SECRET and SECRET[:32] not in uploaded and len(uploaded) == len(SECRET)
    assert (content_type, filename) == ("application/octet-stream", "")  # no name leaks
    [(room, content)] = hs.sent
    assert room == ROOM and "url" not in content
    assert {k: v for k, v in content.items() if k != "file"} == {
        "msgtype": "m.file",
        "body": "report.txt",
        "filename": "report.txt",
        "info": {"mimetype": "text/plain", "size": len(SECRET)},
    }
    file = content["file"]
    assert file["url"] == "mxc://example.org/up1" and file["v"] == "v2"
    assert file["key"]["alg"] == "A256CTR" and "decrypt" in file["key"]["key_ops"]
    plain = decrypt_attachment(uploaded, file["key"]["k"], file["hashes"]["sha256"], file["iv"])
    assert plain == SECRET


async def test_what_the_bot_sends_encrypted_it_can_read_back(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    data = os.urandom(3000)
    (make_home(root) / "blob.bin").write_bytes(data)
    await send_outgoing(mx, ROOM, str(root), f"{HOME}/blob.bin", MAX, USER, encrypt=True)
    hs.media["up1"] = hs.uploads[0][0]
    [(_, content)] = hs.sent
    assert (await fetch_inline(mx, content, MAX)).data == data
    assert (root / await save(mx, root, content)).read_bytes() == data


async def test_every_upload_has_its_own_key(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    (make_home(root) / "a.txt").write_bytes(SECRET)
    for _ in range(2):
        await send_outgoing(mx, ROOM, str(root), f"{HOME}/a.txt", MAX, USER, encrypt=True)
    assert hs.uploads[0][0] != hs.uploads[1][0]
    assert hs.sent[0][1]["file"]["key"]["k"] != hs.sent[1][1]["file"]["key"]["k"]


async def test_an_encrypted_image_keeps_its_info_in_the_clear(
    hs: FakeMedia, mx: Matrix, root: Path
) -> None:
    gif = b"GIF89a" + (640).to_bytes(2, "little") + (480).to_bytes(2, "little") + b"\x00" * 20
    (make_home(root) / "pic.gif").write_bytes(gif)
    await send_outgoing(mx, ROOM, str(root), f"{HOME}/pic.gif", MAX, USER, encrypt=True)
    [(_, content)] = hs.sent
    assert content["msgtype"] == "m.image" and "url" not in content
    assert content["info"] == {"mimetype": "image/gif", "size": len(gif), "w": 640, "h": 480}


async def test_checks_come_first_when_encrypting_too(hs: FakeMedia, mx: Matrix, root: Path) -> None:
    (make_home(root) / "big.bin").write_bytes(b"x" * (MAX + 1))
    for rel, key in [(f"{HOME}/big.bin", "file.too_large_out"), ("../x", "file.outside_workspace")]:
        with pytest.raises(FileRefused) as error:
            await send_outgoing(mx, ROOM, str(root), rel, MAX, USER, encrypt=True)
        assert error.value.key == key
    assert hs.requests == []


async def test_without_crypto_nothing_is_sent_in_the_clear(
    hs: FakeMedia, mx: Matrix, root: Path, no_crypto: None
) -> None:
    (make_home(root) / "a.txt").write_bytes(SECRET)
    with pytest.raises(FileRefused) as error:
        await send_outgoing(mx, ROOM, str(root), f"{HOME}/a.txt", MAX, USER, encrypt=True)
    assert error.value.key == "file.upload_failed" and error.value.values == {"name": "a.txt"}
    assert hs.requests == []
    await send_outgoing(mx, ROOM, str(root), f"{HOME}/a.txt", MAX, USER)  # unencrypted: as ever
    assert hs.uploads[0][0] == SECRET and "url" in hs.sent[0][1]
