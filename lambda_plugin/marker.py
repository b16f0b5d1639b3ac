"""The plugin's own state event in every managed Space and chat room.

It carries what restart recovery needs, so the rooms themselves are the truth and the
database a cache. Only the bot can send it (power levels), and readers trust it only when
the bot sent it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .db import ChatRoomRow

MARKER_TYPE = "ai.lambda.matrix.room"
MARKER_VERSION = 1
KIND_SPACE = "space"
KIND_CHAT = "chat"
_CHAT_FIELDS = ("chat_id", "agent_id", "platform_chat_id")  # required in a chat's marker


@dataclass(frozen=True, slots=True)
class Marker:
    kind: str
    owner: str
    space_id: str | None = None
    chat_id: str | None = None
    agent_id: str | None = None
    platform_chat_id: str | None = None
    archived: bool = False
    version: int = MARKER_VERSION

    def content(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def state_event(self) -> dict[str, Any]:
        """The marker as an ``initial_state`` entry of createRoom."""
        return {"type": MARKER_TYPE, "state_key": "", "content": self.content()}

    @classmethod
    def for_chat(cls, room: ChatRoomRow, space_id: str | None) -> Marker:
        return cls(
            kind=KIND_CHAT,
            owner=room.user_id,
            space_id=space_id,
            chat_id=room.chat_id,
            agent_id=room.agent_id,
            platform_chat_id=room.platform_chat_id,
            archived=room.archived,
        )

    @classmethod
    def from_content(cls, content: object) -> Marker | None:
        """The marker in ``content``, or None when it is not a well-formed one. Never raises:
        any field of the wrong type makes it not well-formed (null reads as absent)."""
        if not isinstance(content, dict):
            return None
        kind, owner = content.get("kind"), content.get("owner")
        if kind not in (KIND_SPACE, KIND_CHAT) or not isinstance(owner, str) or not owner:
            return None
        texts = {k: content.get(k) for k in ("space_id", *_CHAT_FIELDS)}
        if not all(value is None or isinstance(value, str) for value in texts.values()):
            return None
        if kind == KIND_CHAT and not all(texts[k] for k in _CHAT_FIELDS):
            return None
        archived = content.get("archived")
        version = content.get("version")
        version = MARKER_VERSION if version is None else version
        if not isinstance(archived, (bool, type(None))) or type(version) is not int:
            return None
        return cls(kind=kind, owner=owner, archived=bool(archived), version=version, **texts)
