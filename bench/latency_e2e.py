"""latency_e2e: the answer latency in an end-to-end-encrypted chat room next to a plain one,
in the same run, samples interleaved.

(a) a plain user in a plain chat room, (b) an encrypting user (``devstack.e2e.E2EUser``, its
own mautrix/olm device) in an encrypted chat room; both with the ``echo`` agent. A sample is
from just before the send (for (b): the client encrypting it included) to the answer being
readable in the user's own sync loop (for (b): decrypted). Both sync loops use the same
filter (``common.SYNC_FILTER``: timelines and invites, typing and receipts left out) and the
same long poll, so what differs is the encryption: the client's, the bot's and the key
traffic they cause.

The bench's instance makes plain chat rooms (``env.PLUGIN_CONFIG``); ``spaces.encryption`` is
``auto`` only while the encrypting user is onboarded, and back to ``never`` after.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from mautrix.types import EventType, FilterID, RoomID, SyncToken

from devstack.e2e import E2EUser
from devstack.matrix import Event, MatrixUser

from .common import (
    CpuMeter,
    LogTail,
    SyncLoop,
    homeserver_requests,
    invite_is_space,
    median,
    percentile,
    wait_idle,
)
from .env import BenchStack
from .latency import exchange, onboard

WARMUP = 3
WELCOME_TIMEOUT = 60


class BenchE2EUser(E2EUser):
    """An ``E2EUser`` synced by an ``E2ESyncLoop``: its syncs use the loop's stored filter (the
    same one as the plain users'), and a send doesn't sync first (the loop keeps membership
    and keys current; a sync there would wait for the loop's long poll)."""

    sync_filter: str | None = None

    async def sync_once(self, timeout_ms: int = 1000) -> None:
        async with self._sync_lock:
            data = await self.client.sync(
                since=SyncToken(self.next_batch) if self.next_batch else None,
                timeout=timeout_ms,
                filter_id=FilterID(self.sync_filter) if self.sync_filter else None,
            )
            self.next_batch = data["next_batch"]
            await self._handle_crypto(data)
            rooms = data.get("rooms", {})
            for room_id, room in rooms.get("join", {}).items():
                await self._handle_joined(room_id, room)
            for room_id, room in rooms.get("invite", {}).items():
                self.invites[room_id] = room.get("invite_state", {}).get("events", [])
                self.left.discard(room_id)
            for room_id, room in rooms.get("leave", {}).items():
                self.invites.pop(room_id, None)
                self.left.add(room_id)
                await self._update_state(room_id, room.get("timeline", {}).get("events", []))
            await self._retry_pending()

    async def send(self, room_id: str, content: dict, event_type: str = "m.room.message") -> str:
        if not await self.is_encrypted(room_id):
            return await MatrixUser.send(self, room_id, content, event_type)
        room = RoomID(room_id)
        if not await self.state_store.has_full_member_list(room):
            await self.client.get_members(room)
        encrypted = await self.client.encrypt(room, EventType.find(event_type), content)
        return await MatrixUser.send(self, room_id, encrypted.serialize(), "m.room.encrypted")


class E2ESyncLoop(SyncLoop):
    """``SyncLoop`` for a ``BenchE2EUser``: the user's own (decrypting) sync, long-polling on
    the same stored filter. ``events(room)`` is the user's timeline, each event with the
    monotonic time it became readable: its sync's arrival when it decrypted at once, else the
    sync after which its keys had come (an event still unreadable stays ``m.room.encrypted``,
    so answer checks pass over it)."""

    user: BenchE2EUser

    def __init__(self, user: BenchE2EUser, poll_ms: int = 10_000) -> None:
        super().__init__(user, poll_ms=poll_ms)
        self.readable_at: dict[str, list[float]] = {}
        self._unread: list[tuple[str, int]] = []

    async def _sync_once(self, timeout_ms: int) -> None:
        self.user.sync_filter = self.filter_id
        await self.user.sync_once(timeout_ms)
        now = time.monotonic()
        self.syncs += 1
        for room_id, timeline in self.user.timelines.items():
            stamps = self.readable_at.setdefault(room_id, [])
            for index in range(len(stamps), len(timeline)):
                stamps.append(0.0)
                self._unread.append((room_id, index))
        still = []
        for room_id, index in self._unread:
            if "decryption_error" in self.user.timelines[room_id][index]:
                still.append((room_id, index))
            else:
                self.readable_at[room_id][index] = now
        self._unread = still
        self._changed.set()

    def events(self, room_id: str) -> list[tuple[float, Event]]:
        timeline = self.user.timelines.get(room_id, [])
        stamps = self.readable_at.get(room_id, [])
        return list(zip(stamps, timeline[: len(stamps)], strict=True))

    def unreadable(self) -> int:
        return len(self._unread)


def _from_bot(loop: SyncLoop, room: str, bot: str, words: str):
    def check() -> bool:
        return any(
            e.get("sender") == bot and words in e.get("content", {}).get("body", "")
            for _, e in loop.events(room)
        )

    return check


async def onboard_encrypted(
    stack: BenchStack, user: BenchE2EUser, loop: E2ESyncLoop
) -> tuple[str, str]:
    """An encrypted DM to the bot with ``spaces.encryption: auto``; joins the Space and the
    chat room it sends, checks the room is encrypted and waits for the decrypted welcome.
    Back to ``never`` after, whatever happened."""
    await stack.configure({"spaces": {"encryption": "auto"}})
    try:
        dm = await user.dm(stack.bot_id, encrypted=True)

        def invites() -> tuple[str, str] | None:
            space = next((r for r, s in user.invites.items() if invite_is_space(s)), None)
            room = next(
                (r for r, s in user.invites.items() if not invite_is_space(s) and r != dm), None
            )
            return (space, room) if space and room else None

        space, room = await loop.wait(invites, 60, "the Space and room invites")
        await user.join(space)
        await user.join(room)
        if not await user.is_encrypted(room):
            raise RuntimeError(f"the chat room {room} is not encrypted")
        welcome = _from_bot(loop, room, stack.bot_id, "!help")
        await loop.wait(welcome, WELCOME_TIMEOUT, "the decrypted welcome")
    finally:
        await stack.configure({"spaces": {"encryption": "never"}})
    return space, room


async def run(stack: BenchStack, samples: int, log) -> dict[str, Any]:
    if not stack.crypto_on:
        raise RuntimeError(f"maubot does not encrypt for the bot: {stack.crypto_status()}")
    # The bot has no cross-signing keys: the client's crypto warns so on every decryption.
    logging.getLogger("devstack.e2e").setLevel(logging.ERROR)
    bot = stack.bot_id
    plain = await stack.user(stack.unique("eplain"))
    plain_loop = SyncLoop(plain)
    e2e = await stack.e2e_user(stack.unique("e2e"), BenchE2EUser)
    e2e_loop = E2ESyncLoop(e2e)
    plain_ms: list[float] = []
    e2e_ms: list[float] = []
    try:
        await plain_loop.start()
        await e2e_loop.start()
        _, _, plain_room = await onboard(stack, plain, plain_loop)
        await plain_loop.wait(
            _from_bot(plain_loop, plain_room, bot, "!help"), WELCOME_TIMEOUT, "the welcome"
        )
        _, e2e_room = await onboard_encrypted(stack, e2e, e2e_loop)
        kinds = {
            "plain": (plain_loop, plain, plain_room, bot),
            "encrypted": (e2e_loop, e2e, e2e_room, bot),
        }
        for kind, args in kinds.items():  # both rooms answer before anything is measured
            await exchange(*args, f"warmup-{kind}-{uuid.uuid4().hex}")
        await wait_idle(stack.pids(), timeout=30)
        for i in range(WARMUP + samples):
            token = f"{i}-{uuid.uuid4().hex[:8]}"
            # interleaved, taking turns going first: both see the same conditions
            order = ("plain", "encrypted") if i % 2 == 0 else ("encrypted", "plain")
            got = {kind: await exchange(*kinds[kind], f"{kind[0]}{token}") for kind in order}
            if i >= WARMUP:
                plain_ms.append(got["plain"])
                e2e_ms.append(got["encrypted"])
        # the CPU and the bot's requests each kind of exchange costs, measured apart
        cpu: dict[str, dict[str, float]] = {}
        bot_requests: dict[str, dict[str, float]] = {}
        n = min(samples, 30)
        hs_log = stack.synapse.dir / "homeserver.log"
        for kind, args in kinds.items():
            await wait_idle(stack.pids(), timeout=10)
            mark = LogTail(hs_log).mark()
            meter = CpuMeter(stack.pids()).start()
            for i in range(n):
                await exchange(*args, f"cpu{kind}{i}-{uuid.uuid4().hex[:8]}")
            cpu[kind] = {
                k.removesuffix("_cpu_s"): round(1000 * v / n, 2) for k, v in meter.stop().items()
            }
            await asyncio.sleep(0.5)  # the last typing-off and Synapse's access log lines
            bot_requests[kind] = {
                name: round(v["count"] / n, 2)
                for name, v in homeserver_requests(hs_log, mark, bot).items()
            }
        unreadable = e2e_loop.unreadable()
    finally:
        for loop in (plain_loop, e2e_loop):
            await loop.stop()

    plain_p50, e2e_p50 = median(plain_ms), median(e2e_ms)
    plain_p95, e2e_p95 = percentile(plain_ms, 95), percentile(e2e_ms, 95)
    paired = [e - p for e, p in zip(e2e_ms, plain_ms, strict=True)]
    log(
        f"latency_e2e: encrypted p50 {e2e_p50:.1f}ms p95 {e2e_p95:.1f}ms, plain p50 "
        f"{plain_p50:.1f}ms p95 {plain_p95:.1f}ms (overhead p50 {e2e_p50 - plain_p50:.1f}ms)"
    )
    return {
        "samples": len(e2e_ms),
        "crypto": stack.crypto_status(),
        "plain_p50_ms": round(plain_p50, 1),
        "plain_p95_ms": round(plain_p95, 1),
        "e2e_p50_ms": round(e2e_p50, 1),
        "e2e_p95_ms": round(e2e_p95, 1),
        "encrypted_overhead_p50_ms": round(e2e_p50 - plain_p50, 1),
        "encrypted_overhead_p95_ms": round(e2e_p95 - plain_p95, 1),
        # per interleaved pair (the same moment for both), the encrypted minus the plain
        "paired_difference_p50_ms": round(median(paired), 1),
        "plain_min_ms": round(min(plain_ms), 1),
        "e2e_min_ms": round(min(e2e_ms), 1),
        "plain_p90_ms": round(percentile(plain_ms, 90), 1),
        "e2e_p90_ms": round(percentile(e2e_ms, 90), 1),
        # events the encrypting user still could not decrypt at the end (0 when all is well)
        "undecryptable": unreadable,
        # "bench" is this process: the encrypting client's own work for "encrypted"
        "cpu_ms_per_exchange": cpu,
        "bot_requests_per_exchange": bot_requests,
    }
