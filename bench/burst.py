"""burst: R rooms x M messages sent at once; every message answered once, each room's answers
in the order its messages landed in the timeline (concurrent sends land in any order)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

from devstack.matrix import MatrixUser

from .common import CpuMeter, SyncLoop, wait_idle
from .env import BenchStack

SETTLE_S = 2.0
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
    await asyncio.gather(*(user.join(room) for user, room in rooms))
    loops = [SyncLoop(user) for user, _ in rooms]
    await asyncio.gather(*(loop.start() for loop in loops))
    run_id = uuid.uuid4().hex[:8]
    sent = {
        room: [f"burst-{r}-{m}-{run_id}" for m in range(per_room)]
        for r, (_, room) in enumerate(rooms)
    }
    messages = len(rooms) * per_room
    timeout = min(600.0, 30 + 0.5 * messages)
    try:
        await wait_idle(stack.pids(), timeout=30)
        before = {
            room: len(loop.events(room)) for loop, (_, room) in zip(loops, rooms, strict=True)
        }
        meter = CpuMeter(stack.pids()).start()
        started = time.monotonic()
        await asyncio.gather(
            *(
                user.send_text(room, f"hello {token}")
                for user, room in rooms
                for token in sent[room]
            )
        )
        sent_s = time.monotonic() - started

        def all_answered() -> bool:
            return all(
                {t for _, t in _tokens(loop, room, stack.bot_id, True)} >= set(sent[room])
                for loop, (_, room) in zip(loops, rooms, strict=True)
            )

        try:
            await asyncio.wait_for(_until(loops, all_answered), timeout)
        except TimeoutError:
            log(f"burst: not every message answered within {timeout:.0f}s")
        cpu = meter.stop()
        await asyncio.sleep(SETTLE_S)
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
            tokens = [t for _, t in got]
            unique = list(dict.fromkeys(tokens))
            answered += len(set(unique) & set(sent[room]))
            duplicates += len(tokens) - len(unique)
            if unique != [t for t in landed if t in set(unique)]:
                in_order = False
            if got:
                last = max(last, max(a for a, _ in got))
    finally:
        for loop in loops:
            await loop.stop()
    seconds = last - started
    log(f"burst: {answered}/{messages} answered in {seconds:.2f}s, in order: {in_order}")
    return {
        "rooms": len(rooms),
        "per_room": per_room,
        "messages": messages,
        "answered": answered,
        "in_order": in_order,
        "seconds": round(seconds, 3),
        "msgs_per_s": round(answered / seconds, 1) if seconds > 0 else None,
        "duplicates": duplicates,
        "send_seconds": round(sent_s, 3),
        "other_bot_messages": len(others),
        "other_bot_message_example": others[0] if others else None,
        "cpu": cpu,
    }


async def _until(loops: list[SyncLoop], check) -> None:
    while not check():
        for loop in loops:
            if loop.error is not None:
                raise RuntimeError(f"sync failed: {loop.error!r}")
        await asyncio.sleep(0.02)
