"""Files an agent returned: checked, read from inside the workspace only, sent to the room."""

from __future__ import annotations

import asyncio
import errno
import mimetypes
import os
import stat
import struct
from pathlib import Path, PurePosixPath
from typing import Any

from mautrix.types import ContentURI

from ..matrix import HomeserverError, Matrix
from .disk import open_dirs
from .encrypted import NoCrypto, seal
from .names import DEFAULT_MIME, FileRefused, megabytes, safe_name, user_dir

MAX_REL_PATH_CHARS = 4096


def resolve_outgoing(workspace_root: str, rel_path: str, max_bytes: int, user_id: str) -> Path:
    """The real path of a file an agent returned for ``user_id``, checked without reading it.

    ``rel_path`` is relative to the workspace root, and only files in the user's own folder
    (:func:`user_dir`) are taken: another user's inbox is inside the root too, and its name
    can be computed. Refuses (FileRefused) absolute paths, ``..``, links resolving outside the
    root (``file.outside_workspace``) or outside the user's folder (``file.outside``), anything
    that is not an existing regular file, and files over ``max_bytes``.
    """
    shown = shown_path(rel_path)
    rel = _relative(rel_path, shown)
    try:
        root = Path(workspace_root).resolve(strict=True)
    except OSError as e:
        raise FileRefused("file.missing", f"workspace root: {e}", path=shown) from e
    # Not resolved: a real path under it runs through real folders of these names only.
    home = root.joinpath(*user_dir(user_id).parts)
    real, st = _existing_inside(root, home, rel, shown)
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused("file.missing", f"{shown!r} is not a regular file", path=shown)
    if st.st_size > max_bytes:
        raise FileRefused(
            "file.too_large_out",
            f"{shown!r} has {st.st_size} bytes > {max_bytes}",
            name=safe_name(rel.name),
            max_mb=megabytes(max_bytes),
        )
    return real


def _relative(rel_path: Any, shown: str) -> PurePosixPath:
    """The path as given, if it is a relative path that stays below where it starts."""
    if (
        not isinstance(rel_path, str)
        or not rel_path.strip()
        or "\x00" in rel_path
        or len(rel_path) > MAX_REL_PATH_CHARS
    ):
        raise FileRefused("file.missing", f"bad path {shown!r}", path=shown)
    rel = PurePosixPath(rel_path)
    if rel.is_absolute() or ".." in rel.parts:
        raise FileRefused("file.outside_workspace", f"{shown!r} escapes the root", path=shown)
    return rel


def _existing_inside(
    root: Path, home: Path, rel: PurePosixPath, shown: str
) -> tuple[Path, os.stat_result]:
    """The real path of ``root/rel`` and its status, refused if it leads out of ``home``."""
    candidate = root.joinpath(*rel.parts)
    # Where the path leads, existing or not: a link out is refused as such, whatever its target.
    _check_inside(Path(os.path.realpath(candidate)), root, home, shown)
    try:
        real = candidate.resolve(strict=True)
        st = real.stat()
    except (OSError, RuntimeError) as e:
        raise FileRefused("file.missing", f"{shown!r}: {type(e).__name__}", path=shown) from e
    _check_inside(real, root, home, shown)
    return real, st


def _check_inside(real: Path, root: Path, home: Path, shown: str) -> None:
    if not real.is_relative_to(root):
        raise FileRefused("file.outside_workspace", f"{shown!r} leads out of the root", path=shown)
    if not real.is_relative_to(home):
        raise FileRefused("file.outside", f"{shown!r} is not in {home}", path=shown)


def shown_path(rel_path: Any) -> str:
    """The path as it may appear in a message: printable and bounded."""
    if not isinstance(rel_path, str):
        return "?"
    printable = "".join(ch if ch.isprintable() and ch != "`" else "?" for ch in rel_path)
    return printable if len(printable) <= 200 else printable[:200] + "…"


def _read_inside(root: str, real: Path, max_bytes: int) -> bytes:
    """Reads a file checked by resolve_outgoing, walking to it from the root again without
    following links, so nothing swapped in since the check can lead elsewhere."""
    rel = real.relative_to(Path(root).resolve(strict=True))
    dir_fd = open_dirs(root, rel.parts[:-1], create=False)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(rel.parts[-1], flags, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _Changed(errno.ENOENT, "not a regular file any more")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _Changed(errno.EFBIG, f"grew past {max_bytes} bytes")
    return data


class _Changed(OSError):
    """The file changed between the check and the read."""


async def send_outgoing(
    mx: Matrix,
    room_id: str,
    workspace_root: str,
    rel_path: str,
    max_bytes: int,
    user_id: str,
    *,
    encrypt: bool = False,
) -> str:
    """Checks, reads, uploads and sends a file an agent returned for ``user_id``; the event id.

    The file must be in the user's own folder (see :func:`resolve_outgoing`).

    The message type follows the MIME type (guessed from the name): m.image, m.audio,
    m.video or m.file, with body and filename the file's name and info the MIME type, size
    and, for PNG, GIF and JPEG, the image's width and height. With ``encrypt`` (an encrypted
    room) the file is uploaded encrypted and the message says where and how to open it in
    ``file`` instead of ``url`` (see :func:`_upload`); the message itself is encrypted by
    ``mx.send``. Raises FileRefused.
    """
    real = resolve_outgoing(workspace_root, rel_path, max_bytes, user_id)
    shown = shown_path(rel_path)
    name = safe_name(PurePosixPath(rel_path).name)
    data = await _read_checked(workspace_root, real, max_bytes, shown, name)
    return await send_bytes(mx, room_id, data, name, encrypt=encrypt, shown=repr(shown))


async def send_bytes(
    mx: Matrix, room_id: str, data: bytes, name: str, *, encrypt: bool, shown: str = ""
) -> str:
    """Uploads ``data`` and sends it as a file message named ``name`` (the message type and
    info from its MIME type); the event id. Raises FileRefused."""
    shown = shown or repr(name)
    mime = mimetypes.guess_type(name)[0] or DEFAULT_MIME
    info: dict[str, Any] = {"mimetype": mime, "size": len(data)}
    dims = image_size(data)
    if dims and mime.startswith("image/"):
        info["w"], info["h"] = dims
    try:
        media = await _upload(mx, data, mime, name, encrypt)
        content = {"msgtype": msgtype_for(mime), "body": name, "filename": name, **media}
        content["info"] = info
        return await mx.send(room_id, content)
    except NoCrypto as e:  # never sent in the clear instead
        raise FileRefused("file.upload_failed", f"{shown} not encrypted: {e}", name=name) from e
    except HomeserverError as e:
        raise FileRefused("file.upload_failed", f"upload of {shown}: {e}", name=name) from e


async def _upload(mx: Matrix, data: bytes, mime: str, name: str, encrypt: bool) -> dict[str, Any]:
    """Uploads the file; where the message says it is: ``url``, or encrypted ``file``.

    Encrypted, what is uploaded is the ciphertext under a new key, typed
    application/octet-stream and without the file's name, so the homeserver learns neither
    the content nor the name; ``file`` (the EncryptedFile with its ``mxc://`` url) is what
    opens it, readable only inside the encrypted message. ``info`` stays beside it, outside
    ``file``, as clients expect. NoCrypto without mautrix's crypto helpers.
    """
    if not encrypt:
        return {"url": await mx.upload(data, mime, name)}
    ciphertext, sealed = await seal(data)
    sealed.url = ContentURI(await mx.upload(ciphertext, DEFAULT_MIME, ""))
    return {"file": sealed.serialize()}


async def _read_checked(root: str, real: Path, max_bytes: int, shown: str, name: str) -> bytes:
    """The bytes of a checked file; a change since the check is refused like the check would."""
    try:
        return await asyncio.to_thread(_read_inside, root, real, max_bytes)
    except OSError as e:
        cause = f"{shown!r} changed after the check: {e}"
        if e.errno == errno.EFBIG:
            raise FileRefused(
                "file.too_large_out", cause, name=name, max_mb=megabytes(max_bytes)
            ) from e
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a link swapped in: never followed
            raise FileRefused("file.outside_workspace", cause, path=shown) from e
        raise FileRefused("file.missing", cause, path=shown) from e


def msgtype_for(mime_type: str) -> str:
    major = mime_type.split("/", 1)[0].lower()
    if major == "image" and mime_type.lower() != "image/svg+xml":
        return "m.image"
    if major in ("audio", "video"):
        return f"m.{major}"
    return "m.file"


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF or JPEG header; None for anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return (width, height) if width and height else None
        if length < 2:
            return None
        i += 2 + length
    return None
