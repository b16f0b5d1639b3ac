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
    DELTA_TOKEN_KEY,
    SYNC_POSITION_TYPE,
    SYNC_TOKEN_KEY,
    CatchUp,
    SyncPositions,
    merged,
    parse_invites,
    plan_start,
    timelines_of,
)
from .crypto import ENCRYPTED
from .db import Store
from .db.places import FilePlaceTable
from .gate import StartGate
from .intake import Incoming, Kind, classify
from .ledger import Fate, Ledger
from .matrix import HomeserverError
from .part import Part
from .policy import Admission, admit
from .reconcile import Reconciler, Report
from .reconcile.delta import DELTA_MOST, changes_since, reread_changed

Sealed = Callable[[str, str, dict[str, Any]], Coroutine[Any, Any, None]]
SYNC_POSITION_EVERY_S = 60
PRUNE_EVERY_S = 3600
VERIFY_RETRY_S = 30.0  # the first wait after a failed verification (doubling, to 10 min)
VERIFY_TRIES = 6  # about half an hour of outage; a failure that stays is logged, given up
Invite = Callable[[str, str], Awaitable[None]]
Enqueue = Callable[[Incoming, bool], object]


@dataclass(eq=False, kw_only=True)
class Startup(Part):
    """The start hook's work, and the sync position the next start reads from."""

    gate: StartGate
    store: Store
    ledger: Ledger
    reconciler: Reconciler
    catch_up: CatchUp
    enqueue: Enqueue  # a live event's way into its room's queue (Router.enqueue)
    invite: Invite
    # Owners who joined a new chat while the plugin was stopped (maubot drops the first
    # sync, and a start reads only messages): welcomed now.
    joined_meanwhile: Callable[[], Awaitable[None]] | None = None
    sealed: Sealed  # an event still encrypted after a start's read: retried, else told
    background: Callable[[Coroutine[Any, Any, Any]], object]
    places: FilePlaceTable | None = None  # where files landed: aged out with the ledger

    def __post_init__(self) -> None:
        self.registry = self.reconciler.registry
        self.positions = SyncPositions()
        self._first_sync_seen = False
        # maubot's first sync, until the start's catch-up merges it (None once it did).
        self._handed_over: dict[str, list[dict]] | None = {}
        self._saved_position: str | None = None
        self._saved_delta: str | None = None
        # Until this start's catch-up has queued what it read, the stored position is where
        # that catch-up reads from: a start longer than the window must not move it on.
        self._caught_up = False
        self._lock = asyncio.Lock()  # one rebuild at a time (a start, a reset)
        self.verification: object = None  # the background verification after a delta start
        self._missed: asyncio.Future | None = None  # the catch-up's read, begun at the start

    async def run(self) -> None:
        """The start: never raises, never gives up while the homeserver or database is down.
        After a start that read only the changed rooms, every room is verified in the
        background once users are answered again."""
        self.check_encryption()
        self._missed = asyncio.ensure_future(self._read_missed())  # while the rooms are read
        try:
            report = await self._reconcile_until_done()
            invites = await self._catch_up_retried()
        finally:
            await _dropped(self._missed)  # not taken (a stop): let go
            self._missed = None
        report.invites = len(invites)
        self.log.info("Reconciled: %s", report.line())
        self.gate.open()
        if report.delta:
            self.verification = self.background(self.verify())  # a stop cancels it
        await self._pending_invites(invites)
        await self._joined_meanwhile()
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
                    return await self._delta() or await self.reconciler.run()
            except Exception as e:  # homeserver or database down: never give up, never raise
                self.log.warning("Reconciliation failed (%s); retrying in %.0fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60)

    async def _delta(self) -> Report | None:
        """Loads the registry; then, when the database kept its sync position, the rooms
        changed since the stop, read again (None: every room is to be read). The changes are
        asked for while the registry loads: a restart waits for the slower of the two."""
        since = await self.store.get_value(DELTA_TOKEN_KEY) if self.settings().delta_start else None
        reconciler, started, asked = self.reconciler, time.monotonic(), None
        if since:
            requests = reconciler.mx.requests
            asked = asyncio.ensure_future(changes_since(reconciler.mx, since, self.log))
        try:
            await self.registry.load()
        except BaseException:
            await _dropped(asked)
            raise
        if asked is None or not self.registry.users or not self.registry.rooms:
            await _dropped(asked)
            return None  # no position, or a database without its rows: rebuilt in full
        changed = await asked
        settings = self.settings()
        most, read_s = settings.read_batch or DELTA_MOST, settings.delta_read_s
        report = (
            await reread_changed(changed, reconciler.reread, self.log, most, read_s)
            if changed is not None else None
        )  # fmt: skip
        if report is not None:
            report.requests = reconciler.mx.requests - requests
            report.seconds = time.monotonic() - started
            reconciler.last_report = report
        return report

    async def verify(self) -> Report | None:
        """Every room read and reconciled, gently, after a delta start: what the delta
        missed (a change no live handler applies, made while the plugin ran or was down) is
        repaired, and said. Tried again while the homeserver or database fails (a few
        times: None when it never ran); a stop cancels it, and the next start's verification
        reads everything again."""
        delay = VERIFY_RETRY_S
        for tries_left in range(VERIFY_TRIES - 1, -1, -1):
            try:
                async with self._lock:
                    report = await self.reconciler.run(gentle=True)
                break
            except Exception as e:
                if not tries_left:  # not an outage that passes: the next start's verifies
                    self.log.error("Verifying every room failed %d times: %s", VERIFY_TRIES, e)
                    return None
                self.log.warning("Verifying every room failed (%s); again in %.0fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 600)
        if report.repairs():
            self.log.warning("Verified every room: %d repaired: %s", report.repairs(), report.line())
        else:
            self.log.info("Verified every room: nothing to repair (%s)", report.line())
        return report

    async def _catch_up_retried(self) -> list[tuple[str, str]]:
        """The catch-up, tried again a few times while the homeserver stumbles: what users
        sent while the bot was away is not given up at the first error. A failed attempt
        queues nothing (it queues only at its very end, without awaiting)."""
        for attempt, delay in enumerate((1.0, 4.0, 16.0, None)):
            try:
                return await self._catch_up()
            except Exception as e:
                if delay is None:
                    self.log.exception("Catch-up failed; the ledger's unfinished events wait")
                    break
                self.log.warning("Catch-up failed (%s); retry %d in %.0fs", e, attempt + 1, delay)
                await asyncio.sleep(delay)
        self.hand_over(self._take_handed_over({}))  # from now on: the live way
        # Given up: the position may move on again (else it stays old for good, and the
        # next start's read from it walks ever more).
        self._caught_up = True
        return []

    def _take_handed_over(self, merged_already: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Ends the buffering of maubot's first sync; returns what it holds beyond
        ``merged_already`` (what came in while the start read)."""
        buffered, self._handed_over = self._handed_over or {}, None
        return {
            room_id: events[len(merged_already.get(room_id, [])) :]
            for room_id, events in buffered.items()
        }

    async def reconcile_now(self, dry_run: bool) -> Report:
        """``!lambda reconcile``: one run, never at the same time as a start or a reset."""
        async with self._lock:
            return await self.reconciler.run(dry_run=dry_run)

    async def _catch_up(self) -> list[tuple[str, str]]:
        """Queues what was missed (before anything that arrived during the start), merged
        with maubot's first sync and the ledger's unfinished events; returns the pending
        invites the same /sync shows."""
        missed, self._missed = self._missed, None  # the first try's, read during the start
        sync = await (missed if missed is not None else self._read_missed())
        timelines = timelines_of(sync)
        await self.catch_up.mx.crypto.open_all(timelines)
        unfinished = await self.ledger.unfinished()
        taken_rooms = {row.room_id for row in unfinished if row.state == Fate.TAKEN.value}
        recent = await self.catch_up.recent_of(sorted(taken_rooms))
        since_ms = int((time.time() - self.settings().catch_up_s) * 1000)
        handed = {room_id: list(events) for room_id, events in (self._handed_over or {}).items()}
        await self.catch_up.mx.crypto.open_all(handed)
        everything = merged(timelines, handed, recent)
        ids = [e for t in everything.values() for e in _event_ids(t)]
        states = await self.ledger.states_of(ids)
        active = {r.room_id for r in self.registry.rooms.values() if not r.gone and not r.archived}
        bot_id = self.catch_up.mx.user_id
        plan = plan_start(everything, unfinished, states, bot_id, since_ms, active)
        for incoming in plan.without(self._not_answered):
            self.ledger.left(incoming, "not the room's to answer")
        for event_id in plan.answered:  # its answer reached the room before the stop
            await self.ledger.end(event_id, Fate.ANSWERED, "found in the room")
        # From here to the end nothing is awaited: the plan is queued whole, and maubot's
        # first sync, if it ends later, goes the live way (the ledger keeps each once).
        late = self._take_handed_over(handed)
        self.catch_up.queue(plan)
        self._caught_up = True
        self.hand_over(late)
        self._retry_sealed(everything, since_ms, states)
        return parse_invites(sync, self.catch_up.mx.user_id)

    async def _read_missed(self) -> dict[str, Any]:
        """The catch-up's /sync from the stored position (a window back, cut timelines paged
        back through it): what users sent while the plugin was away."""
        window_ms = int((time.time() - self.settings().catch_up_s) * 1000)
        return await self.catch_up.read(await self.stored_position(), window_ms)

    def _not_answered(self, incoming: Incoming) -> bool:
        """A chat room's event from someone it does not answer (policy, as live)."""
        room = self.registry.rooms.get(incoming.room_id)
        return room is not None and admit(room, incoming.sender, self.settings()) is Admission.IGNORE

    def _retry_sealed(self, timelines: dict[str, list[dict]], since_ms: int, done: dict) -> None:
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
                    and isinstance(raw.get("event_id"), str)
                    and raw["event_id"] not in done
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

    async def _joined_meanwhile(self) -> None:
        if self.joined_meanwhile is not None:
            try:
                await self.joined_meanwhile()
            except Exception:
                self.log.exception("Welcoming owners who joined during the start failed")

    async def prune_handled(self) -> None:
        """Forgets the ledger's events, and where their files landed, past
        ``reconcile.handled_kept_days``; one failing leaves the other pruned."""
        kept_ms = int((time.time() - self.settings().handled_kept_s) * 1000)
        places = self.places
        prunes = [("the ledger", self.ledger.prune)]
        if places is not None:
            prunes.append(("the file places", places.prune))
        for what, prune in prunes:
            try:
                await prune(kept_ms)
            except Exception:
                self.log.exception("Pruning %s failed", what)

    async def rebuild(self) -> Report:
        """``reset local``: the plugin's rows dropped and rebuilt from the rooms, with the gate
        closed meanwhile; what arrives during it waits and is handled after."""
        async with self._lock:  # first: a verification running holds it, answering on
            self.gate.close()
            try:
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
        before or after the catch-up has read: before, its events join the start's one
        ordered sequence; after, they go the live way (the encrypted ones once decrypted),
        its invites after the start. The ledger keeps each event handled once."""
        timelines = timelines_of(data)
        invites = parse_invites(data, self.catch_up.mx.user_id)
        if self._handed_over is not None:
            for room_id, events in timelines.items():
                self._handed_over.setdefault(room_id, []).extend(events)
        else:
            self.hand_over(timelines)
        if invites:
            self.background(self._after_start(invites))

    def hand_over(self, timelines: dict[str, list[dict]]) -> None:
        """Events that reached no handler (maubot's first sync after the start, an event
        decrypted late) go the live way now, messages and commands alike; encrypted ones
        once opened, in the background."""
        since_ms = int((time.time() - self.settings().catch_up_s) * 1000)
        sealed = {r: [e for e in t if e.get("type") == ENCRYPTED] for r, t in timelines.items()}
        for room_id, events in timelines.items():
            for raw in events:
                found = classify({**raw, "room_id": room_id}, self.catch_up.mx.user_id)
                if found.kind is not Kind.IGNORED and found.timestamp >= since_ms:
                    self.enqueue(found, True)
        if any(sealed.values()):
            self.background(self._open_late(sealed, since_ms))

    async def _open_late(self, sealed: dict[str, list[dict]], since_ms: int) -> None:
        await self.catch_up.mx.crypto.open_all(sealed)
        opened = {r: [e for e in t if e.get("type") != ENCRYPTED] for r, t in sealed.items()}
        self.hand_over(opened)
        self._retry_sealed(sealed, since_ms, {})

    async def _after_start(self, invites: list[tuple[str, str]]) -> None:
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
        the database and in the bot's account data, when it moved; never before this
        start's catch-up has queued what it read (a start that never caught up leaves the
        position where it was: the next start reads from there again). Also the newest
        position, in the database only: where the next start's delta reads from."""
        if not self._caught_up:
            return
        token = self.positions.older_than(self.settings().catch_up_s)
        newest = self.positions.newest()
        try:
            if newest is not None and newest != self._saved_delta:
                await self.store.set_value(DELTA_TOKEN_KEY, newest)
                self._saved_delta = newest
            if token is not None and token != self._saved_position:
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


async def _dropped(task: asyncio.Future | None) -> None:
    """A read no longer wanted: cancelled, and its end (an error too) awaited, unseen."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _event_ids(events: list[dict]) -> list[str]:
    return [e["event_id"] for e in events if isinstance(e.get("event_id"), str)]
