"""What the plugin says in rooms: notices in the configured language."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .intake import ABOUT, ANSWERS
from .matrix import Matrix
from .replies import Shown, notice_content
from .texts import text

REFUSED_EVERY_S = 3600.0
REFUSALS_REMEMBERED = 10_000


@dataclass(eq=False)
class Notices:
    """Sends notices (Markdown rendered to HTML; other bots never answer a notice)."""

    mx: Matrix
    settings: Callable[[], Settings]
    # (room, sender, text) -> when last said: refusals go once a while, so nobody can make
    # the bot flood a room (or spend its rate limit) by sending a command it refuses.
    _refused: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def first_in_a_while(self, room_id: str, sender: str, key: str) -> bool:
        """Whether ``key`` was not said to ``sender`` in ``room_id`` this last while."""
        now = time.monotonic()
        if now - self._refused.get((room_id, sender, key), -REFUSED_EVERY_S) < REFUSED_EVERY_S:
            return False
        self._refused[(room_id, sender, key)] = now
        while len(self._refused) > REFUSALS_REMEMBERED:
            del self._refused[next(iter(self._refused))]
        return True

    def text(self, key: str, **values: object) -> str:
        """The text ``key`` as Markdown (a ``Link`` among the values: an anchor on its name)."""
        return text(self.settings().language, key, **_rendered(values, markdown=True))

    def plain(self, key: str, **values: object) -> str:
        """The text ``key`` for a notice's plain body (a ``Link``: its name and URL)."""
        return text(self.settings().language, key, **_rendered(values, markdown=False))

    async def say(
        self, room_id: str, key: str, *, reply_to: str | None = None, **values: object
    ) -> str:
        """Sends the text ``key`` with ``values``; returns the notice's event id.
        ``reply_to``: the user's event this answers (recorded in the notice)."""
        shown = any(isinstance(value, Shown) for value in values.values())
        plain = self.plain(key, **values) if shown else None
        return await self.send(room_id, self.text(key, **values), reply_to=reply_to, plain=plain)

    async def note(self, room_id: str, key: str, *, reply_to: str, **values: object) -> str:
        """The same for a notice about a message that does not end it (it is kept for
        !retry): marked ``intake.ABOUT``, so a start never takes it for the answer."""
        return await self.send(room_id, self.text(key, **values), reply_to=reply_to, field=ABOUT)

    async def send(
        self, room_id: str, body: str, *, reply_to: str | None = None, field: str = ANSWERS,
        plain: str | None = None,
    ) -> str:  # fmt: skip
        """Sends the Markdown ``body`` (``plain``: the plain body, where it differs)."""
        content = notice_content(body, plain=plain)
        return await self.mx.send(room_id, answering(content, reply_to, field))


def _rendered(values: dict[str, object], markdown: bool) -> dict[str, object]:
    def render(value: Shown) -> str:
        return value.markdown() if markdown else value.plain()

    return {k: render(v) if isinstance(v, Shown) else v for k, v in values.items()}


def answering(
    content: dict[str, Any], reply_to: str | None, field: str = ANSWERS
) -> dict[str, Any]:
    """``content`` marked as the bot's answer to the event ``reply_to`` (when there is one),
    or, with ``field=ANSWERING``, as work on it that is not its answer yet."""
    return {**content, field: reply_to} if reply_to else content
