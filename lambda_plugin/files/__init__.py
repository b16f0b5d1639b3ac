"""Files both ways between chat rooms and the shared workspace, safely.

Incoming media events are written under the workspace root as
``surfaces/matrix/<safe user>/<safe room>/inbox/<UTC timestamp>-<safe name>``; the agent gets
that path relative to the root. Files an agent returns are read from inside the root only and
sent to the room as the right message type.

Every path below the root is walked one component at a time from a descriptor of the root,
never following a symbolic link, so a link swapped in by anyone with write access to the
workspace cannot make the plugin write or read outside it. Every refusal and failure reaches
the caller as a :class:`FileRefused`, which names a text in ``texts.py``.

The package is split by direction: ``names`` (safe names and folders, the refusal),
``disk`` (walking folders without following links), ``encrypted`` (files of encrypted rooms,
opened and made with mautrix's own helpers), ``incoming`` and ``outgoing``.
"""

from __future__ import annotations

from .incoming import caption, fetch_inline, save_incoming
from .names import (
    FILE_MSGTYPES,
    FileRefused,
    inbox_dir,
    safe_name,
    safe_segment,
    user_dir,
)
from .outgoing import (
    image_size,
    msgtype_for,
    resolve_outgoing,
    send_bytes,
    send_outgoing,
    shown_path,
)

__all__ = [
    "FILE_MSGTYPES",
    "FileRefused",
    "caption",
    "fetch_inline",
    "image_size",
    "inbox_dir",
    "msgtype_for",
    "resolve_outgoing",
    "safe_name",
    "safe_segment",
    "save_incoming",
    "send_bytes",
    "send_outgoing",
    "shown_path",
    "user_dir",
]
