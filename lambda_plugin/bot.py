"""The maubot entry point: wiring only. Each part gets the collaborators it uses."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from maubot import Plugin
from maubot.handlers import event
from mautrix.client import InternalEventType
from mautrix.util.async_db import UpgradeTable
from mautrix.util.config import BaseProxyConfig

from .agents import Agent, Agents
from .answering import Answerer
from .attachments import FileService
from .catchup import CatchUp
from .chats import Chats
from .commands import (
    AdminCommands,
    ChatCommands,
    CommandArgs,
    CommandBase,
    ContextCommands,
    HelpCommands,
    UsageCommands,
    command_names,
)
from .config import Config, Settings, UserMatcher, users_of
from .conversation import Conversation
from .crypto import check_at_start
from .db import HistoryBounds, Store, upgrade_table
from .db.joins import JoinsTable
from .db.places import FilePlaceTable
from .gate import StartGate
from .ledger import Ledger
from .matrix import Matrix
from .notices import Notices
from .onboarding import Onboarding
from .part import PartArgs
from .queue import RoomQueues
from .reactions import Reactions
from .reanswer import Reanswers
from .reconcile import Reconciler
from .registry import Registry
from .replay import CommandReplay
from .routing import Router
from .spaces import Spaces
from .startup import Startup
from .undecryptable import Undecryptable
from .usage import Quota
from .voice import Voice
from .welcome import Welcomes

COMMAND_CLASSES = (HelpCommands, ChatCommands, ContextCommands, UsageCommands, AdminCommands)


class LambdaBot(Plugin):
    config: Config
    settings: Settings

    @classmethod
    def get_config_class(cls) -> type[BaseProxyConfig]:
        return Config

    @classmethod
    def get_db_upgrade_table(cls) -> UpgradeTable:
        return upgrade_table

    async def start(self) -> None:
        # start() must never raise: maubot disables an instance whose start failed, for good.
        self._tasks: set[asyncio.Task] = set()
        self.gate = StartGate()
        assert self.database is not None  # maubot.yaml asks for a database
        self.store = Store(
            self.database, lambda: self.settings.database_wait_s, self._history_bounds
        )
        self.agents = Agents(self.store, self.http, self.log.getChild("agents"))
        self.config.load_and_update()
        self.settings, agents = self._initial_settings()
        await self.agents.swap(agents)
        self._wire()
        self.background(self.startup.run())
        self.background(self.startup.keep_sync_position())
        self.background(self.reconciler.rereads.run())  # rooms a reconciliation couldn't read
        self.background(check_at_start(self.mx, self.log))  # one line if not cross-signed
        self.log.info("Lambda started with agents %s", ", ".join(self.settings.agents))

    def _wire(self) -> None:
        """The parts, each given what it uses; the handler classes registered."""
        part: PartArgs = {"settings": self.current_settings, "log": self.log}
        gate, store, mx = self.gate, self.store, Matrix(self.client, self.log)
        self.mx = mx
        mx.outage_s = lambda: self.settings.homeserver_wait_s
        registry = self.registry = Registry(store)
        self.places = FilePlaceTable(store.db)  # where users' files landed in the workspace
        ledger = self.ledger = Ledger(
            store=store, bot_id=lambda: mx.user_id, background=self.background, **part
        )
        chats = Chats(registry, mx, self.log)
        notices = Notices(mx, self.current_settings)
        conversation = self._conversation(part, mx, registry, notices)
        queues = self.queues = RoomQueues(
            conversation, gate, self.log, max_places=lambda: self.settings.max_queue_per_room
        )
        spaces = Spaces(mx=mx, store=store, chats=chats, **part)
        reconciler = self.reconciler = Reconciler(
            mx, store, registry, self.current_settings, self.log, chats=chats
        )
        onboarding = self._onboarding(part, mx, spaces, chats, notices)
        welcomes = onboarding.welcomes
        router = Router(
            queues=queues, ledger=ledger, registry=registry, gate=gate, notices=notices,
            command_names=command_names(COMMAND_CLASSES), **part,
        )  # fmt: skip
        catch_up = CatchUp(mx, queues, self.log, lambda: self.settings.catch_up_max_events)
        undecryptable = Undecryptable(
            mx=mx, notices=notices, enqueue=router.enqueue, registry=registry, **part
        )
        self.startup = Startup(
            gate=gate, store=store, ledger=ledger, reconciler=reconciler, catch_up=catch_up,
            enqueue=router.enqueue, invite=onboarding.handle_invite,
            joined_meanwhile=lambda: welcomes.joined_meanwhile(
                list(registry.rooms.values()), self.settings.catch_up_s
            ),
            sealed=undecryptable.attempt, background=self.background, places=self.places,
            **part,
        )  # fmt: skip
        commands = self._commands(notices, registry, chats, spaces, reconciler)
        reactions = Reactions(
            gate=gate, mx=mx, registry=registry, queues=queues, route=router.route, **part
        )
        for handlers in (*commands, router, onboarding, undecryptable, reactions):
            self.register_handler_class(handlers)

    def _onboarding(
        self, part: PartArgs, mx: Matrix, spaces: Spaces, chats: Chats, notices: Notices
    ) -> Onboarding:
        """Invites, joins and welcomes: who gets a Space, and the welcome on their join."""
        return Onboarding(
            gate=self.gate, mx=mx, spaces=spaces, chats=chats, notices=notices,
            joins=JoinsTable(self.store.db), welcomes=Welcomes(mx=mx, notices=notices, **part),
            **part,
        )  # fmt: skip

    def _conversation(
        self, part: PartArgs, mx: Matrix, registry: Registry, notices: Notices
    ) -> Conversation:
        """A message's way from the room's queue to the answer: policy, quota, voice, files."""
        files = FileService(mx=mx, notices=notices, places=self.places, **part)
        quota = Quota(store=self.store, **part)
        voice = Voice(mx=mx, notices=notices, http=self.http, **part)
        answerer = Answerer(
            mx=mx, registry=registry, agents=self.agents, files=files, notices=notices,
            voice=voice, quota=quota, ledger=self.ledger, places=self.places, **part,
        )  # fmt: skip
        reanswers = Reanswers(mx=mx, ledger=self.ledger, notices=notices, **part)
        return Conversation(
            gate=self.gate, ledger=self.ledger, registry=registry, answerer=answerer,
            reanswers=reanswers,
            notices=notices, quota=quota, command_names=command_names(COMMAND_CLASSES),
            replay=CommandReplay(self.client, self.message_handlers, self.log), **part,
        )  # fmt: skip

    def _commands(
        self, notices: Notices, registry: Registry, chats: Chats, spaces: Spaces,
        reconciler: Reconciler,
    ) -> tuple[CommandBase, ...]:  # fmt: skip
        base: CommandArgs = {
            "gate": self.gate, "store": self.store, "ledger": self.ledger, "notices": notices,
            "settings": self.current_settings, "log": self.log,
        }  # fmt: skip
        agents, queues = self.agents, self.queues
        return (
            HelpCommands(**base),
            ChatCommands(
                registry=registry, spaces=spaces, agents=agents, queues=queues,
                server_name=notices.mx.server_name, **base,
            ),
            ContextCommands(registry=registry, chats=chats, agents=agents, queues=queues, **base),
            UsageCommands(registry=registry, **base),
            AdminCommands(
                reconciler=reconciler, spaces=spaces, agents=agents, queues=queues,
                rebuild=self.startup.rebuild, reconcile_now=self.startup.reconcile_now, **base,
            ),
        )

    def current_settings(self) -> Settings:
        return self.settings

    def _history_bounds(self) -> HistoryBounds:
        return HistoryBounds(self.settings.history_max_turns, self.settings.history_max_bytes)

    async def stop(self) -> None:
        # Handlers still waiting for the start-up are let go; each returns at once.
        self.gate.stop()
        await self.queues.stop()
        await self.startup.save_sync_position()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.agents.close()

    def background(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Runs ``coro`` as a task that stop() cancels; its failure is logged."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("Background task failed", exc_info=task.exception())

    @event.on(InternalEventType.SYNC_SUCCESSFUL)
    async def _sync_done(self, evt: dict) -> None:
        # Runs inside maubot's sync loop: only notes the position, writes nothing.
        # maubot registers this handler before start() runs: the parts may not exist yet.
        startup = getattr(self, "startup", None)
        if startup is not None and isinstance(evt, dict):
            startup.sync_done(evt.get("data"))

    def message_handlers(self) -> list:
        """The handlers maubot dispatches events to, as registered by this instance."""
        return list(self._handlers_at_startup)

    def _build(self, config: Any) -> tuple[Settings, dict[str, Agent]]:
        """Checked settings and their agents, or ValueError naming the first bad key."""
        settings = Settings.from_config(config)
        return settings, self.agents.build(settings)

    def _initial_settings(self) -> tuple[Settings, dict[str, Agent]]:
        try:
            return self._build(self.config)
        except Exception as e:  # any bad value: start() must not raise
            settings, agents = self._build(self.config.load_base())
            # Who may use the bot stays the operator's: the defaults let everyone in. Only
            # when that list itself can't be read is nobody let in (failing closed).
            allowed, admins = _access_lists(self.config)
            self.log.error(
                "Config refused (%s); starting with the defaults of base-config%s", e,
                "" if allowed else ", with nobody allowed to use the bot until"
                " access.allowed_users is fixed",
            )  # fmt: skip
            return replace(
                settings,
                allowed_users=allowed or UserMatcher([]),
                admins=admins or UserMatcher([]),
            ), agents

    def on_external_config_update(self) -> None:
        self.config.load_and_update()
        try:
            self.settings, agents = self._build(self.config)
        except Exception as e:  # any bad value: the instance keeps running
            self.log.error("Config refused (%s); the previous config stays in force", e)
            return
        self.startup.check_encryption()
        self.background(self.agents.swap(agents))
        self.log.info("Config reloaded")


def _access_lists(config: BaseProxyConfig) -> tuple[UserMatcher | None, UserMatcher | None]:
    """The operator's access.allowed_users and access.admins, each None when unreadable."""
    found: list[UserMatcher | None] = []
    for key in ("access.allowed_users", "access.admins"):
        try:
            found.append(users_of(config[key], key))
        except Exception:
            found.append(None)
    return found[0], found[1]
