"""provision: one user alone invites the bot (several times, one user after another), then N
users at once; the time until each holds both the Space and the first chat room invite, and
whether anyone got two of either. Next to it, the same N with the homeserver alone: a plain
client on the bot's account answers each invite as fast as it can with the plugin's own
requests (join, Space, chat room, child link), the plugin stopped."""

from __future__ import annotations

import asyncio
import time
from typing import Any

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
from .topology import PLACEHOLDER, create_chat, create_space, levels_for, power_levels

TIMEOUT = 120
SETTLE_S = 3.0  # after the last user is done: time for a duplicate to show up


async def _invite_everyone(
    stack: BenchStack, users: list[MatrixUser]
) -> tuple[list[float], int, dict[str, Any], list[tuple[MatrixUser, str]]]:
    """All users DM the bot at once; (seconds each, duplicate invites, where the time went:
    cpu, the bot's requests, the DM and the Space apart; each user and its room)."""
    loops = [SyncLoop(u) for u in users]
    await asyncio.gather(*(loop.start() for loop in loops))
    dms: dict[str, str] = {}
    steps: dict[str, list[float]] = {"dm_made_s": [], "space_invite_s": []}
    try:
        await wait_idle(stack.pids(), timeout=30)
        hs_log = stack.synapse.dir / "homeserver.log"
        hs_mark = LogTail(hs_log).mark()
        meter = CpuMeter(stack.pids()).start()

        async def one(user: MatrixUser, loop: SyncLoop) -> float:
            started = time.monotonic()
            dm = dms[user.user_id] = await user.dm(stack.bot_id)
            steps["dm_made_s"].append(time.monotonic() - started)

            def both() -> float | None:
                space = [t for r, (t, s) in loop.invites.items() if invite_is_space(s)]
                rooms = [
                    t for r, (t, s) in loop.invites.items() if not invite_is_space(s) and r != dm
                ]
                return max(min(space), min(rooms)) if space and rooms else None

            done = await loop.wait(both, TIMEOUT, "the Space and room invites")
            space_at = min(t for _, (t, s) in loop.invites.items() if invite_is_space(s))
            steps["space_invite_s"].append(space_at - started)
            return done - started

        took = await asyncio.gather(*(one(u, lp) for u, lp in zip(users, loops, strict=True)))
        detail: dict[str, Any] = {"cpu": meter.stop()}
        await asyncio.sleep(SETTLE_S)
        detail["bot_requests"] = {
            name: {"count": v["count"], "hs_seconds": round(v["seconds"], 3)}
            for name, v in homeserver_requests(hs_log, hs_mark, stack.bot_id).items()
            if "sync" not in name
        }
        detail.update({f"{k}_p50": round(median(v), 3) for k, v in steps.items()})
        duplicates = 0
        handoff: list[tuple[MatrixUser, str]] = []
        for user, loop in zip(users, loops, strict=True):
            spaces = [r for r, (_, s) in loop.invites.items() if invite_is_space(s)]
            rooms = [
                r
                for r, (_, s) in loop.invites.items()
                if not invite_is_space(s) and r != dms[user.user_id]
            ]
            duplicates += max(0, len(spaces) - 1) + max(0, len(rooms) - 1)
            handoff.append((user, rooms[0]))
    finally:
        for loop in loops:
            await loop.stop()
    return list(took), duplicates, detail, handoff


async def _homeserver_alone(stack: BenchStack, users_n: int) -> tuple[list[float], dict]:
    """The same, answered by a plain client on the bot's account (plugin stopped)."""
    bot = await stack.bot_device()
    template = await power_levels(bot, PLACEHOLDER)
    prefix = stack.unique("floor")
    users = await stack.users(prefix + "u", users_n)
    tasks: set[asyncio.Task] = set()

    async def answer(room_id: str, inviter: str) -> None:
        levels = levels_for(template, inviter)
        await bot.join(room_id)
        space = await create_space(bot, inviter, levels)
        await create_chat(bot, inviter, space, 1, levels, "localhost")

    def on_invite(room_id: str, state: list[Event], _arrived: float) -> None:
        inviter = next(
            (
                e.get("sender", "")
                for e in state
                if e.get("type") == "m.room.member" and e.get("state_key") == bot.user_id
            ),
            "",
        )
        if inviter.startswith(f"@{prefix}u"):
            task = asyncio.create_task(answer(room_id, inviter))
            tasks.add(task)

    bot_loop = SyncLoop(bot, on_invite=on_invite)
    await stack.set_instance_started(False)
    try:
        await bot_loop.start()
        took, _, detail, _ = await _invite_everyone(stack, users)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        await bot_loop.stop()
        for task in tasks:
            task.cancel()
        assert stack.log is not None
        mark = stack.log.mark()
        await stack.set_instance_started(True)
        await stack.log.wait_for("Reconciled: ", mark, timeout=120)  # serving again
        await stack.verification_done()  # and no longer reading every room
    return took, detail


async def run(
    stack: BenchStack, users_n: int, log, alone_samples: int = 5, rounds: int = 3
) -> tuple[dict[str, Any], list[tuple[MatrixUser, str]]]:
    """The figures, and each user with its first chat room (for the burst)."""
    # one user alone first, several times over (one after another): the time without
    # contention
    alone: list[float] = []
    alone_duplicates = 0
    for solo in await stack.users("solo", alone_samples):
        took_alone, dup, _, _ = await _invite_everyone(stack, [solo])
        alone += took_alone
        alone_duplicates += dup
    log(f"provision: one alone p50 {median(alone):.2f}s ({len(alone)} samples)")
    # N at once, by the plugin and by a plain client, in rounds that take turns going first:
    # one round of each is one sample of "everyone at once", and the machine's noise
    # between two rounds is as big as the difference sought
    took: list[float] = []
    floor: list[float] = []
    per_round: list[dict[str, float]] = []
    duplicates = 0
    details: list[dict[str, Any]] = []
    floor_details: list[dict[str, Any]] = []
    handoff: list[tuple[MatrixUser, str]] = []

    async def plugin_round() -> float:
        nonlocal duplicates, handoff
        users = await stack.users("prov", users_n)
        got, dup, detail, rooms = await _invite_everyone(stack, users)
        took.extend(got)
        duplicates += dup
        details.append(detail)
        handoff = handoff or rooms
        return median(got)

    async def floor_round() -> float:
        got, detail = await _homeserver_alone(stack, users_n)
        floor.extend(got)
        floor_details.append(detail)
        return median(got)

    for i in range(rounds):
        order = (plugin_round, floor_round) if i % 2 == 0 else (floor_round, plugin_round)
        medians = {fn.__name__: await fn() for fn in order}
        per_round.append({k: round(v, 3) for k, v in medians.items()})
        log(
            f"provision round {i + 1}: {users_n} at once p50 {medians['plugin_round']:.2f}s, "
            f"plain client {medians['floor_round']:.2f}s"
        )
    rows = await stack.sql(
        "SELECT user_id, COUNT(*) AS n FROM chat_room WHERE user_id LIKE '@prov%' GROUP BY user_id"
    )
    db_duplicates = sum(max(0, int(r["n"]) - 1) for r in rows)
    log(
        f"provision: {users_n} at once p50 {median(took):.2f}s p95 {percentile(took, 95):.2f}s; "
        f"plain client p50 {median(floor):.2f}s p95 {percentile(floor, 95):.2f}s"
    )
    return {
        "users": users_n,
        "rounds": rounds,
        "alone_samples": len(alone),
        "alone_p50_s": round(median(alone), 3),
        "alone_p95_s": round(percentile(alone, 95), 3),
        "p50_s": round(median(took), 3),
        "p95_s": round(percentile(took, 95), 3),
        "hs_floor_p50_s": round(median(floor), 3),
        "vs_plain_client_p50": round(median(took) / median(floor), 2),
        "duplicates": duplicates + db_duplicates + alone_duplicates,
        "alone_runs_s": [round(t, 3) for t in alone],
        "rounds_p50_s": per_round,
        "hs_floor_p95_s": round(percentile(floor, 95), 3),
        "overhead_p50_s": round(median(took) - median(floor), 3),
        "max_s": round(max(took), 3),
        "duplicate_invites": duplicates,
        "duplicate_db_rows": db_duplicates,
        # where the time went, the plugin's and the plain client's, round by round
        "detail": details,
        "hs_floor_detail": floor_details,
    }, handoff
