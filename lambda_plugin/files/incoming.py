"""Files sent to a chat room, downloaded into the user's inbox (or into memory)."""

from __future__ import annotations

import asyncio
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any

import aiohttp

from ..agents.base import Attachment
from ..matrix import HomeserverError, Matrix
from .disk import WalkTooLong, folder_bytes, open_dirs, reserve, unlink_quietly
from .encrypted import NoCrypto, Sealed, Undecryptable, crypto, open_sealed, sealed_file
from .names import (
    DEFAULT_MIME,
    FileRefused,
    inbox_dir,
    megabytes,
    safe_name,
    user_dir,
)

CHUNK_BYTES = 64 * 1024
DOWNLOAD_TIMEOUT_S = 60.0

_MIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
_MEDIA_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_SERVER_NAME = re.compile(r"^[A-Za-z0-9.:\[\]-]+$")


def _as_dict(content: Any) -> dict[str, Any]:
    """Event content as a dict: mautrix content objects are serialised, others taken as is."""
    if hasattr(content, "serialize"):
        content = content.serialize()
    return content if isinstance(content, dict) else {}


def caption(content: Any) -> str:
    """The text sent with a file, if any: ``body`` when a separate ``filename`` is given."""
    content = _as_dict(content)
    body, filename = content.get("body"), content.get("filename")
    if isinstance(filename, str) and filename and isinstance(body, str) and body != filename:
        return body
    return ""


OnChunk = Callable[[bytes | bytearray], Awaitable[None]]  # what takes the file's bytes


class _Incoming:
    """What a media event says about its file, checked before anything is downloaded.

    A file in an encrypted room comes as ``file`` (an EncryptedFile, see ``encrypted``)
    instead of ``url``: then ``sealed`` says how to open it, and the sizes checked (declared,
    Content-Length, received) are the ciphertext's, which AES-CTR keeps the same.
    """

    def __init__(self, content: Any, max_bytes: int, deadline_s: float | None = None) -> None:
        content = _as_dict(content)
        self.deadline_s = deadline_s  # the whole download's, in seconds (None: no deadline)
        raw_name = content.get("filename") or content.get("body")
        self.name = safe_name(raw_name if isinstance(raw_name, str) else "")
        self.sealed = self._sealed(content["file"]) if "file" in content else None
        info = content.get("info")
        info = info if isinstance(info, dict) else {}
        mime = info.get("mimetype")
        if not (isinstance(mime, str) and _MIME.match(mime)):
            mime = mimetypes.guess_type(self.name)[0] or DEFAULT_MIME
        self.mime_type = mime.lower()
        self.max_bytes = max_bytes
        self.quota_bytes = 0  # no quota until one is applied
        self.quota_left = 0  # what the user's folder can still take, under a quota
        size = info.get("size")
        self.declared = size if isinstance(size, int) and not isinstance(size, bool) else None
        if self.declared is not None:
            self.check(self.declared, "declared size")
        url = content.get("url") if self.sealed is None else self.sealed.url
        self.server, self.media_id = _parse_mxc(url, self.name)

    def _sealed(self, raw: Any) -> Sealed:
        """The event's EncryptedFile, checked, with the means to open it at hand."""
        try:
            crypto()
            return sealed_file(raw)
        except NoCrypto as e:
            raise FileRefused("file.encrypted", str(e), name=self.name) from e
        except Undecryptable as e:
            raise self.failed(f"encrypted file refused: {e}") from e

    def check(self, size: int, what: str) -> None:
        """Refuses a file of ``size`` bytes (declared, or received so far)."""
        if size > self.max_bytes:
            raise FileRefused(
                "file.too_large",
                f"{what} {size} > {self.max_bytes}",
                name=self.name,
                max_mb=megabytes(self.max_bytes),
            )
        if self.quota_bytes and size > self.quota_left:
            raise self.over_quota(f"{what} {size} > {self.quota_left} left of the user's quota")

    def over_quota(self, cause: str) -> FileRefused:
        return FileRefused("file.quota", cause, name=self.name, max_mb=megabytes(self.quota_bytes))

    def failed(self, cause: str) -> FileRefused:
        return FileRefused("file.download_failed", cause, name=self.name)


def _parse_mxc(url: Any, name: str) -> tuple[str, str]:
    if isinstance(url, str) and url.startswith("mxc://"):
        server, _, media_id = url[len("mxc://") :].partition("/")
        if _SERVER_NAME.match(server) and _MEDIA_ID.match(media_id):
            return server, media_id
    raise FileRefused("file.download_failed", f"not an mxc:// URI: {str(url)[:100]!r}", name=name)


async def _chunks(mx: Matrix, incoming: _Incoming, on_chunk: OnChunk) -> int:
    """Streams the media to ``on_chunk``; its size. Refuses as soon as it passes the limit."""
    size = 0
    try:
        async with mx.download(incoming.server, incoming.media_id, DOWNLOAD_TIMEOUT_S) as resp:
            if resp.content_length is not None:
                incoming.check(resp.content_length, "Content-Length")
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                size += len(chunk)
                incoming.check(size, "body passed")
                await on_chunk(chunk)
    except HomeserverError as e:
        raise incoming.failed(f"download: {e}") from e
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise incoming.failed(f"download: {type(e).__name__}: {e}") from e
    return size


async def _receive(mx: Matrix, incoming: _Incoming, on_chunk: OnChunk) -> int:
    """The file's bytes to ``on_chunk`` (:func:`_download`); its size.

    A plain file streams as it comes. An encrypted one is kept whole in memory, as AES-CTR
    with its hash over the whole ciphertext needs: at most ``max_bytes`` (or what the quota
    leaves), since the ciphertext passes the same checks as it arrives. Its hash is checked,
    it is decrypted in place and handed over at once: nothing unverified is ever written.
    """
    if incoming.sealed is None:
        return await _download(mx, incoming, on_chunk)
    ciphertext = bytearray()

    async def keep(chunk: bytes | bytearray) -> None:
        ciphertext.extend(chunk)

    size = await _download(mx, incoming, keep)
    try:
        plaintext = await open_sealed(ciphertext, incoming.sealed)
    except (NoCrypto, Undecryptable) as e:
        raise incoming.failed(f"encrypted file not opened: {e}") from e
    await on_chunk(plaintext)
    return size


async def _download(mx: Matrix, incoming: _Incoming, on_chunk: OnChunk) -> int:
    """:func:`_chunks`, abandoned past the incoming file's deadline: the read timeout alone
    lets a server that trickles a byte now and then hold a download for ever."""
    deadline_s = incoming.deadline_s
    if deadline_s is None:
        return await _chunks(mx, incoming, on_chunk)
    try:
        return await asyncio.wait_for(_chunks(mx, incoming, on_chunk), deadline_s)
    except asyncio.TimeoutError as e:  # _chunks turns its own timeouts into FileRefused
        raise FileRefused(
            "file.timeout",
            f"download not done in {deadline_s:g} s",
            name=incoming.name,
            seconds=f"{deadline_s:g}",
        ) from e


async def save_incoming(
    mx: Matrix,
    workspace_root: str,
    user_id: str,
    room_id: str,
    content: Any,
    max_bytes: int,
    now: float | None = None,
    quota_bytes: int = 0,
    deadline_s: float | None = None,
) -> Attachment:
    """Downloads a media event's file into the user's inbox for the room, atomically.

    ``content`` is an m.file/m.image/m.audio/m.video content, as a dict or a mautrix object.
    Returns the attachment with ``workspace_path`` relative to the root (posix separators).
    With ``quota_bytes`` (0: no limit), the user's folder (all their rooms) and the new file
    together must stay within it, checked before the download and while it runs.
    A file in an encrypted room (``content.file``) is decrypted once its hash is checked,
    then saved like any other. A download not done in ``deadline_s`` seconds is abandoned.
    Raises FileRefused (nothing left on disk) for an oversize file, a full quota, a failed or
    too slow download, a failed write, or an encrypted file that cannot be opened (its hash,
    key, iv or version wrong: ``file.download_failed``; no crypto library: ``file.encrypted``);
    cancelled, it leaves nothing either and lets the CancelledError through.
    """
    incoming = _Incoming(content, max_bytes, deadline_s)
    if quota_bytes > 0:
        await _apply_quota(incoming, workspace_root, user_id, quota_bytes)
    folder = inbox_dir(user_id, room_id)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    wanted = f"{stamp}-{incoming.name}"
    placed, size = await _download_into(mx, incoming, workspace_root, folder, wanted)
    return Attachment(
        name=incoming.name,
        mime_type=incoming.mime_type,
        size=size,
        workspace_path=str(folder / placed),
    )


async def _download_into(
    mx: Matrix,
    incoming: _Incoming,
    workspace_root: str,
    folder: PurePosixPath,
    wanted: str,
) -> tuple[str, int]:
    """Downloads into a temporary file in the folder, then moves it to a free name like
    ``wanted``; the name and size. Refused, failed or cancelled, it leaves nothing behind."""
    try:
        dir_fd = open_dirs(workspace_root, folder.parts, create=True)
    except OSError as e:
        raise _save_failed(incoming.name, e) from e
    tmp = f".incoming-{secrets.token_hex(8)}.part"
    placed: str | None = None
    done = False
    try:
        size = await _write_temp(mx, incoming, dir_fd, tmp)
        placed = reserve(dir_fd, wanted)
        os.replace(tmp, placed, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        done = True
    except OSError as e:
        raise _save_failed(incoming.name, e) from e
    finally:
        if not done:
            unlink_quietly(tmp, dir_fd)
            if placed is not None:
                unlink_quietly(placed, dir_fd)
        os.close(dir_fd)
    return placed, size


async def _write_temp(mx: Matrix, incoming: _Incoming, dir_fd: int, tmp: str) -> int:
    """Streams the download into a new file ``tmp`` of the folder, synced to disk; its size."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as out:

        async def write(chunk: bytes | bytearray) -> None:
            out.write(chunk)

        size = await _receive(mx, incoming, write)
        out.flush()
        await asyncio.to_thread(os.fsync, out.fileno())
    return size


async def fetch_inline(
    mx: Matrix, content: Any, max_bytes: int, deadline_s: float | None = None
) -> Attachment:
    """Downloads a media event's file into memory (``data``), for when no workspace is set,
    decrypted when it is encrypted; abandoned (FileRefused ``file.timeout``) if not done in
    ``deadline_s`` seconds. Refuses what :func:`save_incoming` refuses."""
    incoming = _Incoming(content, max_bytes, deadline_s)
    chunks: list[bytes | bytearray] = []

    async def keep(chunk: bytes | bytearray) -> None:
        chunks.append(chunk)

    size = await _receive(mx, incoming, keep)
    return Attachment(
        name=incoming.name, mime_type=incoming.mime_type, size=size, data=b"".join(chunks)
    )


async def _apply_quota(
    incoming: _Incoming, workspace_root: str, user_id: str, quota_bytes: int
) -> None:
    """Measures the user's folder and refuses the file now if it cannot fit (by its declared
    size, or at all); what is left bounds the download."""
    incoming.quota_bytes = quota_bytes
    try:
        used = await asyncio.to_thread(folder_bytes, workspace_root, user_dir(user_id).parts)
    except WalkTooLong as e:
        raise incoming.over_quota(f"user's folder not measured: {e}") from e
    except OSError as e:
        raise _save_failed(incoming.name, e) from e
    incoming.quota_left = quota_bytes - used
    incoming.check(incoming.declared or 0, "declared size")


def _save_failed(name: str, error: OSError) -> FileRefused:
    return FileRefused("file.save_failed", f"workspace: {type(error).__name__}: {error}", name=name)
