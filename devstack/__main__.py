"""``python -m devstack up``: the local stack, kept running until Ctrl-C (see up.sh)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import urllib.error
from pathlib import Path

from .matrix import MatrixUser
from .maubot import PLUGIN_ID, CryptoStatus, ManagementError, Maubot, build_mbp
from .procs import REPO
from .stack import Deployment
from .synapse import Synapse

INSTANCE_ID = "lambda"
BOT = "lambda"
DEMO_USER, DEMO_PASSWORD = "demo", "demo"


def _register_or_login(synapse: Synapse, localpart: str, password: str) -> dict:
    try:
        synapse.register(localpart, password)
    except urllib.error.HTTPError as e:
        if e.code != 400:  # 400 M_USER_IN_USE: kept from an earlier run
            raise
    return synapse.login(f"@{localpart}:localhost", password)


async def _existing_client(maubot: Maubot, user_id: str) -> dict | None:
    try:
        return await maubot.get_client(user_id)
    except ManagementError:  # 404: no such client yet
        return None


async def _bot_client(maubot: Maubot, synapse: Synapse) -> str:
    """The bot's maubot client, with a device id (so maubot encrypts for it). A client kept
    from an earlier run keeps its device and Olm account: users' encrypted rooms stay readable
    to the bot across restarts. A fresh login (a new device) only when there is none that runs."""
    bot_id = f"@{BOT}:localhost"
    existing = await _existing_client(maubot, bot_id)
    if existing and existing.get("enabled") and existing.get("device_id"):
        await maubot.crypto_status(bot_id)  # waits until maubot has started it
        if (await maubot.get_client(bot_id)).get("started"):
            return bot_id
    bot = _register_or_login(synapse, BOT, "bot-password")
    await maubot.create_client(bot["user_id"], bot["access_token"], bot["device_id"])
    return bot["user_id"]


async def _deploy(maubot: Maubot, synapse: Synapse, workspace: Path | None) -> tuple[str, Path]:
    """The plugin uploaded, the bot client and the instance made; returns (bot id, .mbp)."""
    await maubot.login()
    mbp = build_mbp()
    await maubot.upload_plugin(mbp)
    bot_id = await _bot_client(maubot, synapse)
    await maubot.api(
        "PUT",
        f"/instance/{INSTANCE_ID}",
        json={"type": PLUGIN_ID, "primary_user": bot_id, "enabled": True, "started": True},
    )
    if workspace is not None:
        workspace.mkdir(parents=True, exist_ok=True)
        await maubot.update_config(INSTANCE_ID, {"files": {"workspace_root": str(workspace)}})
    return bot_id, mbp


def _banner(
    state: Path,
    synapse: Synapse,
    maubot: Maubot,
    bot_id: str,
    mbp: Path,
    workspace: Path | None,
    crypto: CryptoStatus,
) -> str:
    return f"""
Lambda for Matrix is running (state in {state}).

  Homeserver:     {synapse.url}   (server name: localhost)
  Demo user:      @{DEMO_USER}:localhost   password: {DEMO_PASSWORD}
  Bot:            {bot_id}   (plugin {mbp.name}, agent: echo)
  Workspace:      {workspace or "none (start with --workspace DIR to hand files to agents)"}
  maubot admin:   {maubot.url}/_matrix/maubot   login: admin / admin
  end-to-end encryption: {crypto.describe()}

Connect a Matrix client (e.g. Element desktop) to {synapse.url}, log in as the demo user,
start a direct chat with {bot_id}, and accept the Space invite that follows.
Logs: {maubot.log}  and  {synapse.dir / "homeserver.log"}
Dev reset (another terminal): ./up.sh reset local|server [--dry-run]
Press Ctrl-C to stop everything."""


async def up(state: Path, hs_port: int, maubot_port: int, workspace: Path | None) -> None:
    synapse = Synapse(state / "synapse", port=hs_port)
    maubot = Maubot(state / "maubot", synapse.url, "", port=maubot_port, admin_password="admin")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print("==> starting Synapse", flush=True)
        synapse.start()
        maubot.registration_secret = synapse.shared_secret
        print("==> starting maubot", flush=True)
        maubot.start()
        bot_id, mbp = await _deploy(maubot, synapse, workspace)
        crypto = await maubot.crypto_status(bot_id)
        _register_or_login(synapse, DEMO_USER, DEMO_PASSWORD)
        print(_banner(state, synapse, maubot, bot_id, mbp, workspace, crypto), flush=True)
        await stop.wait()
    finally:
        print("\n==> stopping", flush=True)
        await maubot.close()
        maubot.stop()
        synapse.stop()


async def reset_stack(
    state: Path, hs_port: int, maubot_port: int, scope: str, dry_run: bool
) -> None:
    """Resets the running local stack (started by up.sh) as its bot and maubot admin."""
    from .reset import reset  # imports the plugin's package; `up` itself never needs it

    synapse = Synapse(state / "synapse", port=hs_port)
    maubot = Maubot(state / "maubot", synapse.url, "", port=maubot_port, admin_password="admin")
    await maubot.login()
    login = synapse.login(f"@{BOT}:localhost", "bot-password")
    bot = MatrixUser(synapse.url, login["user_id"], login["access_token"])
    deployment = Deployment(maubot, synapse, "local", login["user_id"], INSTANCE_ID)
    try:
        for line in await reset(deployment, bot, scope, dry_run):
            print(line, flush=True)
    finally:
        # this login's device is only for the reset: gone again, it never collects room keys
        await bot.request("POST", "/_matrix/client/v3/logout", {})
        await bot.close()
        await maubot.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start the local stack until Ctrl-C")
    up_parser.add_argument("--workspace", type=Path, help="shared workspace folder for files")
    reset_parser = sub.add_parser("reset", help="dev reset of the running local stack")
    reset_parser.add_argument("scope", choices=["local", "server"])
    reset_parser.add_argument("--dry-run", action="store_true", help="only list what would happen")
    for stack_parser in (up_parser, reset_parser):
        stack_parser.add_argument("--state", type=Path, default=REPO / ".stack")
        stack_parser.add_argument(
            "--hs-port", type=int, default=int(os.environ.get("LAMBDA_HS_PORT", 8008))
        )
        stack_parser.add_argument(
            "--maubot-port", type=int, default=int(os.environ.get("LAMBDA_MAUBOT_PORT", 29316))
        )
    args = parser.parse_args()
    if args.command == "up":
        workspace = args.workspace.resolve() if args.workspace else None
        asyncio.run(up(args.state.resolve(), args.hs_port, args.maubot_port, workspace))
    else:
        asyncio.run(
            reset_stack(
                args.state.resolve(), args.hs_port, args.maubot_port, args.scope, args.dry_run
            )
        )


if __name__ == "__main__":
    main()
