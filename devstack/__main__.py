"""``python -m devstack up``: the local stack, kept running until Ctrl-C (see up.sh)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from .federation import pair_servers
from .matrix import MatrixUser
from .maubot import PLUGIN_ID, CryptoStatus, ManagementError, Maubot, build_mbp
from .procs import REPO
from .stack import Deployment
from .synapse import Synapse

INSTANCE_ID = "lambda"
BOT = "lambda"
DEMO_USER, DEMO_PASSWORD = "demo", "demo"
VISITOR, VISITOR_PASSWORD = "visitor", "visitor"  # the demo user of the remote server


@dataclass(frozen=True)
class Ports:
    hs: int
    maubot: int
    # With --federated: the bot's server's federation port (in its name), the remote
    # server's client and federation ports.
    federation: int
    remote: int
    remote_federation: int


@dataclass
class Servers:
    """The local stack's homeservers: the bot's, and with --federated a remote one."""

    root: Path  # state: .stack, or .stack/federated (other server names, other databases)
    home: Synapse
    remote: Synapse | None = None


def _servers(state: Path, ports: Ports, federated: bool) -> Servers:
    if not federated:
        return Servers(state, Synapse(state / "synapse", port=ports.hs))
    root = state / "federated"
    pair = pair_servers(
        root, ports.hs, ports.remote, ports.federation, ports.remote_federation, delayed=False
    )
    return Servers(root, pair.home, pair.remote)


async def _existing_client(maubot: Maubot, user_id: str) -> dict | None:
    try:
        return await maubot.get_client(user_id)
    except ManagementError:  # 404: no such client yet
        return None


async def _bot_client(maubot: Maubot, synapse: Synapse) -> str:
    """The bot's maubot client, with a device id (so maubot encrypts for it). A client kept
    from an earlier run keeps its device and Olm account: users' encrypted rooms stay readable
    to the bot across restarts. A fresh login (a new device) only when there is none that runs."""
    bot_id = synapse.user_id(BOT)
    existing = await _existing_client(maubot, bot_id)
    if existing and existing.get("enabled") and existing.get("device_id"):
        await maubot.crypto_status(bot_id)  # waits until maubot has started it
        if (await maubot.get_client(bot_id)).get("started"):
            return bot_id
    bot = synapse.sign_in(BOT, "bot-password")
    await maubot.create_client(bot["user_id"], bot["access_token"], bot["device_id"])
    return bot["user_id"]


async def _deploy(maubot: Maubot, synapse: Synapse, workspace: Path | None) -> tuple[str, Path]:
    """The plugin uploaded, the bot client and the instance made; returns (bot id, .mbp)."""
    await maubot.login()
    mbp = build_mbp()
    await maubot.upload_plugin(mbp)
    bot_id = await _bot_client(maubot, synapse)
    if (await maubot.crypto_status(bot_id)).on:  # before the instance starts (its check)
        await maubot.cross_sign(bot_id)  # the recovery key in a 0600 file, never printed
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
    servers: Servers,
    maubot: Maubot,
    bot_id: str,
    mbp: Path,
    workspace: Path | None,
    crypto: CryptoStatus,
) -> str:
    home, remote = servers.home, servers.remote
    remote_lines = (
        f"""
  Remote server:  {remote.url}   (server name: {remote.server_name}, federating)
  Remote user:    {remote.user_id(VISITOR)}   password: {VISITOR_PASSWORD}"""
        if remote
        else ""
    )
    remote_login = (
        f"\n(or to {remote.url} as the remote user: the bot serves users of both servers)"
        if remote
        else ""
    )
    return f"""
Lambda for Matrix is running (state in {servers.root}).

  Homeserver:     {home.url}   (server name: {home.server_name})
  Demo user:      {home.user_id(DEMO_USER)}   password: {DEMO_PASSWORD}{remote_lines}
  Bot:            {bot_id}   (plugin {mbp.name}, agent: echo)
  Workspace:      {workspace or "none (start with --workspace DIR to hand files to agents)"}
  maubot admin:   {maubot.url}/_matrix/maubot   login: admin / admin
  end-to-end encryption: {crypto.describe()}
  cross-signing:  {maubot.signing_text()}

Connect a Matrix client (e.g. Element desktop) to {home.url} as the demo user{remote_login},
start a direct chat with {bot_id}, and accept the Space invite that follows.
Logs: {maubot.log}  and  {home.dir / "homeserver.log"}
Dev reset (another terminal): ./up.sh reset local|server [--dry-run]{" --federated" if remote else ""}
Press Ctrl-C to stop everything."""


async def up(state: Path, ports: Ports, workspace: Path | None, federated: bool) -> None:
    servers = _servers(state, ports, federated)
    synapse = servers.home
    maubot = Maubot(
        servers.root / "maubot", synapse.url, "", port=ports.maubot, admin_password="admin"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print("==> starting Synapse", flush=True)
        synapse.start()
        if servers.remote is not None:
            print("==> starting the remote Synapse (federating)", flush=True)
            servers.remote.start()
            servers.remote.sign_in(VISITOR, VISITOR_PASSWORD)
        maubot.registration_secret = synapse.shared_secret
        print("==> starting maubot", flush=True)
        maubot.start()
        bot_id, mbp = await _deploy(maubot, synapse, workspace)
        crypto = await maubot.crypto_status(bot_id)
        synapse.sign_in(DEMO_USER, DEMO_PASSWORD)
        print(_banner(servers, maubot, bot_id, mbp, workspace, crypto), flush=True)
        await stop.wait()
    finally:
        print("\n==> stopping", flush=True)
        await maubot.close()
        maubot.stop()
        if servers.remote is not None:
            servers.remote.stop()
        synapse.stop()


async def reset_stack(
    state: Path, ports: Ports, federated: bool, scope: str, dry_run: bool
) -> None:
    """Resets the running local stack (started by up.sh) as its bot and maubot admin."""
    from .reset import reset  # imports the plugin's package; `up` itself never needs it

    servers = _servers(state, ports, federated)
    synapse = servers.home
    maubot = Maubot(
        servers.root / "maubot", synapse.url, "", port=ports.maubot, admin_password="admin"
    )
    await maubot.login()
    login = synapse.login(synapse.user_id(BOT), "bot-password")
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


def _port(parser: argparse.ArgumentParser, flag: str, env: str, default: int, what: str) -> None:
    parser.add_argument(flag, type=int, default=int(os.environ.get(env, default)), help=what)


def _stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", type=Path, default=REPO / ".stack")
    parser.add_argument(
        "--federated",
        action="store_true",
        help="with a second homeserver federating with the bot's (state in STATE/federated)",
    )
    _port(parser, "--hs-port", "LAMBDA_HS_PORT", 8008, "the bot's homeserver (client API)")
    _port(parser, "--maubot-port", "LAMBDA_MAUBOT_PORT", 29316, "maubot")
    # In the servers' names with --federated (localhost:<port>): keep them across runs.
    _port(parser, "--fed-port", "LAMBDA_FED_PORT", 8448, "the bot's homeserver (federation)")
    _port(parser, "--remote-port", "LAMBDA_REMOTE_HS_PORT", 8018, "the remote server (client)")
    _port(parser, "--remote-fed-port", "LAMBDA_REMOTE_FED_PORT", 8449, "the remote server (fed.)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start the local stack until Ctrl-C")
    up_parser.add_argument("--workspace", type=Path, help="shared workspace folder for files")
    reset_parser = sub.add_parser("reset", help="dev reset of the running local stack")
    reset_parser.add_argument("scope", choices=["local", "server"])
    reset_parser.add_argument("--dry-run", action="store_true", help="only list what would happen")
    for stack_parser in (up_parser, reset_parser):
        _stack_options(stack_parser)
    args = parser.parse_args()
    ports = Ports(
        args.hs_port, args.maubot_port, args.fed_port, args.remote_port, args.remote_fed_port
    )
    state = args.state.resolve()
    if args.command == "up":
        workspace = args.workspace.resolve() if args.workspace else None
        asyncio.run(up(state, ports, workspace, args.federated))
    else:
        asyncio.run(reset_stack(state, ports, args.federated, args.scope, args.dry_run))


if __name__ == "__main__":
    main()
