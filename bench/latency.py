"""latency: send -> the bot's echo answer arriving in the user's sync, next to the physical
limit: the same exchange between two plain users, one answering the other at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from devstack.matrix import Event, MatrixUser

from .common import (
    MAUBOT_SYNC_FILTER,
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
from .profile import Profiler

SAMPLE_TIMEOUT = 30


async def onboard(stack: BenchStack, user: MatrixUser, loop: SyncLoop) -> tuple[str, str, str]:
    """DM to the bot; waits for the Space and first room invites and joins both."""
    dm = await user.dm(stack.bot_id)

    def invites() -> tuple[str, str] | None:
        space = next((r for r, (_, s) in loop.invites.items() if invite_is_space(s)), None)
        room = next(
            (r for r, (_, s) in loop.invites.items() if not invite_is_space(s) and r != dm), None
        )
        return (space, room) if space and room else None

    space, room = await loop.wait(invites, 60, "the Space and room invites")
    await user.join(space)
    await user.join(room)
    return dm, space, room


def _answer(loop: SyncLoop, room_id: str, sender: str, token: str, after: int):
    """The arrival time of ``sender``'s answer naming ``token`` among the room's events past
    index ``after``; anything else ``sender`` says there fails the sample at once."""

    def check() -> float | None:
        for arrived, event in loop.events(room_id)[after:]:
            if event.get("sender") != sender or event.get("type") != "m.room.message":
                continue
            body = event.get("content", {}).get("body", "")
            if token in body:
                return arrived
            raise RuntimeError(f"{sender} answered something else: {body[:200]!r}")
        return None

    return check


async def exchange(
    loop: SyncLoop, user: MatrixUser, room_id: str, answerer: str, token: str
) -> float:
    """Milliseconds from just before the send to the answer's arrival in ``user``'s sync."""
    after = len(loop.events(room_id))
    sent = time.monotonic()
    await user.send_text(room_id, f"ping {token}")
    check = _answer(loop, room_id, answerer, token, after)
    arrived = await loop.wait(check, SAMPLE_TIMEOUT, f"the answer to {token}")
    return (arrived - sent) * 1000


class PlainPair:
    """The physical limit a bot's round trip is set against: two plain users, B answering A
    from its own sync loop at once, in a room of their own. ``answerer``, if given, is B (a
    plain client on the bot's own account, say); it leaves the room at the end."""

    def __init__(
        self,
        stack: BenchStack,
        prefix: str,
        answerer: MatrixUser | None = None,
        answerer_filter: dict[str, Any] | None = None,
    ) -> None:
        self.stack = stack
        self.prefix = prefix
        self.answerer = answerer
        self.answerer_filter = answerer_filter
        self.answers: set[asyncio.Task] = set()
        self.loops: list[SyncLoop] = []

    async def start(self) -> None:
        users = await self.stack.users(self.prefix, 1 if self.answerer else 2)
        self.a, self.b = users[0], self.answerer or users[1]
        self.a_loop = SyncLoop(self.a)
        b_loop = SyncLoop(self.b, on_event=self._answer_at_once, sync_filter=self.answerer_filter)
        self.loops = [self.a_loop, b_loop]
        self.room = await self.a.create_room(preset="private_chat", invite=[self.b.user_id])
        await self.b.join(self.room)
        for loop in self.loops:
            await loop.start()

    def _answer_at_once(self, room_id: str, event: Event, _arrived: float) -> None:
        body = event.get("content", {}).get("body", "")
        if event.get("sender") == self.a.user_id and body.startswith("ping "):
            task = asyncio.create_task(self.b.send_text(room_id, "re: " + body[5:]))
            self.answers.add(task)
            task.add_done_callback(self.answers.discard)

    def exchange_args(self) -> tuple[SyncLoop, MatrixUser, str, str]:
        return self.a_loop, self.a, self.room, self.b.user_id

    async def exchange(self, token: str) -> float:
        """Milliseconds of one plain round trip (see :func:`exchange`)."""
        return await exchange(*self.exchange_args(), token)

    async def stop(self) -> None:
        for loop in self.loops:
            await loop.stop()
        for task in list(self.answers):
            task.cancel()
        if self.answerer is not None:
            await self.b.leave(self.room)  # nothing of it is left for the plugin


async def bot_account_round_trips(stack: BenchStack, pair: PlainPair, n: int) -> dict[str, Any]:
    """Where the bot's overhead goes: the same round trip answered at once by a plain client
    on the bot's own account (in every room the bot is in, syncing with maubot's filter), with
    the plugin stopped and maubot's client not syncing, interleaved with the two plain users
    again."""
    warmup = 3
    answerer = await stack.bot_device()
    account = PlainPair(stack, stack.unique("acct"), answerer, MAUBOT_SYNC_FILTER)
    account_ms: list[float] = []
    raw_ms: list[float] = []
    async with stack.plugin_paused():
        await account.start()
        try:
            for i in range(warmup + n):
                token = f"{i}-{uuid.uuid4().hex[:8]}"
                account_sample = await account.exchange("a" + token)
                raw_sample = await pair.exchange("q" + token)
                if i >= warmup:
                    account_ms.append(account_sample)
                    raw_ms.append(raw_sample)
        finally:
            await account.stop()
    account_p50, raw_p50 = median(account_ms), median(raw_ms)
    return {
        "samples": n,
        "p50_ms": round(account_p50, 1),
        "raw_p50_ms": round(raw_p50, 1),
        "overhead_p50_ms": round(account_p50 - raw_p50, 1),
    }


async def run(
    stack: BenchStack, samples: int, log, profile_dir: Path | None = None
) -> dict[str, Any]:
    warmup = 3
    # the bot's side
    user = await stack.user(stack.unique("latency"))
    user_loop = SyncLoop(user)
    await user_loop.start()
    pair = PlainPair(stack, "raw")
    try:
        _, _, room = await onboard(stack, user, user_loop)
        await pair.start()
        bot_ms: list[float] = []
        raw_ms: list[float] = []
        # the first answer also proves the bot's sync runs (after homeserver restarts)
        await exchange(user_loop, user, room, stack.bot_id, "warmup-0-" + uuid.uuid4().hex)
        await wait_idle(stack.pids(), timeout=30)
        for i in range(warmup + samples):  # interleaved: both see the same conditions
            token = f"{i}-{uuid.uuid4().hex[:8]}"
            bot = await exchange(user_loop, user, room, stack.bot_id, "b" + token)
            raw = await pair.exchange("r" + token)
            if i >= warmup:
                bot_ms.append(bot)
                raw_ms.append(raw)
        # CPU each kind of exchange costs each process, measured apart
        cpu: dict[str, dict[str, float]] = {}
        profiles: dict[str, Any] = {}
        bot_requests: dict[str, Any] = {}
        n = min(samples, 30)
        for kind, args in (
            ("bot", (user_loop, user, room, stack.bot_id)),
            ("raw", pair.exchange_args()),
        ):
            await wait_idle(stack.pids(), timeout=10)
            profilers = []
            if profile_dir is not None:
                for name, pid in stack.pids().items():
                    prof = Profiler(pid, profile_dir / f"latency-{kind}-{name}.txt")
                    if pid and prof.start():
                        profilers.append((name, prof))
                await asyncio.sleep(0.5)
            hs_log = stack.synapse.dir / "homeserver.log"
            hs_mark = LogTail(hs_log).mark()
            meter = CpuMeter(stack.pids()).start()
            for i in range(n):
                await exchange(*args, f"cpu{kind}{i}-{uuid.uuid4().hex[:8]}")
            cpu[kind] = {
                k.removesuffix("_cpu_s"): round(1000 * v / n, 2) for k, v in meter.stop().items()
            }
            if kind == "bot":
                await asyncio.sleep(0.5)  # the last typing-off and log lines
                bot_requests = {
                    name: {
                        "per_exchange": round(v["count"] / n, 2),
                        "hs_ms_per_exchange": round(1000 * v["seconds"] / n, 1),
                        "hs_cpu_ms_per_exchange": round(1000 * v["cpu"] / n, 1),
                    }
                    for name, v in homeserver_requests(hs_log, hs_mark, stack.bot_id).items()
                }
            for name, prof in profilers:
                profiles[f"{kind}_{name}"] = prof.stop()
        account = await bot_account_round_trips(stack, pair, samples)
    finally:
        await user_loop.stop()
        await pair.stop()
    bot_p50, raw_p50 = median(bot_ms), median(raw_ms)
    log(f"latency: bot p50 {bot_p50:.1f}ms, raw p50 {raw_p50:.1f}ms")
    log(
        f"latency: a plain client on the bot's account p50 {account['p50_ms']:.1f}ms,"
        f" raw p50 {account['raw_p50_ms']:.1f}ms (plugin stopped)"
    )
    return {
        "samples": len(bot_ms),
        "bot_p50_ms": round(bot_p50, 1),
        "bot_p99_ms": round(percentile(bot_ms, 99), 1),
        "raw_p50_ms": round(raw_p50, 1),
        "raw_p99_ms": round(percentile(raw_ms, 99), 1),
        "overhead_p50_ms": round(bot_p50 - raw_p50, 1),
        "bot_min_ms": round(min(bot_ms), 1),
        "raw_min_ms": round(min(raw_ms), 1),
        "bot_p90_ms": round(percentile(bot_ms, 90), 1),
        "raw_p90_ms": round(percentile(raw_ms, 90), 1),
        "cpu_ms_per_exchange": cpu,
        "bot_requests": bot_requests,
        # the homeserver's cost of the bot's account alone: the overhead a plain client has
        # on it, in as many rooms, with no plugin
        "bot_account": account,
        "overhead_over_bot_account_p50_ms": round(bot_p50 - account["p50_ms"], 1),
        **({"profile": profiles} if profiles else {}),
    }
