"""Folders walked from a descriptor of the workspace root, never following a symbolic link."""

from __future__ import annotations

import os
import stat
from contextlib import suppress


def open_dirs(root: str, parts: tuple[str, ...], *, create: bool) -> int:
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


def reserve(dir_fd: int, wanted: str) -> str:
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


def unlink_quietly(name: str, dir_fd: int) -> None:
    # Gone already, or nothing more to do: the caller's error says what went wrong.
    with suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


# Measuring a user's folder for the quota is a walk over its entries, done once per incoming
# file (in a thread): capped, so it costs a bounded amount of work (about 25 ms for the 10,000
# entries), never one proportional to whatever an agent has piled up. A folder past the cap
# is taken as full: the user is told the quota is reached, the log says why.
MAX_WALK_ENTRIES = 10_000
MAX_WALK_DEPTH = 32


class WalkTooLong(Exception):
    """The folder has more entries (or deeper folders) than a walk may look at."""


def folder_bytes(root: str, parts: tuple[str, ...]) -> int:
    """Bytes of the regular files in ``root/parts`` and its folders, links neither followed
    nor counted; 0 if there is no such folder. Raises WalkTooLong past MAX_WALK_ENTRIES
    entries or MAX_WALK_DEPTH levels, OSError when the folder cannot be read."""
    try:
        fd = open_dirs(root, parts, create=False)
    except FileNotFoundError:
        return 0
    try:
        return _Walk().size(fd, 0)
    finally:
        os.close(fd)


class _Walk:
    def __init__(self) -> None:
        self.left = MAX_WALK_ENTRIES

    def size(self, dir_fd: int, depth: int) -> int:
        total = 0
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                self.left -= 1
                if self.left < 0:
                    raise WalkTooLong(f"more than {MAX_WALK_ENTRIES} entries")
                if depth >= MAX_WALK_DEPTH:
                    raise WalkTooLong(f"folders more than {MAX_WALK_DEPTH} deep")
                try:
                    total += self.entry_size(entry, dir_fd, depth)
                except FileNotFoundError:
                    continue  # removed while we looked: it takes no room any more
        return total

    def entry_size(self, entry: os.DirEntry, dir_fd: int, depth: int) -> int:
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if not stat.S_ISDIR(st.st_mode):
            return 0
        sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            return self.size(sub, depth + 1)
        finally:
            os.close(sub)
