"""The benchmark's own stack: Synapse (raised limits, cheap password hashing, bigger caches),
maubot and the plugin, deployed through devstack exactly as the tests do."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote

from ruamel.yaml import YAML

from devstack.matrix import MatrixUser
from devstack.postgres import Postgres
from devstack.stack import Deployment, deploy, undeploy
from devstack.synapse import RAISED_LIMITS, Synapse

from .agent_server import StreamingAgent
from .common import LogTail, homeserver_requests

if TYPE_CHECKING:
    from devstack.e2e import E2EUser

    E2E = TypeVar("E2E", bound=E2EUser)

BOT_LOCALPART = "lambda_bench"
BOT_PASSWORD = "bot-password"  # what devstack.stack.deploy gives the bot
USER_PASSWORD = "password"

# Merged into homeserver.yaml. Rate limits off the table (as in the tests); bcrypt at its
# cheapest so hundreds of benchmark users register and log in in seconds; an event cache big
# enough that "warm" means warm for a few thousand rooms of ~10 state events each (the
# default 10K would evict during one pass over 2,000 rooms).
BENCH_SYNAPSE_CONFIG = {
    **RAISED_LIMITS,
    "bcrypt_rounds": 4,
    "caches": {"event_cache_size": "200K"},
}

# The plugin's own per-user message limit (base-config: 30 a minute) would answer most of a
# latency run or a burst with "slow down": raised, like Synapse's, so speed is what is measured.
# The benchmark's users are plain clients that can't decrypt: chat rooms stay unencrypted
# (as in the tests), whatever maubot's crypto; latency_e2e turns `auto` on only while its
# encrypting user is onboarded.
# The catch-up window is 30 seconds instead of 10 minutes: the plugin stores where its
# catch-up resumes from only once it has run a whole window, and the reconcile benchmark lets
# it run that long once (see reconcile.py), like a bot that has been up a while, without
# waiting ten minutes. No benchmark sends anything the catch-up would answer.
PLUGIN_CONFIG = {
    "access": {"requests_per_minute": 1_000_000},
    "spaces": {"encryption": "never"},
    "reconcile": {"catch_up_minutes": 0.5},
}
# What the plugin logs when the background verification after a delta start ends.
VERIFICATION_ENDS = (b"Verified every room: ", b"Verifying every room after the start failed")
# The streaming agent of first_words, in agents.registry next to echo (which stays the default).
STREAM_AGENT = "bench_stream"


class BenchStack:
    def __init__(self, engine: str = "sqlite", keep: bool = False) -> None:
        self.engine = engine
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="lambda-bench-"))
        self.root.chmod(0o755)  # PostgreSQL runs as its own user when we are root
        self.synapse = Synapse(self.root / "synapse", limits=BENCH_SYNAPSE_CONFIG)
        self.postgres: Postgres | None = None
        self.dep: Deployment | None = None
        self.log: LogTail | None = None
        self.agent = StreamingAgent()
        self._users: list[MatrixUser] = []
        self._device: MatrixUser | None = None
        self._names = 0

    # life cycle

    async def start(self) -> None:
        await asyncio.to_thread(self.synapse.start)
        if self.engine == "postgres":
            self.postgres = Postgres(self.root / "pg")
            await asyncio.to_thread(self.postgres.start)
        await self.agent.start()
        config = {
            **PLUGIN_CONFIG,
            "agents": {"registry": {STREAM_AGENT: self.agent.config()}},
        }
        try:
            self.dep = await deploy(
                self.root / "maubot",
                self.synapse,
                self.postgres,
                bot_localpart=BOT_LOCALPART,
                config=config,
            )
        except Exception as e:
            why = self._maubot_error()
            raise RuntimeError(f"{e}; maubot says: {why}" if why else str(e)) from e
        self.log = LogTail(self.dep.maubot.log)

    def _maubot_error(self) -> str:
        """The last exceptions maubot logged (why it could not load the plugin, say)."""
        try:
            text = (self.root / "maubot" / "maubot.log").read_text(errors="replace")
        except OSError:
            return ""
        found = [
            line.strip()
            for line in text.splitlines()
            if line[:1] not in (" ", "[") and ("Error" in line or "Exception" in line)
        ]
        return " <- ".join(list(dict.fromkeys(found))[-3:])

    async def stop(self) -> None:
        """Stops everything that was started, whatever state it is in; never raises."""
        for user in self._users:
            with contextlib.suppress(Exception):
                await user.close()
        self._users.clear()
        if self.dep is not None:
            try:
                await undeploy(self.dep)
            except BaseException:
                self.dep.maubot.stop()
        with contextlib.suppress(Exception):
            await self.agent.stop()
        for stop in (self.synapse.stop, self.postgres.stop if self.postgres else None):
            if stop is None:
                continue
            with contextlib.suppress(Exception):
                stop()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def bot_id(self) -> str:
        assert self.dep is not None
        return self.dep.bot_id

    def pids(self) -> dict[str, int | None]:
        assert self.dep is not None
        return {
            "maubot": self.dep.maubot.proc.pid if self.dep.maubot.proc else None,
            "synapse": self.synapse.proc.pid if self.synapse.proc else None,
        }

    # users

    def unique(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    async def user(self, localpart: str) -> MatrixUser:
        """A registered, logged-in user; closed with the stack."""
        user_id = await asyncio.to_thread(self.synapse.register, localpart, USER_PASSWORD)
        login = await asyncio.to_thread(self.synapse.login, user_id, USER_PASSWORD)
        user = MatrixUser(self.synapse.url, user_id, login["access_token"])
        self._users.append(user)
        return user

    async def users(self, prefix: str, count: int, concurrency: int = 8) -> list[MatrixUser]:
        limit = asyncio.Semaphore(concurrency)
        names = [self.unique(prefix) for _ in range(count)]

        async def one(name: str) -> MatrixUser:
            async with limit:
                return await self.user(name)

        return list(await asyncio.gather(*(one(n) for n in names)))

    async def e2e_user(self, localpart: str, cls: type[E2E]) -> E2E:
        """A registered user logged in with its own encrypting device (``cls``, an
        ``E2EUser`` or a subclass); closed with the stack."""
        user_id = await asyncio.to_thread(self.synapse.register, localpart, USER_PASSWORD)
        user = await cls.login(self.synapse.url, user_id, USER_PASSWORD, device_name="bench")
        self._users.append(user)
        assert isinstance(user, cls)  # login() makes a cls
        return user

    async def bot_device(self) -> MatrixUser:
        """The bot's own account on a second device: what the plugin itself could do."""
        login = await asyncio.to_thread(self.synapse.login, self.bot_id, BOT_PASSWORD)
        user = MatrixUser(self.synapse.url, self.bot_id, login["access_token"])
        self._users.append(user)
        return user

    # the plugin instance and the bot client

    async def set_instance_started(self, started: bool) -> None:
        assert self.dep is not None
        await self.dep.maubot.set_started(self.dep.instance_id, started)

    async def set_client_sync(self, sync: bool) -> None:
        assert self.dep is not None
        await self.dep.maubot.api("PUT", f"/client/{self.bot_id}", json={"sync": sync})

    @contextlib.asynccontextmanager
    async def plugin_paused(self) -> AsyncIterator[None]:
        """The plugin stopped and maubot's client not syncing, so the bot's account does only
        what the benchmark does with it; both back, and the plugin serving, afterwards."""
        assert self.log is not None
        await self.set_instance_started(False)
        await self.set_client_sync(False)
        try:
            yield
        finally:
            hs_mark = LogTail(self.synapse.dir / "homeserver.log").mark()
            mark = self.log.mark()
            await self.set_client_sync(True)
            await self._first_sync_done(hs_mark)
            await self.set_instance_started(True)
            await self.log.wait_for("Reconciled: ", mark, 120)
            await self.verification_done()

    async def verification_done(self, timeout: float = 600) -> None:
        """After a delta start, waits until its background verification (a read of every
        room at low concurrency) has ended: a benchmark measured meanwhile would share the
        bot with it. Returns at once after a full start, or one already verified."""
        assert self.log is not None
        text = self.log.read_from(0)
        start = text.rfind(b"Reconciled: ")
        if start < 0 or b"delta=True" not in text[start : text.find(b"\n", start)]:
            return
        deadline = time.monotonic() + timeout
        while not any(end in text[start:] for end in VERIFICATION_ENDS):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no verification ended {timeout:.0f}s after the delta start")
            await asyncio.sleep(0.2)
            text = self.log.read_from(0)

    async def plugin_tables(self) -> list[str]:
        """The plugin's tables, as maubot's database API lists them (the schema's version
        table apart)."""
        assert self.dep is not None
        tables = await self.dep.maubot.api("GET", f"/instance/{self.dep.instance_id}/database")
        return sorted(t for t in tables if t != "version" and not t.startswith("sqlite_"))

    async def wipe_plugin_db(self) -> list[str]:
        """A lost database: every row of every plugin table gone (the schema stays), the
        stored sync position and the handled-event log included. Returns the tables."""
        dep = self.dep
        assert dep is not None
        tables = await self.plugin_tables()
        left = list(tables)
        for _ in range(len(tables) + 1):  # a table another one references goes after it
            failed = []
            for table in left:
                try:
                    await dep.sql(f"DELETE FROM {table}")
                except Exception:
                    failed.append(table)
            if not failed:
                return tables
            left = failed
        raise RuntimeError(f"could not empty the plugin tables {left}")

    def crypto_status(self) -> str:
        """Whether maubot encrypts for the bot client, as devstack found at deploy."""
        assert self.dep is not None
        return self.dep.crypto.describe() if self.dep.crypto else "unknown"

    @property
    def crypto_on(self) -> bool:
        assert self.dep is not None
        return bool(self.dep.crypto and self.dep.crypto.on)

    async def configure(self, changes: dict) -> None:
        """Merges ``changes`` into the instance config (the plugin reloads it live)."""
        assert self.dep is not None
        await self.dep.configure(changes)

    async def instance_config(self) -> dict:
        """The instance's configuration as maubot holds it (base-config merged with ours)."""
        assert self.dep is not None
        instance = await self.dep.maubot.get_instance(self.dep.instance_id)
        return YAML(typ="safe").load(instance["config"]) or {}

    async def sql(self, query: str) -> list[dict]:
        assert self.dep is not None
        return await self.dep.sql(query)

    async def restart_synapse(self) -> float:
        """Restarts the homeserver with empty caches. The bot client stops syncing meanwhile
        (else its sync errors and backs off for up to a minute). Returns the seconds taken."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.set_client_sync(False)
        await asyncio.to_thread(self.synapse.stop)
        await asyncio.to_thread(self.synapse.start)
        hs_log = LogTail(self.synapse.dir / "homeserver.log")
        mark = hs_log.mark()
        await self.set_client_sync(True)
        await self._first_sync_done(mark)
        return loop.time() - started

    async def wake_bot_sync(self) -> None:
        """Wakes maubot's long poll and returns once Synapse has answered it (and a moment
        more): the plugin has noted a fresh sync position, which its next clean stop stores
        (where a delta start reads from)."""
        await self._first_sync_done(LogTail(self.synapse.dir / "homeserver.log").mark())
        await asyncio.sleep(0.3)

    async def _first_sync_done(self, mark: int, timeout: float = 60) -> None:
        """mautrix drops the first sync after the client's sync starts (maubot sets
        ignore_first_sync), so an invite landing in it would never reach the plugin. Account
        data wakes that first long poll at once; this returns when Synapse has answered it."""
        if self._device is None:
            self._device = await self.bot_device()
        path = f"/_matrix/client/v3/user/{quote(self.bot_id)}/account_data/ai.lambda.bench.wake"
        await self._device.request("PUT", path, {"at": time.time()})
        deadline = time.monotonic() + timeout
        log = self.synapse.dir / "homeserver.log"
        while "GET sync (stored filter)" not in homeserver_requests(log, mark, self.bot_id):
            if time.monotonic() > deadline:
                raise TimeoutError("the bot client's first sync after a restart never finished")
            await asyncio.sleep(0.05)
