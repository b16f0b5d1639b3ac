"""Files both ways between chat rooms and the shared workspace, safely.

Incoming media events are written under the workspace root as
``surfaces/matrix/<safe user>/<safe room>/inbox/<UTC timestamp>-<safe name>``; the agent gets
that path relative to the root. Files an agent returns are read from inside the root only and
sent to the room as the right message type.

Every path below the root is walked one component at a time from a descriptor of the root,
never following a symbolic link, so a link swapped in by anyone with write access to the
workspace cannot make the plugin write or read outside it. Every refusal and failure reaches
the caller as a :class:`FileRefused`, which names a text in ``texts.py``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import mimetypes
import os
import re
import secrets
import stat
import struct
import time
import unicodedata
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp

from .agents.base import Attachment
from .matrix import HomeserverError, Matrix
from .texts import text

FILE_MSGTYPES = ("m.file", "m.image", "m.audio", "m.video")
MAX_NAME_BYTES = 120
MAX_EXT_BYTES = 16
MAX_SEGMENT_CHARS = 64
SEGMENT_HASH_CHARS = 12
MAX_REL_PATH_CHARS = 4096
FALLBACK_NAME = "file"
DEFAULT_MIME = "application/octet-stream"
CHUNK_BYTES = 64 * 1024
DOWNLOAD_TIMEOUT_S = 60.0

_SEPARATORS = re.compile(r"[/\\]")
_WINDOWS_FORBIDDEN = frozenset('<>:"|?*')
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)
_SEGMENT_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
_MEDIA_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_SERVER_NAME = re.compile(r"^[A-Za-z0-9.:\[\]-]+$")


class FileRefused(Exception):
    """A file was not taken or not sent.

    ``key`` and ``values`` name the text to show in the room (:meth:`message`);
    ``str(error)`` is the cause, for the log.
    """

    def __init__(self, key: str, cause: str, **values: Any) -> None:
        super().__init__(cause)
        self.key = key
        self.cause = cause
        self.values = values

    def message(self, language: str) -> str:
        return text(language, self.key, **self.values)


# names


def safe_name(raw: str) -> str:
    """A file name safe to create in a folder: its last path component, NFC-normalised, with
    no control or format characters, no leading dots, at most 120 bytes of UTF-8 (the
    extension kept), never empty."""
    if not isinstance(raw, str):
        return FALLBACK_NAME
    name = unicodedata.normalize("NFC", raw)
    parts = [part for part in _SEPARATORS.split(name) if part.strip()]
    name = parts[-1] if parts else ""
    kept = []
    for ch in name:
        category = unicodedata.category(ch)
        if category[0] == "C" or category in ("Zl", "Zp"):
            continue  # control, format (bidi overrides), surrogate, unassigned characters
        kept.append("_" if ch in _WINDOWS_FORBIDDEN else ch)
    name = unicodedata.normalize("NFC", " ".join("".join(kept).split()))
    name = _bound(name.lstrip(". ").rstrip(". "))
    if not name:
        return FALLBACK_NAME
    if name.split(".", 1)[0].upper() in _WINDOWS_RESERVED:
        name = _bound("_" + name)
    return name


def _bound(name: str) -> str:
    if len(name.encode("utf-8")) <= MAX_NAME_BYTES:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or not ext or len(ext.encode("utf-8")) > MAX_EXT_BYTES:
        stem, ext = name, ""
    else:
        ext = "." + ext
    room = MAX_NAME_BYTES - len(ext.encode("utf-8"))
    stem = stem.encode("utf-8")[:room].decode("utf-8", errors="ignore").rstrip(". ")
    return (stem or FALLBACK_NAME) + ext


def safe_segment(identifier: str) -> str:
    """A folder name for a user or room id: a readable ASCII part and a hash of the exact id,
    so different ids never share a folder, however alike they read."""
    digest = hashlib.sha256(identifier.encode("utf-8", errors="surrogatepass")).hexdigest()
    readable = identifier[1:] if identifier[:1] in ("@", "!", "#", "+", "$") else identifier
    readable = _SEGMENT_UNSAFE.sub("_", readable).lstrip(".")[:MAX_SEGMENT_CHARS]
    return f"{readable or 'id'}-{digest[:SEGMENT_HASH_CHARS]}"


def inbox_dir(user_id: str, room_id: str) -> PurePosixPath:
    """The inbox of one user in one room, relative to the workspace root."""
    return PurePosixPath(
        "surfaces", "matrix", safe_segment(user_id), safe_segment(room_id), "inbox"
    )


# incoming


def _as_dict(content: Any) -> dict[str, Any]:
    """Event content as a dict: mautrix content objects are serialised, others taken as is."""
    if hasattr(content, "serialize"):
        content = content.serialize()
    return content if isinstance(content, dict) else {}


def is_file_message(content: Any) -> bool:
    return _as_dict(content).get("msgtype") in FILE_MSGTYPES


def caption(content: Any) -> str:
    """The text sent with a file, if any: ``body`` when a separate ``filename`` is given."""
    content = _as_dict(content)
    body, filename = content.get("body"), content.get("filename")
    if isinstance(filename, str) and filename and isinstance(body, str) and body != filename:
        return body
    return ""


class _Incoming:
    """What a media event says about its file, checked before anything is downloaded."""

    def __init__(self, content: Any, max_bytes: int) -> None:
        content = _as_dict(content)
        raw_name = content.get("filename") or content.get("body")
        self.name = safe_name(raw_name if isinstance(raw_name, str) else "")
        if "file" in content:
            raise FileRefused("file.encrypted", "encrypted media is not supported", name=self.name)
        info = content.get("info")
        info = info if isinstance(info, dict) else {}
        mime = info.get("mimetype")
        if not (isinstance(mime, str) and _MIME.match(mime)):
            mime = mimetypes.guess_type(self.name)[0] or DEFAULT_MIME
        self.mime_type = mime.lower()
        self.max_bytes = max_bytes
        size = info.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size > max_bytes:
            raise self.too_large(f"declared size {size} > {max_bytes}")
        self.server, self.media_id = _parse_mxc(content.get("url"), self.name)

    def too_large(self, cause: str) -> FileRefused:
        return FileRefused("file.too_large", cause, name=self.name, max_mb=_mb(self.max_bytes))

    def failed(self, cause: str) -> FileRefused:
        return FileRefused("file.download_failed", cause, name=self.name)


def _parse_mxc(url: Any, name: str) -> tuple[str, str]:
    if isinstance(url, str) and url.startswith("mxc://"):
        server, _, media_id = url[len("mxc://") :].partition("/")
        if _SERVER_NAME.match(server) and _MEDIA_ID.match(media_id):
            return server, media_id
    raise FileRefused("file.download_failed", f"not an mxc:// URI: {str(url)[:100]!r}", name=name)


def _mb(max_bytes: int) -> str:
    return f"{max_bytes / (1024 * 1024):g}"


async def _chunks(
    mx: Matrix, incoming: _Incoming, on_chunk: Callable[[bytes], Awaitable[None]]
) -> int:
    """Streams the media to ``on_chunk``; its size. Refuses as soon as it passes the limit."""
    size = 0
    try:
        async with mx.download(incoming.server, incoming.media_id, DOWNLOAD_TIMEOUT_S) as resp:
            declared = resp.content_length
            if declared is not None and declared > incoming.max_bytes:
                raise incoming.too_large(f"Content-Length {declared} > {incoming.max_bytes}")
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                size += len(chunk)
                if size > incoming.max_bytes:
                    raise incoming.too_large(f"body passed {incoming.max_bytes} bytes")
                await on_chunk(chunk)
    except HomeserverError as e:
        raise incoming.failed(f"download: {e}") from e
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise incoming.failed(f"download: {type(e).__name__}: {e}") from e
    return size


async def save_incoming(
    mx: Matrix,
    workspace_root: str,
    user_id: str,
    room_id: str,
    content: Any,
    max_bytes: int,
    now: float | None = None,
) -> Attachment:
    """Downloads a media event's file into the user's inbox for the room, atomically.

    ``content`` is an m.file/m.image/m.audio/m.video content, as a dict or a mautrix object.
    Returns the attachment with ``workspace_path`` relative to the root (posix separators).
    Raises FileRefused (nothing left on disk) for an encrypted or oversize file, a failed
    download or a failed write.
    """
    incoming = _Incoming(content, max_bytes)
    folder = inbox_dir(user_id, room_id)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    wanted = f"{stamp}-{incoming.name}"
    tmp = f".incoming-{secrets.token_hex(8)}.part"
    try:
        dir_fd = _open_dirs(workspace_root, folder.parts, create=True)
    except OSError as e:
        raise _save_failed(incoming.name, e) from e
    placed: str | None = None
    done = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as out:

            async def write(chunk: bytes) -> None:
                out.write(chunk)

            size = await _chunks(mx, incoming, write)
            out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())
        placed = _reserve(dir_fd, wanted)
        os.replace(tmp, placed, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        done = True
    except OSError as e:
        raise _save_failed(incoming.name, e) from e
    finally:
        if not done:  # refused, failed or cancelled: nothing stays behind
            _unlink_quietly(tmp, dir_fd)
            if placed is not None:
                _unlink_quietly(placed, dir_fd)
        os.close(dir_fd)
    return Attachment(
        name=incoming.name,
        mime_type=incoming.mime_type,
        size=size,
        workspace_path=str(folder / placed),
    )


async def fetch_inline(mx: Matrix, content: Any, max_bytes: int) -> Attachment:
    """Downloads a media event's file into memory (``data``), for when no workspace is set."""
    incoming = _Incoming(content, max_bytes)
    chunks: list[bytes] = []

    async def keep(chunk: bytes) -> None:
        chunks.append(chunk)

    size = await _chunks(mx, incoming, keep)
    return Attachment(
        name=incoming.name, mime_type=incoming.mime_type, size=size, data=b"".join(chunks)
    )


def _save_failed(name: str, error: OSError) -> FileRefused:
    return FileRefused("file.save_failed", f"workspace: {type(error).__name__}: {error}", name=name)


def _reserve(dir_fd: int, wanted: str) -> str:
    """Creates an empty placeholder under a free name (``wanted``, else ``stem-N.ext``)."""
    stem, dot, ext = wanted.rpartition(".")
    if not dot or not stem:
        stem, dot, ext = wanted, "", ""
    for n in range(1000):
        name = wanted if n == 0 else f"{stem}-{n}{dot}{ext}"
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd))
        except FileExistsError:
            continue
        return name
    raise FileExistsError(f"no free name for {wanted}")


def _unlink_quietly(name: str, dir_fd: int) -> None:
    # Gone already, or nothing more to do: the caller's error says what went wrong.
    with suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _open_dirs(root: str, parts: tuple[str, ...], *, create: bool) -> int:
    """A descriptor of ``root/parts...``, walked without following any symbolic link below
    the root (the root itself may be one). Creates missing folders when ``create``."""
    fd = os.open(os.path.realpath(root), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            if create:
                with suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)  # the umask decides
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


# outgoing


def resolve_outgoing(workspace_root: str, rel_path: str, max_bytes: int) -> Path:
    """The real path of a file an agent returned, checked without reading it.

    Refuses (FileRefused) absolute paths, ``..``, links resolving outside the root,
    anything that is not an existing regular file, and files over ``max_bytes``.
    """
    shown = _shown(rel_path)
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
    try:
        root = Path(workspace_root).resolve(strict=True)
    except OSError as e:
        raise FileRefused("file.missing", f"workspace root: {e}", path=shown) from e
    candidate = root.joinpath(*rel.parts)
    # Where the path leads, existing or not: a link out is refused as such, whatever its target.
    if not Path(os.path.realpath(candidate)).is_relative_to(root):
        raise FileRefused("file.outside_workspace", f"{shown!r} leads out of the root", path=shown)
    try:
        real = candidate.resolve(strict=True)
        st = real.stat()
    except (OSError, RuntimeError) as e:
        raise FileRefused("file.missing", f"{shown!r}: {type(e).__name__}", path=shown) from e
    if not real.is_relative_to(root):
        raise FileRefused("file.outside_workspace", f"{shown!r} leads out of the root", path=shown)
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused("file.missing", f"{shown!r} is not a regular file", path=shown)
    if st.st_size > max_bytes:
        raise FileRefused(
            "file.too_large_out",
            f"{shown!r} has {st.st_size} bytes > {max_bytes}",
            name=safe_name(rel.name),
            max_mb=_mb(max_bytes),
        )
    return real


def _shown(rel_path: Any) -> str:
    """The path as it may appear in a message: printable and bounded."""
    if not isinstance(rel_path, str):
        return "?"
    printable = "".join(ch if ch.isprintable() and ch != "`" else "?" for ch in rel_path)
    return printable if len(printable) <= 200 else printable[:200] + "…"


def _read_inside(root: str, real: Path, max_bytes: int) -> bytes:
    """Reads a file checked by resolve_outgoing, walking to it from the root again without
    following links, so nothing swapped in since the check can lead elsewhere."""
    rel = real.relative_to(Path(root).resolve(strict=True))
    dir_fd = _open_dirs(root, rel.parts[:-1], create=False)
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
    mx: Matrix, room_id: str, workspace_root: str, rel_path: str, max_bytes: int
) -> str:
    """Checks, reads, uploads and sends a file an agent returned; the event id.

    The message type follows the MIME type (guessed from the name): m.image, m.audio,
    m.video or m.file, with body and filename the file's name and info the MIME type, size
    and, for PNG, GIF and JPEG, the image's width and height. Raises FileRefused.
    """
    real = resolve_outgoing(workspace_root, rel_path, max_bytes)
    shown = _shown(rel_path)
    name = safe_name(PurePosixPath(rel_path).name)
    try:
        data = await asyncio.to_thread(_read_inside, workspace_root, real, max_bytes)
    except OSError as e:
        cause = f"{shown!r} changed after the check: {e}"
        if e.errno == errno.EFBIG:
            raise FileRefused("file.too_large_out", cause, name=name, max_mb=_mb(max_bytes)) from e
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a link swapped in: never followed
            raise FileRefused("file.outside_workspace", cause, path=shown) from e
        raise FileRefused("file.missing", cause, path=shown) from e
    mime = mimetypes.guess_type(name)[0] or DEFAULT_MIME
    info: dict[str, Any] = {"mimetype": mime, "size": len(data)}
    dims = image_size(data)
    if dims and mime.startswith("image/"):
        info["w"], info["h"] = dims
    try:
        url = await mx.upload(data, mime, name)
        content = {
            "msgtype": msgtype_for(mime),
            "body": name,
            "filename": name,
            "url": url,
            "info": info,
        }
        return await mx.send(room_id, content)
    except HomeserverError as e:
        raise FileRefused("file.upload_failed", f"upload of {shown!r}: {e}", name=name) from e


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
