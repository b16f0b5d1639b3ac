"""A start, end to end: rebuild the database from the rooms, catch up on what was missed,
then open the gate. Also the rebuild of ``!lambda reset local``, with the gate closed.

Live events that arrive meanwhile wait at the gate (their places in their rooms' queues
already taken), and go after what was missed, so each room is answered in the order it was
written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .catchup import (
    SYNC_POSITION_TYPE,
    SYNC_TOKEN_KEY,
    CatchUp,
    SyncPositions,
    parse_invites,
    timelines_of,
    unanswered,
)
from .crypto import ENCRYPTED
from .db import Store
from .gate import StartGate
from .matrix import HomeserverError
from .part import Part
from .reconcile import Reconciler, Report

Sealed = Callable[[str, str, dict[str, Any]], Coroutine[Any, Any, None]]
SYNC_POSITION_EVERY_S = 60
PRUNE_EVERY_S = 3600
Invite = Callable[[str, str], Awaitable[None]]


@dataclass(eq=False, kw_only=True)
class Startup(Part):
    """The start hook's work, and the sync position the next start reads from."""

    gate: StartGate
    store: Store
    reconciler: Reconciler
    catch_up: CatchUp
    invite: Invite
    sealed: Sealed  # an event still encrypted after a start's read: retried, else told
    background: Callable[[Coroutine[Any, Any, Any]], object]

    def __post_init__(self) -> None:
        self.registry = self.reconciler.registry
        self.positions = SyncPositions()
        self._first_sync_seen = False
        self._saved_position: str | None = None
        self._lock = asyncio.Lock()  # one rebuild at a time (a start, a reset)

    async def run(self) -> None:
        """The start: never raises, never gives up while the homeserver or database is down."""
        self.check_encryption()
        report = await self._reconcile_until_done()
        commands, invites = await self._catch_up_retried()
        report.invites = len(invites)
        self.log.info("Reconciled: %s", report.line())
        self.gate.open()
        await self.catch_up.dispatch(commands)
        await self._pending_invites(invites)
        await self.prune_handled()

    def check_encryption(self) -> None:
        """One clear log line when chats must be encrypted and the bot cannot encrypt."""
        if self.settings().encryption == "always" and not self.catch_up.mx.crypto.available:
            self.log.error(
                "spaces.encryption is always, but maubot gave this client no crypto (install"
                " maubot with its encryption extra and give the client a device id): no chat"
                " room will be made until this is fixed"
            )

    async def _reconcile_until_done(self) -> Report:
        delay = 1.0
        while True:
            try:
                async with self._lock:
                    await self.registry.load()
                    return await self.reconciler.run()
            except Exception as e:  # homeserver or database down: never give up, never raise
                self.log.warning("Reconciliation failed (%s); retrying in %.0fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60)

    async def _catch_up_retried(self) -> tuple[list, list[tuple[str, str]]]:
        """The catch-up, tried again a few times while the homeserver stumbles: what users
        sent while the bot was away is not given up at the first error."""
        for attempt, delay in enumerate((1.0, 4.0, 16.0, None)):
            try:
                return await self._catch_up()
            except Exception as e:
                if delay is None:
                    self.log.exception("Catch-up failed; messages sent while down stay unanswered")
                    break
                self.log.warning("Catch-up failed (%s); retry %d in %.0fs", e, attempt + 1, delay)
                await asyncio.sleep(delay)
        return [], []

    async def reconcile_now(self, dry_run: bool) -> Report:
        """``!lambda reconcile``: one run, never at the same time as a start or a reset."""
        async with self._lock:
            return await self.reconciler.run(dry_run=dry_run)

    async def _catch_up(self) -> tuple[list, list[tuple[str, str]]]:
        """Queues what was missed (before anything that arrived during the start); returns
        the missed commands and the pending invites the same /sync shows."""
        sync = await self.catch_up.read(await self.stored_position())
        timelines = timelines_of(sync)
        await self.catch_up.mx.crypto.open_all(timelines)
        candidates = [
            e["event_id"] for t in timelines.values() for e in t if isinstance(e.get("event_id"), str)
        ]
        handled = await self.store.handled_among(candidates)
        since_ms = int((time.time() - self.settings().catch_up_s) * 1000)
        # Commands count in every room (a !chats in the DM too); messages in chat rooms.
        missed = unanswered(timelines, set(timelines), self.catch_up.mx.user_id, since_ms, handled)
        active = {r.room_id for r in self.registry.rooms.values() if not r.gone and not r.archived}
        commands = self.catch_up.queue(missed, active)
        self._retry_sealed(timelines, since_ms, handled)
        return commands, parse_invites(sync, self.catch_up.mx.user_id)

    def _retry_sealed(self, timelines: dict[str, list[dict]], since_ms: int, handled: set) -> None:
        """What a start read and could not decrypt (the keys may come late; maubot never
        dispatched it): each recent one is tried again in the background, else its sender
        is told, as live ones are."""
        for room_id, events in timelines.items():
            for raw in events:
                sender, ts = raw.get("sender"), raw.get("origin_server_ts")
                if (
                    raw.get("type") == ENCRYPTED and isinstance(sender, str)
                    and sender != self.catch_up.mx.user_id
                    and isinstance(ts, int) and ts >= since_ms
                    and raw.get("event_id") not in handled
                ):  # fmt: skip
                    self.background(self.sealed(room_id, sender, raw))

    async def _pending_invites(self, invites: list[tuple[str, str]]) -> None:
        # Invites maubot never dispatched (it drops the first sync after a start).
        for room_id, inviter in invites:
            self.log.info("Picking up the pending invite of %s to %s", inviter, room_id)
            try:
                await self.invite(room_id, inviter)
            except Exception:
                self.log.exception("Handling the pending invite to %s failed", room_id)

    async def prune_handled(self) -> None:
        try:
            kept_ms = int((time.time() - self.settings().handled_kept_s) * 1000)
            await self.store.prune_handled(kept_ms)
        except Exception:
            self.log.exception("Pruning handled events failed")

    async def rebuild(self) -> Report:
        """``reset local``: the plugin's rows dropped and rebuilt from the rooms, with the gate
        closed meanwhile; what arrives during it waits and is handled after."""
        self.gate.close()
        try:
            async with self._lock:
                await self.store.clear_all()
                await self.registry.load()
                return await self.reconciler.run()
        finally:
            self.gate.open()

    def sync_done(self, data: Any) -> None:
        """Runs inside maubot's sync loop, before the sync's events are dispatched: notes
        the position, and hands over what the first sync after a start holds."""
        token = data.get("next_batch") if isinstance(data, dict) else None
        if isinstance(token, str) and token:
            self.positions.record(token)
        if not self._first_sync_seen:
            self._first_sync_seen = True
            self._hand_over(data)

    def _hand_over(self, data: Any) -> None:
        """maubot drops every event of its first sync after a (re)start, and it may end
        after the catch-up has read: its messages and commands go the live way here (the
        encrypted ones once decrypted), its invites after the start. Where maubot did
        dispatch them too, the handled log keeps each answered once."""
        since_ms = int((time.time() - self.settings().catch_up_s) * 1000)
        timelines = timelines_of(data)
        sealed = {
            room_id: [e for e in events if e.get("type") == ENCRYPTED]
            for room_id, events in timelines.items()
        }
        commands = self.catch_up.enqueue_all(timelines, since_ms)
        invites = parse_invites(data, self.catch_up.mx.user_id)
        if commands or invites or any(sealed.values()):
            self.background(self._after_start(commands, invites, sealed, since_ms))

    async def _after_start(
        self, commands: list, invites: list[tuple[str, str]], sealed: dict, since_ms: int
    ) -> None:
        if any(sealed.values()):
            await self.catch_up.mx.crypto.open_all(sealed)
            commands += self.catch_up.enqueue_all(sealed, since_ms)
            self._retry_sealed(sealed, since_ms, set())
        await self.catch_up.dispatch(commands)  # their handlers wait for the gate
        if await self.gate.wait():
            await self._pending_invites(invites)

    async def keep_sync_position(self) -> None:
        """Saves the sync position every minute, and prunes the handled-event log every
        hour while running (not only at a start): it stays bounded however long it runs."""
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(SYNC_POSITION_EVERY_S)
            await self.save_sync_position()
            if time.monotonic() - last_prune >= PRUNE_EVERY_S:
                last_prune = time.monotonic()
                await self.prune_handled()

    async def save_sync_position(self) -> None:
        """Stores where the next start's catch-up reads from (a catch-up window back), in
        the database and in the bot's account data, when it moved."""
        token = self.positions.older_than(self.settings().catch_up_s)
        if token is None or token == self._saved_position:
            return
        try:
            await self.store.set_value(SYNC_TOKEN_KEY, token)
            await self.catch_up.mx.set_account_data(SYNC_POSITION_TYPE, {"since": token})
            self._saved_position = token
        except Exception:
            self.log.exception("Saving the sync position failed")

    async def stored_position(self) -> str | None:
        """Where the catch-up resumes from: the database's, else the account data's."""
        token = await self.store.get_value(SYNC_TOKEN_KEY)
        if token:
            return token
        try:
            data = await self.catch_up.mx.account_data(SYNC_POSITION_TYPE)
        except HomeserverError as e:
            self.log.warning("Reading the stored sync position failed: %s", e)
            return None
        since = (data or {}).get("since")
        return since if isinstance(since, str) and since else None
