"""Files both ways through the shared workspace, on a real Synapse + maubot."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import pytest_asyncio

from devstack.stack import Deployment
from lambda_plugin.files import user_dir
from tests.servers.lambda_server import LambdaServer

from .helpers import answer_to as answered
from .helpers import join_chat, notice_text, onboard
from .test_routing import is_answer

pytestmark = pytest.mark.real
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000002000000030806000000b8c2a1a5"
    "0000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


@pytest_asyncio.fixture(scope="module")
async def workspace(stack: Deployment):
    root = Path(tempfile.mkdtemp(prefix="lambda-workspace-"))
    platform = LambdaServer()
    url = await platform.start()
    await stack.configure(
        {
            "files": {"workspace_root": str(root), "max_size_mb": 1},
            "agents": {"registry": {"files": {"backend": "lambda", "base_url": url}}},
        }
    )
    yield root, platform
    await stack.configure({"files": {"workspace_root": None, "max_size_mb": 50}})
    await platform.stop()
    shutil.rmtree(root, ignore_errors=True)


async def answer_to(user, room: str, bot: str, send) -> str:
    await user.sync_once(0)
    mark = user.mark()
    await send()
    return notice_text(await user.wait_for_event(room, is_answer(bot), mark))


def paths_in(answer: str) -> list[str]:
    return [line.rsplit(": ", 1)[1] for line in answer.splitlines() if line.startswith("- ")]


async def test_files_in_land_in_the_workspace(stack, workspace, new_user) -> None:
    root, _ = workspace
    tia = await new_user("tia")
    got = await onboard(tia, stack)
    bot = stack.bot_id
    text_bytes = b"hello from a file\n" * 10
    answer = await answer_to(
        tia, got.room, bot, lambda: tia.send_file(got.room, text_bytes, "notes.txt", "text/plain")
    )
    [rel] = paths_in(answer)
    assert rel.startswith("surfaces/matrix/") and "/inbox/" in rel and rel.endswith("-notes.txt")
    assert (root / rel).read_bytes() == text_bytes
    answer = await answer_to(
        tia, got.room, bot, lambda: tia.send_file(got.room, PNG, "pic.png", "image/png", "m.image")
    )
    [rel_png] = paths_in(answer)
    assert (root / rel_png).read_bytes() == PNG

    # A second room's inbox is its own.
    second = notice_text(await tia.command(got.room, "!new", bot)).split("/#/")[1].split("?")[0]
    await join_chat(tia, second, bot)
    answer = await answer_to(
        tia, second, bot, lambda: tia.send_file(second, b"other", "notes.txt", "text/plain")
    )
    [rel_other] = paths_in(answer)
    assert Path(rel_other).parent != Path(rel).parent
    assert (root / rel_other).read_bytes() == b"other"


def reply_to_file(event_id: str, sender: str, text: str) -> dict:
    """A reply to a file message as Element sends it: the fallback, then the text."""
    return {
        "msgtype": "m.text",
        "body": f"> <{sender}> sent a file.\n\n{text}",
        "m.relates_to": {"m.in_reply_to": {"event_id": event_id}},
    }


async def test_a_reply_to_a_file_gives_its_workspace_path(stack, workspace, new_user) -> None:
    root, _ = workspace
    yan = await new_user("yan")
    got = await onboard(yan, stack)
    bot = stack.bot_id
    sent = await yan.send_file(got.room, b"a,b\n1,2\n", "data.csv", "text/csv")
    [rel] = paths_in(notice_text(await answered(yan, got.room, bot, sent)))
    reply = await yan.send(got.room, reply_to_file(sent, yan.user_id, "what is in it?"))
    echoed = notice_text(await answered(yan, got.room, bot, reply))
    # The path the agent was given with the file (its name has the time it landed).
    assert echoed.startswith(f"echo: > [file: data.csv, in the workspace at {rel}]\n\n")
    assert "what is in it?" in echoed and (root / rel).read_bytes() == b"a,b\n1,2\n"
    # The file's event id named from another room: nothing of the first room's file.
    second = notice_text(await yan.command(got.room, "!new", bot)).split("/#/")[1].split("?")[0]
    await join_chat(yan, second, bot)
    stray = await yan.send(second, reply_to_file(sent, yan.user_id, "and here?"))
    echoed = notice_text(await answered(yan, second, bot, stray))
    assert echoed.startswith("echo: and here?") and rel not in echoed and "[file" not in echoed


@pytest.mark.parametrize(
    "hostile", ["../../x", "/etc/passwd", "a/b", "bad\x00\x07name\n.txt", "n" * 500, ""]
)
async def test_hostile_names_stay_inside(stack, workspace, new_user, hostile: str) -> None:
    root, _ = workspace
    uma = await new_user("uma")
    got = await onboard(uma, stack)
    answer = await answer_to(
        uma, got.room, stack.bot_id,
        lambda: uma.send_file(got.room, b"payload", hostile, "application/octet-stream"),
    )  # fmt: skip
    [rel] = paths_in(answer)
    target = (root / rel).resolve()
    assert target.is_relative_to(root.resolve()) and target.read_bytes() == b"payload"
    name = target.name
    assert "/" not in name and ".." not in name and len(name.encode()) <= 200
    assert not any(ord(c) < 32 for c in name)


async def test_oversize_file_is_refused_before_download(stack, workspace, new_user) -> None:
    root, _ = workspace
    val = await new_user("val")
    got = await onboard(val, stack)
    before = {p for p in root.rglob("*")}
    big = os.urandom(1024 * 1024 + 10)
    answer = await answer_to(
        val, got.room, stack.bot_id,
        lambda: val.send_file(got.room, big, "big.bin", "application/octet-stream"),
    )  # fmt: skip
    assert "too large" in answer
    assert {p for p in root.rglob("*") if p.is_file()} == {p for p in before if p.is_file()}


async def test_agent_files_come_back_and_escapes_are_refused(stack, workspace, new_user) -> None:
    root, platform = workspace
    wes = await new_user("wes")
    got = await onboard(wes, stack)
    bot = stack.bot_id
    await wes.command(got.room, "!agent files", bot)
    report = os.urandom(2048)
    # An agent's files are taken from the user's own folder only: another user's inbox is
    # inside the workspace too, and its folder name can be computed.
    own = user_dir(wes.user_id) / "out"
    (root / own).mkdir(parents=True, exist_ok=True)
    (root / own / "report.bin").write_bytes(report)
    (root / "out").mkdir(exist_ok=True)
    (root / "out" / "not-yours.bin").write_bytes(b"someone else's")
    outside = Path(tempfile.mkdtemp(prefix="lambda-outside-"))
    (outside / "secret.txt").write_text("secret")
    (root / own / "link-out").symlink_to(outside / "secret.txt")
    platform.reply_attachments = [
        f"{own}/report.bin", "../secret.txt", "/etc/passwd", f"{own}/link-out",
        "out/not-yours.bin",
    ]  # fmt: skip
    try:
        await wes.sync_once(0)
        mark = wes.mark()
        await wes.send_text(got.room, "send me the files")
        files = await wes.wait_until(
            lambda: [
                e for e in wes.events_since(got.room, mark)
                if e["sender"] == bot and e["content"].get("msgtype") == "m.file"
            ] or None,
            what="the returned file",
        )  # fmt: skip
        refusals = await wes.wait_until(
            lambda: [
                e for e in wes.events_since(got.room, mark)
                if e["sender"] == bot and "workspace" in e["content"].get("body", "")
            ]
            if len([
                e for e in wes.events_since(got.room, mark)
                if e["sender"] == bot and e["content"].get("msgtype") == "m.notice"
            ]) >= 5 else None,
            what="the answer and four refusals",
        )  # fmt: skip
    finally:
        platform.reply_attachments = []
        shutil.rmtree(outside, ignore_errors=True)
    [sent] = files
    assert sent["content"]["body"] == "report.bin"
    assert (
        hashlib.sha256(await wes.download(sent["content"]["url"])).digest()
        == hashlib.sha256(report).digest()
    )
    assert len(refusals) == 4, [notice_text(e) for e in refusals]
    assert "secret" not in " ".join(notice_text(e) for e in refusals).replace("secret.txt", "")
