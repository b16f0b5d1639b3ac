"""The dev reset workflow without a Matrix client: ``python -m devstack reset local|server``.

- ``local`` clears the plugin's tables (through maubot's database API) and restarts the
  instance, whose start hook rebuilds them from the rooms: the proof that the database is a
  rebuildable cache.
- ``server`` also removes every user from every room the bot manages and leaves them all
  (acting as the bot account), for a clean-room QA run.

``--dry-run`` lists what would happen and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lambda_plugin.marker import MARKER_TYPE

from .matrix import MatrixError, MatrixUser
from .stack import Deployment

TABLES = ("chat_room", "lambda_user", "snapshot", "history", "ledger", "usage", "file_place")


@dataclass
class ResetPlan:
    rows: dict[str, int] = field(default_factory=dict)
    rooms: dict[str, list[str]] = field(default_factory=dict)  # room -> users to remove

    def lines(self, scope: str) -> list[str]:
        lines = [f"plugin tables: {', '.join(f'{t}={n}' for t, n in self.rows.items())}"]
        if scope == "server":
            lines.append(f"managed rooms to leave: {len(self.rooms)}")
            for room_id, users in sorted(self.rooms.items()):
                lines.append(f"  {room_id}: remove {', '.join(users) or 'nobody'}")
        return lines


async def managed_rooms(bot: MatrixUser) -> dict[str, list[str]]:
    """Rooms carrying the plugin's marker sent by the bot, with their other members."""
    rooms: dict[str, list[str]] = {}
    for room_id in await bot.joined_rooms():
        state = await bot.state(room_id)
        marker = next(
            (e for e in state if e["type"] == MARKER_TYPE and e.get("state_key") == ""), None
        )
        if marker is None or marker.get("sender") != bot.user_id:
            continue
        rooms[room_id] = sorted(
            e["state_key"]
            for e in state
            if e["type"] == "m.room.member"
            and e["state_key"] != bot.user_id
            and e["content"].get("membership") in ("join", "invite")
        )
    return rooms


async def plan_reset(deployment: Deployment, bot: MatrixUser, scope: str) -> ResetPlan:
    plan = ResetPlan()
    for table in TABLES:
        rows = await deployment.sql(f"SELECT COUNT(*) AS n FROM {table}")
        plan.rows[table] = int(rows[0]["n"]) if rows else 0
    if scope == "server":
        plan.rooms = await managed_rooms(bot)
    return plan


async def reset(deployment: Deployment, bot: MatrixUser, scope: str, dry_run: bool) -> list[str]:
    """Carries out (or, dry, only describes) a reset; returns the lines it printed."""
    plan = await plan_reset(deployment, bot, scope)
    lines = [f"{'Would' if dry_run else 'Will'} reset ({scope}):", *plan.lines(scope)]
    if dry_run:
        return lines
    if scope == "server":
        for room_id, users in plan.rooms.items():
            for user_id in users:
                try:
                    await bot.request(
                        "POST",
                        f"/_matrix/client/v3/rooms/{room_id}/kick",
                        {"user_id": user_id, "reason": "reset"},
                    )
                except MatrixError as e:
                    lines.append(f"  could not remove {user_id} from {room_id}: {e}")
            await bot.leave(room_id)
        lines.append(f"left {len(plan.rooms)} rooms")
    for table in TABLES:
        await deployment.sql(f"DELETE FROM {table}")
    mark = deployment.log_mark()
    await deployment.restart_instance()
    lines.append(
        "tables cleared; " + deployment.wait_for_log("Reconciled: ", after=mark).split("] ", 2)[-1]
    )
    return lines
