"""The maubot entry point: wires settings, storage and the feature classes."""

from __future__ import annotations

import asyncio
import time

from maubot import Plugin
from maubot.handlers import event
from mautrix.client import InternalEventType
from mautrix.util.async_db import UpgradeTable
from mautrix.util.config import BaseProxyConfig

from .agents import Agent, create_agent
from .catchup import SYNC_TOKEN_KEY, CatchUp, SyncPositions
from .commands import AdminCommands, ChatCommands, ContextCommands, HelpCommands
from .config import Config, Settings
from .db import Store, upgrade_table
from .matrix import Matrix
from .onboarding import Onboarding
from .reconcile import Reconciler
from .registry import Registry
from .replies import notice_content
from .routing import Router
from .spaces import Spaces

# Handled event ids are kept this long: redeliveries and catch-up come much sooner.
HANDLED_KEPT_S = 7 * 24 * 3600
SYNC_POSITION_EVERY_S = 60


class LambdaBot(Plugin):
    config: Config
    settings: Settings
    store: Store
    registry: Registry
    mx: Matrix
    spaces: Spaces
    onboarding: Onboarding
    reconciler: Reconciler
    router: Router
    ready: asyncio.Event

    @classmethod
    def get_config_class(cls) -> type[BaseProxyConfig]:
        return Config

    @classmethod
    def get_db_upgrade_table(cls) -> UpgradeTable:
        return upgrade_table

    async def start(self) -> None:
        # start() must never raise: maubot disables an instance whose start failed, for good.
        self._tasks: set[asyncio.Task] = set()
        self.stopping = False
        self.positions = SyncPositions()
        self.store = Store(self.database)
        self.router = Router(self)
        self.config.load_and_update()
        self.settings, self.router.agents = self._initial_settings()
        self.registry = Registry(self.store)
        self.mx = Matrix(self.client, self.log)
        self.spaces = Spaces(self)
        self.onboarding = Onboarding(self)
        self.reconciler = Reconciler(self)
        # Handlers are live from here on, but wait for this before acting: nothing is routed
        # on half-built state, and what arrives meanwhile is handled afterwards.
        self.ready = asyncio.Event()
        self.register_handler_class(HelpCommands(self))
        self.register_handler_class(ChatCommands(self))
        self.register_handler_class(ContextCommands(self))
        self.register_handler_class(AdminCommands(self))
        self.register_handler_class(self.router)
        self.register_handler_class(self.onboarding)
        self.background(self._startup())
        self.background(self._keep_sync_position())
        self.log.info("Lambda started with agents %s", ", ".join(self.settings.agents))

    async def stop(self) -> None:
        # Handlers still waiting for the start-up are let go; each returns at once.
        self.stopping = True
        self.ready.set()
        await self.router.stop()
        await self._save_sync_position()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def background(self, coro) -> asyncio.Task:
        """Runs ``coro`` as a task that stop() cancels; its failure is logged."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("Background task failed", exc_info=task.exception())

    async def _startup(self) -> None:
        """Rebuilds the database from Matrix, then opens the gate; retried while it fails."""
        delay = 1.0
        while True:
            try:
                await self.registry.load()
                report = await self.reconciler.run()
                break
            except Exception as e:  # homeserver or database down: never give up, never raise
                self.log.warning("Reconciliation failed (%s); retrying in %.0fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60)
        catch_up = CatchUp(self)
        try:
            # Messages sent while the bot was away go before those that arrived during the
            # start (already queued), so each room is answered in the order it was written.
            commands, invites = await catch_up.queue_missed(self.settings.catch_up_s)
        except Exception:
            self.log.exception("Catch-up failed; messages sent while down stay unanswered")
            commands, invites = [], []
        report.invites = len(invites)
        self.log.info("Reconciled: %s", report.line())
        self.ready.set()
        await catch_up.dispatch_commands(commands)
        # Invites maubot never dispatched (it drops the first sync after a start).
        for room_id, inviter in invites:
            self.log.info("Picking up the pending invite of %s to %s", inviter, room_id)
            try:
                await self.onboarding.handle_invite(room_id, inviter)
            except Exception:
                self.log.exception("Handling the pending invite to %s failed", room_id)
        try:
            await self.store.prune_handled(int((time.time() - HANDLED_KEPT_S) * 1000))
        except Exception:
            self.log.exception("Pruning handled events failed")

    @event.on(InternalEventType.SYNC_SUCCESSFUL)
    async def _sync_done(self, evt: dict) -> None:
        # Runs inside maubot's sync loop: only notes the position, writes nothing.
        # maubot registers this handler before start() runs: positions may not exist yet.
        positions = getattr(self, "positions", None)
        token = (evt.get("data") or {}).get("next_batch")
        if token and positions is not None:
            positions.record(token)

    async def _keep_sync_position(self) -> None:
        while True:
            await asyncio.sleep(SYNC_POSITION_EVERY_S)
            await self._save_sync_position()

    async def _save_sync_position(self) -> None:
        """Stores where the next start's catch-up reads from (a catch-up window back)."""
        token = self.positions.older_than(self.settings.catch_up_s)
        if token is None:
            return
        try:
            await self.store.set_value(SYNC_TOKEN_KEY, token)
        except Exception:
            self.log.exception("Saving the sync position failed")

    def message_handlers(self) -> list:
        """The handlers maubot dispatches events to, as registered by this instance."""
        return list(self._handlers_at_startup)

    async def notify(self, room_id: str, text: str) -> str:
        """Sends a notice (Markdown rendered to HTML); notices never make other bots answer."""
        return await self.mx.send(room_id, notice_content(text))

    def _build(self, config: BaseProxyConfig) -> tuple[Settings, dict[str, Agent]]:
        """Checked settings and their agents, or ValueError naming the first bad key."""
        settings = Settings.from_config(config)
        agents_log = self.log.getChild("agents")
        agents = {
            agent_id: create_agent(spec, self.store, self.http, agents_log)
            for agent_id, spec in settings.agents.items()
        }
        return settings, agents

    def _initial_settings(self) -> tuple[Settings, dict[str, Agent]]:
        try:
            return self._build(self.config)
        except Exception as e:  # any bad value: start() must not raise
            self.log.error("Config refused (%s); starting with the defaults of base-config", e)
            return self._build(self.config.load_base())

    def on_external_config_update(self) -> None:
        self.config.load_and_update()
        try:
            self.settings, self.router.agents = self._build(self.config)
        except Exception as e:  # any bad value: the instance keeps running
            self.log.error("Config refused (%s); the previous config stays in force", e)
            return
        self.log.info("Config reloaded")
