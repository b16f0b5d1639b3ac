"""Folders walked from a descriptor of the workspace root, never following a symbolic link."""

from __future__ import annotations

import os
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
