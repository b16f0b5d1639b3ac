"""!lambda status | reconcile [--dry-run] | reset local|server [--confirm]: for admins."""

from __future__ import annotations

import asyncio

from maubot import MessageEvent
from maubot.handlers import command

from ..reconcile import Report
from ..texts import text
from .base import CommandBase

HEALTH_TIMEOUT_S = 15
CONFIRM = "--confirm"


class AdminCommands(CommandBase):
    async def admin(self, evt: MessageEvent) -> bool:
        """True for admins; anyone else is told the command is not theirs."""
        if not await self.begin(evt):
            return False
        if evt.sender in self.bot.settings.admins:
            return True
        await self.reply(evt, "admin.only")
        return False

    def report_text(self, report: Report | None) -> str:
        if report is None:
            return text(self.bot.settings.language, "admin.no_report")
        return "\n".join(f"- {key}: {value}" for key, value in report.as_dict().items())

    @command.new("lambda", help="Admin: status, reconcile, reset", require_subcommand=False)
    async def lambda_(self, evt: MessageEvent) -> None:
        if await self.admin(evt):
            await self.reply(evt, "admin.usage")

    @lambda_.subcommand("status", help="Counts, last reconciliation, agents' health")
    async def status(self, evt: MessageEvent) -> None:
        if not await self.admin(evt):
            return
        lang = self.bot.settings.language
        counts = await self.bot.store.counts()
        rooms = self.bot.registry.rooms.values()
        health = await self.agent_health()
        lines = [
            text(lang, "admin.status_title"),
            text(
                lang,
                "admin.counts",
                users=counts["lambda_user"],
                active=sum(1 for r in rooms if not r.archived and not r.gone),
                archived=sum(1 for r in rooms if r.archived and not r.gone),
                gone=sum(1 for r in rooms if r.gone),
                snapshots=counts["snapshot"],
                busy=sum(1 for w in self.bot.router.workers.values() if w.busy),
            ),
            text(lang, "admin.health_title"),
            *(f"- `{agent_id}`: {state}" for agent_id, state in health.items()),
            text(lang, "admin.report_title"),
            self.report_text(self.bot.reconciler.last_report),
        ]
        await self.bot.notify(evt.room_id, "\n".join(lines))

    async def agent_health(self) -> dict[str, str]:
        lang = self.bot.settings.language
        agents = dict(self.bot.router.agents)

        async def check(agent_id: str) -> tuple[str, str]:
            try:
                problem = await asyncio.wait_for(agents[agent_id].health(), HEALTH_TIMEOUT_S)
            except asyncio.TimeoutError:
                problem = text(lang, "agent.timeout")
            return agent_id, problem or text(lang, "admin.healthy")

        return dict(await asyncio.gather(*(check(agent_id) for agent_id in agents)))

    @lambda_.subcommand("reconcile", help="Reconcile now: !lambda reconcile [--dry-run]")
    @command.argument("flags", pass_raw=True, required=False)
    async def reconcile(self, evt: MessageEvent, flags: str = "") -> None:
        if not await self.admin(evt):
            return
        dry_run = "--dry-run" in (flags or "")
        report = await self.bot.reconciler.run(dry_run=dry_run)
        self.bot.log.info("Reconciled on request of %s: %s", evt.sender, report.line())
        title = "admin.reconcile_dry" if dry_run else "admin.reconcile_done"
        await self.bot.notify(
            evt.room_id,
            text(self.bot.settings.language, title) + "\n" + self.report_text(report),
        )

    @lambda_.subcommand("reset", help="Dev reset: !lambda reset local|server [--confirm]")
    @command.argument("args", pass_raw=True, required=False)
    async def reset(self, evt: MessageEvent, args: str = "") -> None:
        if not await self.admin(evt):
            return
        words = (args or "").split()
        scope = words[0] if words else ""
        if scope not in ("local", "server"):
            await self.reply(evt, "admin.reset_usage")
            return
        if CONFIRM not in words[1:]:
            await self.reply(evt, f"admin.reset_{scope}_confirm")
            return
        if scope == "local":
            self.bot.log.info("Local reset by %s", evt.sender)
            await self.bot.store.clear_all()
            await self.bot.registry.load()
            report = await self.bot.reconciler.run()
            await self.bot.notify(
                evt.room_id,
                text(self.bot.settings.language, "admin.reset_local_done")
                + "\n"
                + self.report_text(report),
            )
            return
        self.bot.log.info("Server reset by %s", evt.sender)
        left = await self.bot.spaces.leave_everything(keep_room=evt.room_id)
        await self.bot.store.clear_all()
        await self.bot.registry.load()
        await self.reply(evt, "admin.reset_server_done", rooms=left)
