"""What the plugin says in rooms: notices in the configured language."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import Settings
from .matrix import Matrix
from .replies import notice_content
from .texts import text


@dataclass(eq=False)
class Notices:
    """Sends notices (Markdown rendered to HTML; other bots never answer a notice)."""

    mx: Matrix
    settings: Callable[[], Settings]

    def text(self, key: str, **values: object) -> str:
        return text(self.settings().language, key, **values)

    async def say(self, room_id: str, key: str, **values: object) -> str:
        """Sends the text ``key`` with ``values``; returns the notice's event id."""
        return await self.send(room_id, self.text(key, **values))

    async def send(self, room_id: str, body: str) -> str:
        return await self.mx.send(room_id, notice_content(body))
