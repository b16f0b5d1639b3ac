"""The configured agents: built from settings, swapped on a config reload, looked up by id."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import aiohttp

from ..config import Settings
from ..db import Store
from .base import Agent
from .factory import create_agent


@dataclass(eq=False)
class Agents:
    store: Store
    http: aiohttp.ClientSession
    log: logging.Logger

    def __post_init__(self) -> None:
        self._agents: dict[str, Agent] = {}

    def build(self, settings: Settings) -> dict[str, Agent]:
        """The agents ``settings`` describe; ValueError names the first bad option."""
        return {
            agent_id: create_agent(spec, self.store, self.http, self.log)
            for agent_id, spec in settings.agents.items()
        }

    async def swap(self, agents: dict[str, Agent]) -> None:
        """Puts ``agents`` in force and closes the ones they replace. A request already
        running keeps its agent object to the end; agents share maubot's HTTP session."""
        old, self._agents = self._agents, agents
        await self._close(old.values())

    async def close(self) -> None:
        old, self._agents = self._agents, {}
        await self._close(old.values())

    async def _close(self, agents: Iterable[Agent]) -> None:
        for agent in list(agents):
            try:
                await agent.close()
            except Exception:
                self.log.exception("Closing agent %s failed", agent.agent_id)

    def get(self, agent_id: str) -> Agent | None:
        return self._agents.get(agent_id)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._agents))

    def items(self) -> list[tuple[str, Agent]]:
        return list(self._agents.items())

    async def health(self, timeout_s: float) -> dict[str, str | None]:
        """Each agent's problem (None when healthy); a check past ``timeout_s`` is "timeout"."""
        agents = dict(self._agents)

        async def check(agent_id: str) -> tuple[str, str | None]:
            try:
                return agent_id, await asyncio.wait_for(agents[agent_id].health(), timeout_s)
            except asyncio.TimeoutError:
                return agent_id, "timeout"

        return dict(await asyncio.gather(*(check(agent_id) for agent_id in agents)))
