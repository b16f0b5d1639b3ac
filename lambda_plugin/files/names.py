"""Names that are safe on disk: file names, folders for user and room ids, and the refusal
every failure in this package becomes."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import PurePosixPath
from typing import Any

from ..texts import text

FILE_MSGTYPES = ("m.file", "m.image", "m.audio", "m.video")
MAX_NAME_BYTES = 120
MAX_EXT_BYTES = 16
MAX_SEGMENT_CHARS = 64
SEGMENT_HASH_CHARS = 12
FALLBACK_NAME = "file"
DEFAULT_MIME = "application/octet-stream"

_SEPARATORS = re.compile(r"[/\\]")
_WINDOWS_FORBIDDEN = frozenset('<>:"|?*')
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)
_SEGMENT_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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


def user_dir(user_id: str) -> PurePosixPath:
    """The folder of one user, relative to the workspace root: all their rooms' inboxes, and
    the only place their agents' files are sent from."""
    return PurePosixPath("surfaces", "matrix", safe_segment(user_id))


def inbox_dir(user_id: str, room_id: str) -> PurePosixPath:
    """The inbox of one user in one room, relative to the workspace root."""
    return user_dir(user_id) / safe_segment(room_id) / "inbox"


def megabytes(max_bytes: int) -> str:
    """A byte limit as the texts show it, in MB."""
    return f"{max_bytes / (1024 * 1024):g}"
