"""The maubot entry point: wires settings, storage and the feature classes."""

from __future__ import annotations

from maubot import Plugin
from mautrix.util.async_db import UpgradeTable
from mautrix.util.config import BaseProxyConfig

from .commands import HelpCommands
from .config import Config, Settings
from .db import Store, upgrade_table
from .spaces import Onboarding


class LambdaBot(Plugin):
    config: Config
    settings: Settings
    store: Store

    @classmethod
    def get_config_class(cls) -> type[BaseProxyConfig]:
        return Config

    @classmethod
    def get_db_upgrade_table(cls) -> UpgradeTable:
        return upgrade_table

    async def start(self) -> None:
        # start() must never raise: maubot disables an instance whose start failed, for good.
        self.config.load_and_update()
        self.settings = self._initial_settings()
        self.store = Store(self.database)
        self.register_handler_class(HelpCommands(self))
        self.register_handler_class(Onboarding(self))
        self.log.info("Lambda started with agents %s", ", ".join(self.settings.agents))

    async def stop(self) -> None:
        pass

    def _initial_settings(self) -> Settings:
        try:
            return Settings.from_config(self.config)
        except ValueError as e:
            self.log.error("Config refused (%s); starting with the defaults of base-config", e)
            return Settings.from_config(self.config.load_base())

    def on_external_config_update(self) -> None:
        self.config.load_and_update()
        try:
            self.settings = Settings.from_config(self.config)
        except ValueError as e:
            self.log.error("Config refused (%s); the previous config stays in force", e)
            return
        self.log.info("Config reloaded")
