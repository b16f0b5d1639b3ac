"""The whole local stack: Synapse, optionally PostgreSQL, maubot, and the plugin deployed in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .matrix import MatrixUser
from .maubot import CrossSigning, CryptoStatus, Maubot, build_mbp
from .postgres import Postgres
from .procs import wait_until
from .synapse import Synapse

if TYPE_CHECKING:
    from .e2e import E2EUser


@dataclass
class Deployment:
    """One bot account running the plugin in one maubot, with its plugin database engine."""

    maubot: Maubot
    synapse: Synapse
    engine: str
    bot_id: str
    instance_id: str
    users: list[MatrixUser] = field(default_factory=list)
    # Whether maubot encrypts for the bot client (its device id, Olm account), set by deploy().
    crypto: CryptoStatus | None = None
    # Whether deploy() cross-signed the bot's device (None: no crypto, nothing to sign).
    signing: CrossSigning | None = None

    async def user(self, localpart: str, password: str = "password") -> MatrixUser:
        """Registers a user and returns it logged in; closed with the deployment."""
        user_id = self.synapse.register(localpart, password)
        login = self.synapse.login(user_id, password)
        user = MatrixUser(self.synapse.url, user_id, login["access_token"])
        self.users.append(user)
        return user

    async def e2e_user(self, localpart: str, password: str = "password") -> E2EUser:
        """Registers a user and returns it logged in with its own encrypting device (an
        ``E2EUser``, a ``MatrixUser`` on the decrypted timeline); closed with the deployment."""
        from .e2e import E2EUser  # needs python-olm: maubot's encryption extra

        user_id = self.synapse.register(localpart, password)
        user = await E2EUser.login(self.synapse.url, user_id, password)
        self.users.append(user)
        return user

    async def refresh_crypto(self) -> CryptoStatus:
        """Asks maubot again (after a restart, say) whether the bot client encrypts."""
        self.crypto = await self.maubot.crypto_status(self.bot_id)
        return self.crypto

    async def configure(self, changes: dict) -> None:
        await self.maubot.update_config(self.instance_id, changes)

    async def restart_instance(self) -> None:
        await self.maubot.set_started(self.instance_id, False)
        await self.maubot.set_started(self.instance_id, True)

    async def restart_server(self, while_down=None, kill: bool = False) -> None:
        """Stops the whole maubot process (with ``kill``, SIGKILLed: no ``stop()`` runs),
        runs ``while_down()`` if given, starts it again."""
        await self.maubot.close()
        if kill:
            self.maubot.kill()
        else:
            self.maubot.stop()
        if while_down is not None:
            await while_down()
        self.maubot.start()
        await self.maubot.login()

    async def kill_server(self, while_down=None) -> None:
        """SIGKILLs the whole maubot process, runs ``while_down()`` if given, starts it again."""
        await self.restart_server(while_down, kill=True)

    async def sql(self, query: str) -> list[dict]:
        """Runs SQL in the plugin's database through maubot's database API (the UI's tab)."""
        result = await self.maubot.api(
            "POST", f"/instance/{self.instance_id}/database/query", json={"query": query}
        )
        columns = result.get("columns") or []
        return [dict(zip(columns, row, strict=False)) for row in result.get("rows") or []]

    def log_mark(self) -> int:
        return len(self.maubot.log_text())

    def wait_for_log(self, needle: str, after: int = 0, timeout: float = 120) -> str:
        """The first log line containing ``needle`` written after offset ``after``."""
        found: list[str] = []

        def check() -> bool:
            for line in self.maubot.log_text()[after:].splitlines():
                if needle in line:
                    found.append(line)
                    return True
            return False

        wait_until(check, timeout, f"log line {needle!r}", log=self.maubot.log)
        return found[0]

    async def close_users(self) -> None:
        for user in self.users:
            await user.close()
        self.users.clear()


async def deploy(
    state_dir: Path,
    synapse: Synapse,
    postgres: Postgres | None,
    bot_localpart: str,
    instance_id: str = "lambda",
    config: dict | None = None,
    homeserver_url: str | None = None,
) -> Deployment:
    """Starts maubot, uploads the built .mbp and creates the bot client and instance.
    ``homeserver_url``: where maubot's client talks to Synapse (a ``devstack.proxy.FaultProxy``
    in front of it, say); test users always talk to ``synapse.url`` directly."""
    postgres_url = postgres.create_database(f"maubot_{bot_localpart}") if postgres else None
    hs_url = homeserver_url or synapse.url
    maubot = Maubot(state_dir, hs_url, synapse.shared_secret, postgres_url=postgres_url)
    maubot.start()
    try:
        await maubot.login()
        await maubot.upload_plugin(build_mbp())
        bot_id = synapse.register(bot_localpart, "bot-password")
        login = synapse.login(bot_id, "bot-password")
        await maubot.create_client(bot_id, login["access_token"], login["device_id"])
        crypto = await maubot.crypto_status(bot_id)
        # Before the instance starts: its start finds the device cross-signed.
        signing = await maubot.cross_sign(bot_id) if crypto.on else None
        await maubot.create_instance(instance_id, bot_id, config)
    except BaseException:
        await maubot.close()
        maubot.stop()
        raise
    return Deployment(
        maubot=maubot,
        synapse=synapse,
        engine="postgres" if postgres else "sqlite",
        bot_id=bot_id,
        instance_id=instance_id,
        crypto=crypto,
        signing=signing,
    )


async def undeploy(deployment: Deployment) -> None:
    await deployment.close_users()
    await deployment.maubot.close()
    deployment.maubot.stop()
