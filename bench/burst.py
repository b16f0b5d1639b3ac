"""burst: R rooms x M messages sent at once; every message answered once, each room's answers
in the order its messages landed in the timeline (concurrent sends land in any order)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

from devstack.matrix import Event, MatrixUser
from lambda_plugin.intake import ANSWERS

from .common import MAUBOT_SYNC_FILTER, CpuMeter, SyncLoop, median, wait_idle
from .env import BenchStack

SETTLE_S = 2.0
ROUNDS = 2  # bot, plain client, bot, plain client
TOKEN = re.compile(r"burst-\d+-\d+-[0-9a-f]{8}")


def _tokens(loop: SyncLoop, room_id: str, sender: str, answers: bool) -> list[tuple[float, str]]:
    found = []
    for arrived, event in loop.events(room_id):
        if event.get("sender") != sender or event.get("type") != "m.room.message":
            continue
        body = event.get("content", {}).get("body", "")
        if answers and not body.startswith("echo: "):
            continue
        match = TOKEN.search(body)
        if match:
            found.append((arrived, match.group(0)))
    return found


async def run(
    stack: BenchStack, rooms: list[tuple[MatrixUser, str]], per_room: int, log
) -> dict[str, Any]:
    """The burst answered by the bot, then the same burst answered by a plain client on the
    bot's own account (``plain_client_burst``), ``ROUNDS`` times taking turns; the figures
    are the bot's first round, ``vs_plain_client`` = the median of the bot's messages per
    second / the median of the plain client's."""
    await asyncio.gather(*(user.join(room) for user, room in rooms))
    loops = [SyncLoop(user) for user, _ in rooms]
    await asyncio.gather(*(loop.start() for loop in loops))
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    try:
        for _ in range(ROUNDS):
            await stack.verification_done()  # no read of every room going on meanwhile
            ours.append(await measure(stack, rooms, loops, per_room, log, uuid.uuid4().hex[:8]))
            theirs.append(await plain_client_burst(stack, rooms, loops, per_room, log))
    finally:
        for loop in loops:
            await loop.stop()
    result = dict(ours[0])
    rates = [r["msgs_per_s"] or 0.0 for r in ours]
    plain_rates = [r["msgs_per_s"] or 0.0 for r in theirs]
    result["msgs_per_s_runs"], result["plain_msgs_per_s_runs"] = rates, plain_rates
    result["plain_msgs_per_s"] = median(plain_rates)
    result["vs_plain_client"] = (
        round(median(rates) / median(plain_rates), 2) if median(plain_rates) else None
    )
    result["every_round_ok"] = all(
        r["answered"] == r["messages"] and r["in_order"] and not r["duplicates"] for r in ours
    )
    result["plain_client"] = theirs
    return result


async def measure(
    stack: BenchStack,
    rooms: list[tuple[MatrixUser, str]],
    loops: list[SyncLoop],
    per_room: int,
    log,
    run_id: str,
    who: str = "the bot",
) -> dict[str, Any]:
    """One burst (every message ``burst-<room>-<n>-<run_id>``) sent at once; what answered
    it, checked against each room's timeline order."""
    sent = {
        room: [f"burst-{r}-{m}-{run_id}" for m in range(per_room)]
        for r, (_, room) in enumerate(rooms)
    }
    messages = len(rooms) * per_room
    timeout = min(600.0, 30 + 0.5 * messages)
    await wait_idle(stack.pids(), timeout=30)
    before = {room: len(loop.events(room)) for loop, (_, room) in zip(loops, rooms, strict=True)}
    meter = CpuMeter(stack.pids()).start()
    started = time.monotonic()
    await asyncio.gather(
        *(user.send_text(room, f"hello {token}") for user, room in rooms for token in sent[room])
    )
    sent_s = time.monotonic() - started
    if not await _answered(stack, rooms, loops, sent, timeout):
        log(f"burst ({who}): not every message answered within {timeout:.0f}s")
    cpu = meter.stop()
    await asyncio.sleep(SETTLE_S)
    found = _check(stack, rooms, loops, sent, before, started)
    seconds = found.pop("last") - started
    log(f"burst ({who}): {found['answered']}/{messages} answered in {seconds:.2f}s,"
        f" in order: {found['in_order']}")  # fmt: skip
    return {
        "rooms": len(rooms),
        "per_room": per_room,
        "messages": messages,
        **found,
        "seconds": round(seconds, 3),
        "msgs_per_s": round(found["answered"] / seconds, 1) if seconds > 0 else None,
        "send_seconds": round(sent_s, 3),
        "cpu": cpu,
    }


async def _answered(
    stack: BenchStack,
    rooms: list[tuple[MatrixUser, str]],
    loops: list[SyncLoop],
    sent: dict[str, list[str]],
    timeout: float,
) -> bool:
    """Waits until every message sent has an answer in its user's sync (False: timed out)."""

    def all_answered() -> bool:
        return all(
            {t for _, t in _tokens(loop, room, stack.bot_id, True)} >= set(sent[room])
            for loop, (_, room) in zip(loops, rooms, strict=True)
        )

    try:
        await asyncio.wait_for(_until(loops, all_answered), timeout)
    except TimeoutError:
        return False
    return True


def _check(
    stack: BenchStack,
    rooms: list[tuple[MatrixUser, str]],
    loops: list[SyncLoop],
    sent: dict[str, list[str]],
    before: dict[str, int],
    started: float,
) -> dict[str, Any]:
    """Answered, duplicates, in order, whatever else the bot said, the last answer's arrival."""
    answered = duplicates = 0
    others: list[str] = []  # whatever else the bot said meanwhile (errors, "slow down")
    in_order = True
    last = started
    for loop, (user, room) in zip(loops, rooms, strict=True):
        landed = [t for _, t in _tokens(loop, room, user.user_id, False)]
        got = _tokens(loop, room, stack.bot_id, True)
        for _, event in loop.events(room)[before[room] :]:
            body = event.get("content", {}).get("body", "")
            if (
                event.get("sender") == stack.bot_id
                and event.get("type") == "m.room.message"
                and not body.startswith("echo: ")
            ):
                others.append(body[:200])
        tokens = [t for _, t in got if t in sent[room]]
        unique = list(dict.fromkeys(tokens))
        answered += len(unique)
        duplicates += len(tokens) - len(unique)
        if unique != [t for t in landed if t in set(unique)]:
            in_order = False
        if tokens:
            last = max(last, max(a for a, t in got if t in sent[room]))
    return {
        "answered": answered,
        "in_order": in_order,
        "duplicates": duplicates,
        "other_bot_messages": len(others),
        "other_bot_message_example": others[0] if others else None,
        "last": last,
    }


async def _until(loops: list[SyncLoop], check) -> None:
    while not check():
        for loop in loops:
            if loop.error is not None:
                raise RuntimeError(f"sync failed: {loop.error!r}")
        await asyncio.sleep(0.02)


class PlainAnswerer:
    """A plain client on the bot's own account (syncing with maubot's filter) answering each
    message of burst ``run_id`` from its sync loop at once, each room's in their timeline
    order one after another (as the bot must), with the answer the bot gives: a notice
    ``echo: <text>`` naming the message (so the plugin's catch-up, back, sees it answered)."""

    def __init__(self, user: MatrixUser, run_id: str) -> None:
        self.user = user
        self.run_id = run_id
        self.tails: dict[str, asyncio.Task] = {}
        self.loop = SyncLoop(user, on_event=self._on_event, sync_filter=MAUBOT_SYNC_FILTER)

    def _on_event(self, room_id: str, event: Event, _arrived: float) -> None:
        body = event.get("content", {}).get("body", "")
        if (
            event.get("sender") == self.user.user_id
            or event.get("type") != "m.room.message"
            or f"-{self.run_id}" not in body
        ):
            return
        previous = self.tails.get(room_id)
        answer = self._answer(previous, room_id, event["event_id"], body)
        self.tails[room_id] = asyncio.create_task(answer)

    async def _answer(self, previous: asyncio.Task | None, room_id: str, event_id: str, body: str):
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        content = {"msgtype": "m.notice", "body": f"echo: {body}", ANSWERS: event_id}
        await self.user.send(room_id, content)

    async def stop(self) -> None:
        await self.loop.stop()
        tasks = list(self.tails.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def plain_client_burst(
    stack: BenchStack, rooms: list[tuple[MatrixUser, str]], loops: list[SyncLoop], per_room: int,
    log,
) -> dict[str, Any]:  # fmt: skip
    """The same burst answered by a ``PlainAnswerer`` while the plugin is stopped and
    maubot's client does not sync (latency's ``bot_account`` comparison, for a burst)."""
    run_id = uuid.uuid4().hex[:8]
    answerer = PlainAnswerer(await stack.bot_device(), run_id)
    async with stack.plugin_paused():
        await answerer.loop.start()
        try:
            return await measure(stack, rooms, loops, per_room, log, run_id, "a plain client")
        finally:
            await answerer.stop()
