"""The start gate: closed while the plugin (re)builds its state from the rooms.

maubot delivers events before ``start()`` has finished; every handler waits here, so nothing
is routed on half-built state, and what arrives meanwhile is handled once the gate opens.
"""

from __future__ import annotations

import asyncio


class StartGate:
    def __init__(self) -> None:
        self._open = asyncio.Event()
        self.stopping = False

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait(self) -> bool:
        """Waits until the gate opens; False when the plugin is stopping (do nothing)."""
        await self._open.wait()
        return not self.stopping

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        """Holds every handler again (a rebuild of the database is under way)."""
        self._open.clear()

    def stop(self) -> None:
        """Lets every waiting handler go; each returns at once."""
        self.stopping = True
        self._open.set()
