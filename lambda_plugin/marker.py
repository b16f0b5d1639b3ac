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
    def from_content(cls, content: dict[str, Any]) -> Marker | None:
        """The marker in ``content``, or None when it is not a well-formed one."""
        kind, owner = content.get("kind"), content.get("owner")
        if kind not in (KIND_SPACE, KIND_CHAT) or not isinstance(owner, str):
            return None
        if kind == KIND_CHAT and not all(
            isinstance(content.get(k), str) and content.get(k)
            for k in ("chat_id", "agent_id", "platform_chat_id")
        ):
            return None
        return cls(
            kind=kind,
            owner=owner,
            space_id=content.get("space_id"),
            chat_id=content.get("chat_id"),
            agent_id=content.get("agent_id"),
            platform_chat_id=content.get("platform_chat_id"),
            archived=bool(content.get("archived", False)),
            version=int(content.get("version", MARKER_VERSION)),
        )
