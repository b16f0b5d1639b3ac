"""!lambda status | reconcile [--dry-run] | reset local|server [--confirm]: for admins."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from maubot import MessageEvent
from maubot.handlers import command

from .. import files
from ..agents import Agents
from ..crypto import Signing, device_signing
from ..db import month_start, utc_day
from ..queue import RoomQueues
from ..reconcile import Reconciler, Report
from ..spaces import Spaces
from .base import LIST_BYTES, CommandBase, admin, lenient
from .usage import usage_csv

HEALTH_TIMEOUT_S = 15
TOP_USERS = 20
CONFIRM = "--confirm"


@dataclass(eq=False, kw_only=True)
class AdminCommands(CommandBase):
    """Commands for the plugin's admins (access.admins)."""

    reconciler: Reconciler
    spaces: Spaces
    agents: Agents
    queues: RoomQueues
    rebuild: Callable[[], Awaitable[Report]]  # reset local: rebuilt with the gate closed
    reconcile_now: Callable[[bool], Awaitable[Report]]  # a run, not during a start or reset

    def report_text(self, report: Report | None) -> str:
        if report is None:
            return self.notices.text("admin.no_report")
        return "\n".join(f"- {key}: {value}" for key, value in report.as_dict().items())

    # Trailing or unknown words never get maubot's usage text (it lists every subcommand,
    # to anyone): the handlers answer, after the admin check, as for a bare !lambda.
    @command.new(
        "lambda", help="Admin: status, reconcile, reset", require_subcommand=False,
        must_consume_args=False,
    )  # fmt: skip
    @admin
    async def lambda_(self, evt: MessageEvent) -> None:
        await self.reply(evt, "admin.usage")

    @lenient
    @lambda_.subcommand("status", help="Counts, last reconciliation, agents' health")
    @admin
    async def status(self, evt: MessageEvent) -> None:
        counts = await self.store.counts()
        rooms = self.reconciler.registry.rooms.values()
        # Both bounded, asked at once: the slower decides how long the status takes.
        health, signing = await asyncio.gather(
            self.agents.health(HEALTH_TIMEOUT_S), self.signing_line()
        )
        say = self.notices.text
        lines = [
            say("admin.status_title"),
            say(
                "admin.counts",
                users=counts["lambda_user"],
                active=sum(1 for r in rooms if not r.archived and not r.gone),
                archived=sum(1 for r in rooms if r.archived and not r.gone),
                gone=sum(1 for r in rooms if r.gone),
                snapshots=counts["snapshot"],
                busy=self.queues.busy_rooms(),
            ),
            self.encryption_line(),
            signing,
            say("admin.health_title"),
            *(f"- `{agent_id}`: {self.health_text(problem)}" for agent_id, problem in health.items()),
            say("admin.report_title"),
            self.report_text(self.reconciler.last_report),
        ]
        await self.reply_text(evt, "\n".join(lines))

    def encryption_line(self) -> str:
        on = self.spaces.mx.crypto.available
        state = self.notices.text("admin.crypto_on" if on else "admin.crypto_off")
        return self.notices.text("admin.encryption", state=state, mode=self.settings().encryption)

    async def signing_line(self) -> str:
        """Whether the bot's device is cross-signed, as clients see it (asked now, bounded)."""
        mx = self.spaces.mx
        try:
            state = await device_signing(mx)
        except Exception as e:
            self.log.warning("Checking the bot's cross-signing failed: %r", e)
            state = Signing.UNKNOWN
        device = f" `{mx.device_id}`" if mx.device_id else ""
        return self.notices.text(
            "admin.signing", device=device, state=self.notices.text(f"admin.signing_{state.value}")
        )

    def health_text(self, problem: str | None) -> str:
        if problem == "timeout":
            return self.notices.text("agent.timeout")
        return problem or self.notices.text("admin.healthy")

    @lenient
    @lambda_.subcommand("reconcile", help="Reconcile now: !lambda reconcile [--dry-run]")
    @command.argument("flags", pass_raw=True, required=False)
    @admin
    async def reconcile(self, evt: MessageEvent, flags: str = "") -> None:
        dry_run = "--dry-run" in (flags or "")
        report = await self.reconcile_now(dry_run)
        self.log.info("Reconciled on request of %s: %s", evt.sender, report.line())
        title = self.notices.text("admin.reconcile_dry" if dry_run else "admin.reconcile_done")
        await self.reply_text(evt, title + "\n" + self.report_text(report))

    @lenient
    @lambda_.subcommand("usage", help="Top users this month: !lambda usage [csv]")
    @command.argument("flags", pass_raw=True, required=False)
    @admin
    async def usage(self, evt: MessageEvent, flags: str = "") -> None:
        first = month_start(utc_day())
        if "csv" in (flags or "").split():
            await self.usage_file(evt, first)
            return
        top = await self.store.top_users(first, TOP_USERS)
        if not top:
            await self.reply(evt, "usage.none")
            return
        lines = [self.notices.text("usage.top_title")]
        lines += self.fitting([
            self.notices.text(
                "usage.top_line", user=user, tokens_in=tokens_in, tokens_out=tokens_out,
                requests=requests,
            )
            for user, tokens_in, tokens_out, requests in top
        ], LIST_BYTES)  # fmt: skip
        await self.reply_text(evt, "\n".join(lines))

    async def usage_file(self, evt: MessageEvent, first: str) -> None:
        """This month's usage rows as a CSV file message (encrypted in an encrypted room)."""
        data = usage_csv(await self.store.usage_rows(first))
        mx = self.spaces.mx
        encrypt = await mx.crypto.must_seal(evt.room_id)
        await self.reply(evt, "usage.csv", since=first)
        try:
            await files.send_bytes(mx, evt.room_id, data, f"usage-{first[:7]}.csv", encrypt=encrypt)
        except files.FileRefused as e:
            self.log.warning("Sending the usage CSV failed: %s", e)
            await self.reply_text(evt, e.message(self.settings().language))

    @lenient
    @lambda_.subcommand("reset", help="Dev reset: !lambda reset local|server [--confirm]")
    @command.argument("args", pass_raw=True, required=False)
    @admin
    async def reset(self, evt: MessageEvent, args: str = "") -> None:
        words = (args or "").split()
        scope = words[0] if words else ""
        if scope not in ("local", "server"):
            await self.reply(evt, "admin.reset_usage")
            return
        if CONFIRM not in words[1:]:
            await self.reply(evt, f"admin.reset_{scope}_confirm")
            return
        if scope == "local":
            self.log.info("Local reset by %s", evt.sender)
            report = await self.rebuild()
            done = self.notices.text("admin.reset_local_done")
            await self.reply_text(evt, done + "\n" + self.report_text(report))
            return
        self.log.info("Server reset by %s", evt.sender)
        left = await self.spaces.leave_everything(keep_room=evt.room_id)
        await self.store.clear_all()
        await self.reconciler.registry.load()
        await self.reply(evt, "admin.reset_server_done", rooms=left)
