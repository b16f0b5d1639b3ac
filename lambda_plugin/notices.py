"""What the plugin says in rooms: notices in the configured language."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .intake import ABOUT, ANSWERS
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

    async def say(
        self, room_id: str, key: str, *, reply_to: str | None = None, **values: object
    ) -> str:
        """Sends the text ``key`` with ``values``; returns the notice's event id.
        ``reply_to``: the user's event this answers (recorded in the notice)."""
        return await self.send(room_id, self.text(key, **values), reply_to=reply_to)

    async def note(self, room_id: str, key: str, *, reply_to: str, **values: object) -> str:
        """The same for a notice about a message that does not end it (it is kept for
        !retry): marked ``intake.ABOUT``, so a start never takes it for the answer."""
        return await self.send(room_id, self.text(key, **values), reply_to=reply_to, field=ABOUT)

    async def send(
        self, room_id: str, body: str, *, reply_to: str | None = None, field: str = ANSWERS
    ) -> str:
        return await self.mx.send(room_id, answering(notice_content(body), reply_to, field))


def answering(
    content: dict[str, Any], reply_to: str | None, field: str = ANSWERS
) -> dict[str, Any]:
    """``content`` marked as the bot's answer to the event ``reply_to`` (when there is one),
    or, with ``field=ANSWERING``, as work on it that is not its answer yet."""
    return {**content, field: reply_to} if reply_to else content
