"""Applies a reconciliation plan: reads the rooms, plans, writes what the plan says."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..chats import Chats
from ..config import Settings
from ..db import UNIQUE_VIOLATION, ChatRoomRow, Store, now_ms
from ..matrix import HomeserverError, Matrix
from ..registry import Registry
from ..roomstate import STATE_TYPES, RoomState, parse_room
from .plan import Plan, plan
from .report import Report
from .reread import Rereads, Settled, settle_room

READ_CONCURRENCY = 32  # /state reads at once
BATCHES_AT_ONCE = 4  # sliding-sync reads at once (reconcile.read_batch rooms each)
# A verification in the background, while users are answered: one batch, few reads at once.
GENTLE = (1, 4)  # (batches, /state reads) at once
# The sliding-sync connections of a start's reads, one per batch: each read restarts its
# connection, so the homeserver keeps no more than one start's worth of them.
CONN_ID = "ai.lambda.matrix.reconcile"


@dataclass(eq=False)
class Reconciler:
    """Reads the rooms, plans, applies. Takes only what it uses; ``settings`` is called on
    each run, so a config reload in between is seen. Rooms a run could not read are read
    again in the background (``rereads``, run by the plugin) and settled through ``chats``."""

    mx: Matrix
    store: Store
    registry: Registry
    settings: Callable[[], Settings]
    log: logging.Logger
    chats: Chats | None = None  # the one writer of a chat's row: a room read again
    last_report: Report | None = None
    _reported_sealed: set[str] = field(default_factory=set)  # rooms said unreadable once
    _unread: set[str] = field(default_factory=set)  # joined rooms the last read could not read
    sliding_sync: bool = True  # until a batched read fails

    def __post_init__(self) -> None:
        self.rereads = Rereads(self.reread, self.log)

    async def run(self, dry_run: bool = False, gentle: bool = False) -> Report:
        """Reconciles once; returns the report. ``gentle``: at low concurrency (in the
        background, while users are answered)."""
        started = time.monotonic()
        requests_before = self.mx.requests
        # What the plugin knew before reading the rooms: a row that changes while they are
        # read (a !clear, a rename) is newer than what was read, and is left alone.
        known_users, known_rooms = dict(self.registry.users), dict(self.registry.rooms)
        states = await self.read_topology(GENTLE) if gentle else await self.read_topology()
        result = plan(
            states,
            self.mx.user_id,
            self.mx.server_name,
            known_users,
            known_rooms,
            self.settings().default_agent,
            unread=self._unread,
        )
        report = result.report
        report.encrypted_unreadable = self._sealed_rooms(states, result)
        report.dry_run = dry_run
        if not dry_run:
            await self._apply(result, known_rooms)
            self.rereads.replace(report.unreadable_rooms)
        report.requests = self.mx.requests - requests_before
        report.seconds = time.monotonic() - started
        self.last_report = report
        return report

    def _sealed_rooms(self, states: dict[str, RoomState], result: Plan) -> int:
        """Managed chat rooms that are encrypted while the bot cannot decrypt: counted in
        the report, and each said once in the log (not ignored)."""
        if self.mx.crypto.available:
            return 0
        managed = set(result.rooms) | set(self.registry.rooms)
        sealed = [r for r in states.values() if r.encrypted and r.room_id in managed]
        for room in sealed:
            if room.room_id not in self._reported_sealed:
                self._reported_sealed.add(room.room_id)
                self.log.warning(
                    "Chat room %s is end-to-end encrypted, but the bot cannot decrypt: its"
                    " messages stay unanswered until maubot has crypto for this client",
                    room.room_id,
                )
        return len(sealed)

    async def read_topology(
        self, at_once: tuple[int, int] = (BATCHES_AT_ONCE, READ_CONCURRENCY)
    ) -> dict[str, RoomState]:
        """Every joined room's state, parsed as it arrives (only what reconciliation reads
        is kept): in batches through sliding sync where the homeserver has it, one /state
        per room otherwise and for any room a batch did not bring. Pending invites come
        with the catch-up /sync after the start."""
        room_ids = await self.mx.joined_rooms()
        self._unread = set()
        states: dict[str, RoomState] = {}
        size = self.settings().read_batch
        if size and self.sliding_sync and self.mx.device_id:  # sliding sync wants a device
            await self._read_batches(room_ids, size, states, at_once[0])
        left = [room_id for room_id in room_ids if room_id not in states]
        self._unread = await self._read_each(left, states, at_once[1])
        return states

    async def _read_batches(
        self, room_ids: list[str], size: int, states: dict[str, RoomState], at_once: int
    ) -> None:
        mx, limit = self.mx, asyncio.Semaphore(at_once)

        async def read(index: int, batch: list[str]) -> None:
            async with limit:
                if not self.sliding_sync:
                    return  # an earlier batch failed: these are read room by room
                try:
                    found = await mx.rooms_state(batch, STATE_TYPES, f"{CONN_ID}.{index}")
                except HomeserverError as e:
                    self._batch_failed(e)
                    return
            for room_id, events in found.items():
                states[room_id] = parse_room(room_id, events, mx.user_id)

        batches = [room_ids[i : i + size] for i in range(0, len(room_ids), size)]
        await asyncio.gather(*(read(index, batch) for index, batch in enumerate(batches)))

    def _batch_failed(self, e: HomeserverError) -> None:
        """Whatever failed (no sliding sync, a server error, a time-out), the rooms are read
        with /state, which fails the run if the homeserver is really gone; this instance
        asks no more batches, so a server that can't answer them is not made to try again
        and again (the next instance start tries once more)."""
        if not self.sliding_sync:
            return  # said once
        self.sliding_sync = False
        if e.status == 404 or e.errcode == "M_UNRECOGNIZED":
            self.log.info("No sliding sync on the homeserver (%s): rooms are read one by one", e)
        else:
            self.log.warning("A batched read of rooms failed (%s): read one by one instead", e)

    async def _read_each(
        self, room_ids: list[str], states: dict[str, RoomState], at_once: int
    ) -> set[str]:
        """One /state per room, ``at_once`` at a time; returns the unreadable ones."""
        mx, limit = self.mx, asyncio.Semaphore(at_once)
        unreadable: set[str] = set()
        unanswered: list[HomeserverError] = []

        async def read(room_id: str) -> None:
            async with limit:
                try:
                    events = await mx.state(room_id)
                except HomeserverError as e:
                    if e.status == 0:
                        unanswered.append(e)  # a time-out, or the homeserver unreachable
                    # One room that can't be read (broken, or left meanwhile) must not keep
                    # the plugin from starting, nor be taken for gone: it keeps its row.
                    self.log.warning(
                        "Reconciliation could not read %s (%s): it keeps its row and is read"
                        " again in the background", room_id, e,
                    )  # fmt: skip
                    unreadable.add(room_id)
                    return
            states[room_id] = parse_room(room_id, events, mx.user_id)

        await asyncio.gather(*(read(room_id) for room_id in room_ids))
        if unanswered and len(unanswered) == len(room_ids) and not states:
            raise unanswered[0]  # not one room answered: the homeserver is down, run again
        return unreadable

    async def _apply(self, result: Plan, known_rooms: dict[str, ChatRoomRow]) -> None:
        registry = self.registry
        # Every room known before or now, not only those the plan rewrites: a chat archived
        # meanwhile whose read row matched is in no plan row, yet its Space link is planned.
        changed = {
            room_id
            for room_id in known_rooms.keys() | registry.rooms.keys() | result.rooms.keys()
            if registry.rooms.get(room_id) is not known_rooms.get(room_id)
        }
        await self.store.upsert_users(list(result.users.values()))
        # Rooms changed by a command during this run are newer than what was read: left alone.
        rooms = [r for r in result.rooms.values() if r.room_id not in changed]
        await self._write_rows(rooms, result.report)
        for room_id, event_type, state_key, content in result.state_writes:
            # Nor is anything written into such a room, or naming it (a Space's child link:
            # a chat archived meanwhile must not be linked back).
            if room_id in changed or state_key in changed:
                continue
            self.log.debug("Reconciliation writes %s/%s into %s", event_type, state_key, room_id)
            try:
                await self.mx.send_state(room_id, event_type, content, state_key)
            except HomeserverError as e:
                self.log.warning(
                    "Reconciliation could not write %s into %s: %s", event_type, room_id, e
                )
        await registry.load()

    async def _write_rows(self, rooms: list[ChatRoomRow], report: Report) -> None:
        try:
            await self.store.upsert_rooms(rooms)  # one transaction: thousands of rows in one go
        except UNIQUE_VIOLATION:
            # A contradiction the plan could not see (rows it did not know): row by row, so
            # only that room is left as it was and the start goes on.
            for room in rooms:
                try:
                    await self.store.upsert_room(room)
                except UNIQUE_VIOLATION as e:
                    report.conflicts += 1
                    self.log.warning("Reconciliation could not write %s: %s", room.room_id, e)

    async def reread(self, room_id: str) -> None:
        """Reads one room a run could not read and makes its row right (``settle_room``)
        through ``chats``; raises while it still can't be read (``rereads`` tries later)."""
        before = self.registry.rooms.get(room_id)
        room = await self._read_one(room_id)
        registry = self.registry
        settled = settle_room(
            room, room_id, self.mx.user_id, registry.users, registry.rooms,
            self.settings().default_agent, now_ms(),
        )  # fmt: skip
        await self._settle(room_id, before, settled)
        report = self.last_report
        if report is not None and room_id in report.unreadable_rooms:
            report.unreadable_rooms.remove(room_id)

    async def _read_one(self, room_id: str) -> RoomState | None:
        """The room's state; None when the bot is no longer in it (then it is gone). Its own
        membership says so (one small read; a room left still shows its state as it was),
        and /joined_rooms where that read can't tell: only a room not joined is gone."""
        mx = self.mx
        try:
            member = await mx.state_event(room_id, "m.room.member", mx.user_id)
        except HomeserverError as e:
            if e.status != 403:
                raise
            member = None
        if member is None or not isinstance(member.get("membership"), str):
            if room_id not in await mx.joined_rooms():
                return None
        elif member["membership"] != "join":
            return None
        return parse_room(room_id, await mx.state(room_id), mx.user_id)

    async def _settle(self, room_id: str, before: ChatRoomRow | None, settled: Settled) -> None:
        assert self.chats is not None, "a Reconciler that reads rooms again needs the Chats"
        registry, row = self.registry, settled.row
        if settled.conflict:
            self.log.warning("Read %s again: it contradicts another row; left as it is", room_id)
        if settled.space_owner is not None:
            await registry.ensure_user(settled.space_owner)
            await registry.set_space(settled.space_owner, room_id)
            self.log.info("Read %s again: the Space of %s", room_id, settled.space_owner)
        if row is None:
            self.log.info("Read %s again: nothing to change", room_id)
            return
        if row.user_id not in registry.users:
            await registry.ensure_user(row.user_id)  # the row's owner first (its key)
        if before is None:
            if room_id not in registry.rooms:  # else made meanwhile: newer than this read
                await self.chats.add(row)
        else:

            async def fix(current: ChatRoomRow) -> ChatRoomRow | None:
                return row if current is before else None  # changed meanwhile: newer

            try:
                await self.chats.change(room_id, fix)
            except KeyError:
                return  # its row was dropped meanwhile (a reset): the rebuild decides
        self.log.info("Read %s again: its row is made right: %s", room_id, registry.room(room_id))
