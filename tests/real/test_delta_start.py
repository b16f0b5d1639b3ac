"""A restart with the database intact reads only the rooms whose state changed while the
plugin was stopped; every room is verified in the background after the gate opens, and
what the delta could not see (the database changed behind the plugin's back) is repaired."""

from __future__ import annotations

import pytest

from devstack.stack import Deployment

from .helpers import ask, join_chat, notice_text, onboard
from .test_reconcile import report_value

pytestmark = pytest.mark.real
ROWS = "SELECT room_id, name FROM chat_room"


async def start_line(stack: Deployment, start: bool = True) -> tuple[str, int]:
    """Starts (or restarts) the instance; its start line, and the log mark before it."""
    mark = stack.log_mark()
    if start:
        await stack.maubot.set_started(stack.instance_id, True)
    else:
        await stack.restart_instance()
    return stack.wait_for_log(f"{stack.instance_id}] Reconciled: ", after=mark), mark


async def names(stack: Deployment, *room_ids: str) -> list[str]:
    quoted = ", ".join(f"'{room_id}'" for room_id in room_ids)
    rows = await stack.sql(f"{ROWS} WHERE room_id IN ({quoted})")
    by_room = {row["room_id"]: row["name"] for row in rows}
    return [by_room[room_id] for room_id in room_ids]


async def test_a_restart_reads_only_the_changed_rooms_and_verifies_the_rest(
    stack: Deployment, new_user
) -> None:
    pia = await new_user("pia")
    got = await onboard(pia, stack)
    bot = stack.bot_id
    reply = notice_text(await pia.command(got.room, "!new Second", bot))
    second = reply.split("https://matrix.to/#/")[1].split("?")[0].split(")")[0]
    await join_chat(pia, second, bot)
    await start_line(stack, start=False)  # a clean stop stores the position the delta reads from

    # The other chat's row drifts in the database (nothing in any room says so; maubot's
    # database API answers only while the instance runs, which holds its rows in memory),
    # then, while the plugin is stopped, the owner renames one chat: its state changes.
    await stack.sql(f"UPDATE chat_room SET name='Drifted' WHERE room_id='{second}'")
    await stack.maubot.set_started(stack.instance_id, False)
    await pia.send_state(got.room, "m.room.name", {"name": "Renamed while stopped"})
    line, mark = await start_line(stack)
    assert report_value(line, "delta") == "True", line
    changed, requests = int(report_value(line, "changed_rooms")), int(report_value(line, "requests"))
    # The renamed room at least; the position is this test's own stop, so few others. The
    # requests: the delta's /sync, 2-3 a changed room, and the catch-up's /sync, which runs
    # beside them (one client, one count).
    assert 1 <= changed <= 3 and requests <= 2 + 3 * changed, line
    # Read before the gate opened: the first answer after the start already sees the name.
    assert "echo: hello" in notice_text((await ask(pia, got.room, "hello", bot))[1])
    assert (await names(stack, got.room))[0] == "Renamed while stopped"

    verified = stack.wait_for_log(f"{stack.instance_id}] Verified every room: ", after=mark)
    assert int(report_value(verified, "repaired_chat_rows")) >= 1, verified
    assert int(report_value(verified, "joined_rooms")) > changed, verified  # the delta read fewer
    assert await names(stack, got.room, second) == ["Renamed while stopped", "Second"]


async def test_a_position_the_homeserver_refuses_means_every_room_is_read(
    stack: Deployment, new_user
) -> None:
    quinn = await new_user("quinn")
    await onboard(quinn, stack)
    await start_line(stack, start=False)  # a clean stop stores a position
    await stack.sql("UPDATE plugin_state SET value='s-not-a-token' WHERE key='delta_since'")
    mark = stack.log_mark()
    await stack.kill_server()  # SIGKILL: no stop writes a good position over it
    line = stack.wait_for_log(f"{stack.instance_id}] Reconciled: ", after=mark)
    assert report_value(line, "delta") == "False", line
    assert int(report_value(line, "joined_rooms")) >= 3, line
