"""Encrypted chat rooms over a real Synapse + maubot, with a real end-to-end-encrypting
client (``devstack.e2e.E2EUser``, on mautrix's own crypto), on both plugin database engines.

The deployment makes plain rooms (``spaces.encryption: never``, see tests/conftest.py); the
``encrypted`` fixture turns it to ``auto`` for this module's tests and back afterwards.
Every test but the first skips when maubot has no crypto for the bot client; the first one
fails then, so a broken crypto setup is loud rather than a row of skips.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import pytest_asyncio
from mautrix.types import EncryptedMegolmEventContent, SessionID

from devstack.e2e import E2EUser
from devstack.matrix import Event
from devstack.stack import Deployment
from lambda_plugin.files import user_dir
from lambda_plugin.intake import ABOUT, ANSWERS
from tests.servers.lambda_server import LambdaServer
from tests.servers.openai_server import OpenAIServer
from tests.unit.test_replies_budget import html_answer

from . import helpers
from .helpers import ANSWER_TIMEOUT, bot_messages, notice_text, onboard
from .test_order_and_noise import start_instance, stop_instance, wipe_plugin_database

pytestmark = pytest.mark.real
_names = itertools.count(1)
PCID = re.compile(r"platform_chat_id: `?([\w-]+)`?")
ENCRYPTED = "m.room.encrypted"
# Catch-up after a start waits for reconciliation; maubot's first sync may long-poll 30 s.
# The plugin tries an undecryptable message again for about 15 s before its notice.
NOTICE_TIMEOUT = 60
UNDECRYPTABLE = "could not decrypt"
STREAM_TEXT = " ".join(f"word{i}" for i in range(40))


@dataclass
class Encrypted:
    """What the module's tests share: the agent servers and the workspace."""

    stack: Deployment
    openai: OpenAIServer
    platform: LambdaServer
    workspace: Path


@pytest_asyncio.fixture(scope="module")
async def encrypted(stack: Deployment) -> AsyncIterator[Encrypted]:
    """New chat rooms encrypted (``spaces.encryption: auto``), a streaming OpenAI-compatible
    agent ``enc_stream``, a Lambda platform agent ``enc_files`` and a workspace for files."""
    openai, platform = OpenAIServer(), LambdaServer()
    # Always streamed, slowly enough for several edits at the default edit interval (1 s).
    openai.mode, openai.chunks, openai.chunk_delay_s = "stream", 10, 0.5
    openai.reply_text = STREAM_TEXT
    openai_url, platform_url = await openai.start(), await platform.start()
    root = Path(tempfile.mkdtemp(prefix="lambda-enc-workspace-"))
    try:
        await stack.configure(
            {
                "spaces": {"encryption": "auto"},
                "files": {"workspace_root": str(root), "max_size_mb": 1},
                "agents": {
                    "registry": {
                        "enc_stream": {
                            "backend": "openai",
                            "base_url": openai_url,
                            "model": "test-model",
                            "timeout_s": 30,
                        },
                        "enc_files": {"backend": "lambda", "base_url": platform_url},
                    }
                },
            }
        )
        yield Encrypted(stack, openai, platform, root)
    finally:
        await stack.configure(
            {
                "spaces": {"encryption": "never"},
                "files": {"workspace_root": None, "max_size_mb": 50},
            }
        )
        await openai.stop()
        await platform.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture
async def e2e_user(stack: Deployment) -> AsyncIterator[Callable[[str], Awaitable[E2EUser]]]:
    """Makes fresh users with their own encrypting device, closed after the test."""
    made: list[E2EUser] = []

    async def make(prefix: str = "enc") -> E2EUser:
        user = await stack.e2e_user(f"{prefix}{next(_names)}_{os.getpid()}_{stack.engine}")
        made.append(user)
        return user

    yield make
    for user in made:
        await user.close()
        stack.users.remove(user)


def need_crypto(stack: Deployment) -> None:
    if stack.crypto is None or not stack.crypto.on:
        reason = stack.crypto.describe() if stack.crypto else "unknown"
        pytest.skip(f"maubot does not encrypt for the bot client: {reason}")


# reading the room


# Streamed answers here: a message's first answer event is marked as work in progress.
answers_to = partial(helpers.answers_to, in_progress=True)
answer_to = partial(helpers.answer_to, in_progress=True)
ask = partial(helpers.ask, in_progress=True)


async def on_server(user: E2EUser, room: str, event_id: str) -> Event:
    """The event as the homeserver holds it (what its admin could read)."""
    return await user.request("GET", f"/_matrix/client/v3/rooms/{room}/event/{event_id}")


async def assert_sealed(user: E2EUser, room: str, event: Event, secret: str) -> None:
    """The client decrypted ``event``, and the server has it only encrypted."""
    assert event.get("decrypted"), event
    raw = await on_server(user, room, event["event_id"])
    assert raw["type"] == ENCRYPTED and secret not in json.dumps(raw), raw


def undecryptable_notices(user: E2EUser, room: str, bot: str, mark=None) -> list[Event]:
    return [e for e in bot_messages(user, room, bot, mark) if UNDECRYPTABLE in e["content"]["body"]]


def pcid_of(context: Event) -> str:
    return PCID.search(notice_text(context)).group(1)


async def send_withheld_again(user: E2EUser, room: str, first: str, text: str) -> str:
    """Another text in the held (never shared) Megolm session of the ``send_text_withheld``
    message ``first``: the same device and the same session, the next message index."""
    session = user.withheld[first]
    payload = {
        "room_id": room,
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": text},
    }
    session.shared = True  # encrypt() insists; nothing was sent to anyone
    try:
        ciphertext = session.encrypt(json.dumps(payload))
    finally:
        session.shared = False
    content = EncryptedMegolmEventContent(
        sender_key=user.machine.account.identity_key,
        device_id=user.client.device_id,
        ciphertext=ciphertext,
        session_id=SessionID(session.id),
    )
    return await super(E2EUser, user).send(room, content.serialize(), ENCRYPTED)


# the tests


async def test_invite_makes_an_encrypted_chat_room(encrypted, e2e_user) -> None:
    stack = encrypted.stack
    # Not a skip: maubot is meant to encrypt here, and if it does not, this says why.
    assert stack.crypto is not None and stack.crypto.on, (
        stack.crypto.describe() if stack.crypto else "no crypto status"
    )
    ann = await e2e_user("ann")
    got = await onboard(ann, stack, encrypted=True)
    encryption = await ann.state_event(got.room, "m.room.encryption")
    assert encryption is not None and encryption["sender"] == stack.bot_id
    assert encryption["content"]["algorithm"] == "m.megolm.v1.aes-sha2"
    assert await ann.state_event(got.space, "m.room.encryption") is None
    assert await ann.is_encrypted(got.room) and not await ann.is_encrypted(got.space)
    [welcome] = bot_messages(ann, got.room, stack.bot_id)
    await assert_sealed(ann, got.room, welcome, "!help")
    assert "!help" in notice_text(welcome)
    assert not ann.undecryptable(got.room)


async def test_an_answer_is_encrypted_and_decrypts(encrypted, e2e_user) -> None:
    stack = encrypted.stack
    need_crypto(stack)
    bo = await e2e_user("bo")
    got = await onboard(bo, stack, encrypted=True)
    bot = stack.bot_id
    question, answer = await ask(bo, got.room, "the secret word is swordfish", bot)
    assert notice_text(answer) == (
        "echo: the secret word is swordfish\n\n(message 1 in this conversation)"
    )
    await assert_sealed(bo, got.room, answer, "swordfish")
    assert (await on_server(bo, got.room, question))["type"] == ENCRYPTED
    # Commands too: answered, encrypted.
    context = await bo.command(got.room, "!context", bot)
    await assert_sealed(bo, got.room, context, "platform_chat_id")
    assert "messages: 2" in notice_text(context)  # the question and its answer
    assert not bo.undecryptable(got.room)


async def test_streamed_edits_decrypt(encrypted, e2e_user) -> None:
    stack = encrypted.stack
    need_crypto(stack)
    cy = await e2e_user("cy")
    got = await onboard(cy, stack, encrypted=True)
    bot = stack.bot_id
    assert "enc_stream" in notice_text(await cy.command(got.room, "!agent enc_stream", bot))
    await cy.sync_once(0)
    mark = cy.mark()
    question = await cy.send_text(got.room, "please stream")
    first = await answer_to(cy, got.room, bot, question)
    assert notice_text(first).endswith(" …"), first  # the stream's start, edited from here

    def whole() -> bool:
        return (cy.latest_content(got.room, first["event_id"]) or {}).get("body") == STREAM_TEXT

    await cy.wait_until(whole, ANSWER_TIMEOUT, "the whole streamed answer")
    edits = [
        e
        for e in cy.events_since(got.room, mark)
        if (e["content"].get("m.relates_to") or {}).get("event_id") == first["event_id"]
    ]
    assert len(edits) >= 2, [e["content"].get("body") for e in edits]  # interim ones and the last
    for edit in edits:
        assert edit.get("decrypted") and edit["sender"] == bot, edit
        # The relation is readable to the server (the cleartext wrapper), the text is not.
        wrapper = edit["encrypted_event"]
        assert wrapper["type"] == ENCRYPTED
        assert wrapper["content"]["m.relates_to"] == {
            "rel_type": "m.replace",
            "event_id": first["event_id"],
        }
        assert "word1" not in json.dumps(wrapper)
    assert edits[-1]["content"]["m.new_content"]["body"] == STREAM_TEXT
    assert not cy.undecryptable(got.room)


async def test_a_long_html_answer_streamed_encrypted_reads_whole(encrypted, e2e_user) -> None:
    """Issue 20: a 12 KB HTML answer's final edit is about 52 KB in the clear but 70 KB
    encrypted, over the event limit (refused, and refused again at every !retry). Measured
    as the encrypted event it is, it goes out in pieces that each fit, and reads whole."""
    stack, openai = encrypted.stack, encrypted.openai
    need_crypto(stack)
    jo = await e2e_user("jo")
    got = await onboard(jo, stack, encrypted=True)
    bot = stack.bot_id
    assert "enc_stream" in notice_text(await jo.command(got.room, "!agent enc_stream", bot))
    text = html_answer()
    await jo.sync_once(0)
    mark = jo.mark()
    openai.reply_text, openai.chunks = text, 12  # 6 s: partials up to the whole answer
    try:
        question = await jo.send_text(got.room, "the page, please")

        def finished() -> list[Event]:  # its last piece, or the notice that it failed
            said = bot_messages(jo, got.room, bot, mark)
            return [e for e in said if question in (e["content"].get(f) for f in (ANSWERS, ABOUT))]

        ends = await jo.wait_until(finished, ANSWER_TIMEOUT, "the end of the answer")
    finally:
        openai.reply_text, openai.chunks = STREAM_TEXT, 10
    assert all(e["content"].get(ANSWERS) == question for e in ends), [notice_text(e) for e in ends]
    pieces = answers_to(jo, got.room, bot, question, mark)  # the streamed first one, the rest
    assert len(pieces) > 1, [notice_text(e) for e in pieces]
    bodies = [jo.latest_content(got.room, e["event_id"])["body"] for e in pieces]
    assert "".join("".join(bodies).split()) == "".join(text.split())
    assert not bodies[0].endswith(" …")
    for event in jo.events_since(got.room, mark):
        if event["sender"] == bot:
            assert event.get("decrypted") and event["encrypted_event"]["type"] == ENCRYPTED
    assert not jo.undecryptable(got.room)


async def test_files_both_ways_encrypted(encrypted, e2e_user) -> None:
    stack, root = encrypted.stack, encrypted.workspace
    need_crypto(stack)
    di = await e2e_user("di")
    got = await onboard(di, stack, encrypted=True)
    bot = stack.bot_id

    # In: an encrypted attachment, decrypted into the room's inbox.
    data = os.urandom(64 * 1024) + b"the end\n"
    sent = await di.send_file(got.room, data, "notes.bin", "application/octet-stream")
    raw = await on_server(di, got.room, sent)
    assert raw["type"] == ENCRYPTED  # the file message itself is encrypted too
    answer = await answer_to(di, got.room, bot, sent)
    [line] = [x for x in notice_text(answer).splitlines() if x.startswith("- ")]
    rel = line.rsplit(": ", 1)[1]
    assert rel.startswith(f"{user_dir(di.user_id)}/") and rel.endswith("-notes.bin"), rel
    assert hashlib.sha256((root / rel).read_bytes()).digest() == hashlib.sha256(data).digest()

    # Out: the agent's file, uploaded encrypted and sent as ``file``.
    assert "enc_files" in notice_text(await di.command(got.room, "!agent enc_files", bot))
    report = os.urandom(3000)
    own = user_dir(di.user_id) / "out"
    (root / own).mkdir(parents=True, exist_ok=True)
    (root / own / "report.bin").write_bytes(report)
    encrypted.platform.reply_attachments = [f"{own}/report.bin"]
    try:
        await di.sync_once(0)
        mark = di.mark()
        await di.send_text(got.room, "send me the report")
        file_event = await di.wait_until(
            lambda: next(
                (
                    e
                    for e in bot_messages(di, got.room, bot, mark)
                    if e["content"].get("msgtype") == "m.file"
                ),
                None,
            ),
            ANSWER_TIMEOUT,
            "the agent's file",
        )
    finally:
        encrypted.platform.reply_attachments = []
    content = file_event["content"]
    assert content["body"] == "report.bin" and "url" not in content, content
    assert content["file"]["url"].startswith("mxc://")
    assert file_event.get("decrypted")
    assert await di.download_content(content) == report
    assert await di.download(content["file"]["url"]) != report  # ciphertext at rest
    assert (await on_server(di, got.room, file_event["event_id"]))["type"] == ENCRYPTED
    assert not di.undecryptable(got.room)


async def test_lost_database_and_restart_keep_encrypted_chats(encrypted, e2e_user) -> None:
    stack = encrypted.stack
    need_crypto(stack)
    eve = await e2e_user("eve")
    got = await onboard(eve, stack, encrypted=True)
    bot = stack.bot_id
    before_question, before_answer = await ask(eve, got.room, "before the loss", bot)
    assert "(message 1 " in notice_text(before_answer)
    pcid = pcid_of(await eve.command(got.room, "!context", bot))
    rows = "SELECT room_id, chat_id, platform_chat_id FROM chat_room WHERE user_id="
    before = await stack.sql(f"{rows}'{eve.user_id}'")
    assert [r["chat_id"] for r in before] == ["C1"] and before[0]["platform_chat_id"] == pcid
    await eve.sync_once(0)
    mark = eve.mark()

    log_mark = stack.log_mark()
    await wipe_plugin_database(stack)
    await stop_instance(stack)
    try:
        # Sent while the instance is stopped: only the catch-up after the start can answer
        # it, decrypting what it reads.
        missed = await eve.send_text(got.room, "sent while you were away")
    finally:
        await start_instance(stack)

    answer = await answer_to(eve, got.room, bot, missed)
    assert f"Catching up {missed} " in stack.maubot.log_text()[log_mark:]  # read, decrypted
    await assert_sealed(eve, got.room, answer, "while you were away")
    # History went with the database: the missed message starts the conversation again.
    assert (
        notice_text(answer) == "echo: sent while you were away\n\n(message 1 in this conversation)"
    )
    assert await stack.sql(f"{rows}'{eve.user_id}'") == before
    context = await eve.command(got.room, "!context", bot)
    assert pcid_of(context) == pcid and context.get("decrypted")
    marker, marker_answer = await ask(eve, got.room, "marker", bot)
    await assert_sealed(eve, got.room, marker_answer, "marker")
    # Each answered once: the one answered before the loss is not answered again.
    assert len(answers_to(eve, got.room, bot, before_question)) == 1
    assert len(answers_to(eve, got.room, bot, missed)) == 1
    said = [e["content"].get(ANSWERS) for e in bot_messages(eve, got.room, bot, mark)]
    assert said[0] == missed and said.count(missed) == 1 and marker in said, said
    assert f"Catching up {before_question} " not in stack.maubot.log_text()[log_mark:]
    assert not eve.undecryptable(got.room)


async def test_withheld_keys_give_one_notice(encrypted, e2e_user) -> None:
    stack = encrypted.stack
    need_crypto(stack)
    fay = await e2e_user("fay")
    got = await onboard(fay, stack, encrypted=True)
    bot = stack.bot_id
    # A first readable message: the bot has the user's device and room session from here.
    await ask(fay, got.room, "hello", bot)
    await fay.sync_once(0)
    mark = fay.mark()

    log_mark = stack.log_mark()
    first = await fay.send_text_withheld(got.room, "nobody can read this")
    notice = await fay.wait_until(
        lambda: next(iter(undecryptable_notices(fay, got.room, bot, mark)), None),
        NOTICE_TIMEOUT,
        "the undecryptable notice",
    )
    await assert_sealed(fay, got.room, notice, UNDECRYPTABLE)
    line = stack.wait_for_log(
        f"Can't decrypt {first} from ", after=log_mark, timeout=NOTICE_TIMEOUT
    )
    assert fay.device_id in line and fay.user_id in line
    assert not answers_to(fay, got.room, bot, first)

    # The same device and session again: a log line, no second notice.
    log_mark = stack.log_mark()
    second = await send_withheld_again(fay, got.room, first, "nor this")
    stack.wait_for_log(f"Can't decrypt {second} from ", after=log_mark, timeout=NOTICE_TIMEOUT)
    marker, _ = await ask(fay, got.room, "marker after the second", bot)
    assert len(undecryptable_notices(fay, got.room, bot, mark)) == 1
    said = [e["content"].get(ANSWERS) for e in bot_messages(fay, got.room, bot, mark)]
    assert said == [None, marker], said  # the one notice, then the marker's answer

    # Keys that arrive within the wait: the message is answered, not reported.
    await fay.sync_once(0)
    mark = fay.mark()
    log_mark = stack.log_mark()
    late = await fay.send_text_withheld(got.room, "keys on their way")
    # maubot tried and handed it on undecrypted; the plugin is waiting for its keys now.
    stack.wait_for_log(f"Failed to decrypt {late}", after=log_mark, timeout=NOTICE_TIMEOUT)
    await fay.release_keys(late)
    answer = await answer_to(fay, got.room, bot, late, NOTICE_TIMEOUT)
    assert notice_text(answer) == "echo: keys on their way\n\n(message 3 in this conversation)"
    marker, _ = await ask(fay, got.room, "marker after the late keys", bot)
    assert not undecryptable_notices(fay, got.room, bot, mark)
    assert len(answers_to(fay, got.room, bot, late)) == 1
    assert f"Can't decrypt {late} from " not in stack.maubot.log_text()[log_mark:]


async def test_encrypt_turns_a_plain_chat_encrypted(encrypted, e2e_user) -> None:
    stack = encrypted.stack
    need_crypto(stack)
    gus = await e2e_user("gus")
    bot = stack.bot_id
    await stack.configure({"spaces": {"encryption": "never"}})
    try:
        got = await onboard(gus, stack, encrypted=True)
    finally:
        await stack.configure({"spaces": {"encryption": "auto"}})
    assert await gus.state_event(got.room, "m.room.encryption") is None
    _, answer = await ask(gus, got.room, "in the clear", bot)
    assert "decrypted" not in answer
    assert (await on_server(gus, got.room, answer["event_id"]))["type"] == "m.room.message"

    ask_first = notice_text(await gus.command(got.room, "!encrypt", bot))
    assert "!encrypt --confirm" in ask_first and "cannot be turned off" in ask_first
    assert await gus.state_event(got.room, "m.room.encryption") is None  # nothing done yet
    done = await gus.command(got.room, "!encrypt --confirm", bot)
    assert "now end-to-end encrypted" in notice_text(done)
    encryption = await gus.state_event(got.room, "m.room.encryption")
    assert encryption is not None and encryption["sender"] == bot
    await gus.wait_until(lambda: gus.state_store.encryption.get(got.room), 60, "encryption")

    secret, answer = await ask(gus, got.room, "now a secret", bot)
    assert (await on_server(gus, got.room, secret))["type"] == ENCRYPTED
    await assert_sealed(gus, got.room, answer, "a secret")
    assert notice_text(answer) == "echo: now a secret\n\n(message 2 in this conversation)"
    already = await gus.command(got.room, "!encrypt", bot)
    assert "already end-to-end encrypted" in notice_text(already) and already.get("decrypted")
    assert not gus.undecryptable(got.room)


async def test_a_process_restart_keeps_the_bot_device_and_answers(encrypted, e2e_user) -> None:
    """maubot itself down and up again: the bot keeps its device (its crypto store lives in
    maubot's database), the message sent while it was down and the first one after are each
    answered once, encrypted, though maubot drops its first sync after a start."""
    stack = encrypted.stack
    need_crypto(stack)
    ivy = await e2e_user("ivy")
    got = await onboard(ivy, stack, encrypted=True)
    bot = stack.bot_id
    await ask(ivy, got.room, "before", bot)
    device = stack.crypto.device_id
    await ivy.sync_once(0)
    mark = ivy.mark()
    sent: list[str] = []

    async def write_while_down() -> None:
        sent.append(await ivy.send_text(got.room, "written while maubot was down"))

    await stack.restart_server(write_while_down)
    assert (await stack.refresh_crypto()).on and stack.crypto.device_id == device
    after = await ivy.send_text(got.room, "written right after the start")
    missed_answer = await answer_to(ivy, got.room, bot, sent[0])
    after_answer = await answer_to(ivy, got.room, bot, after)
    await assert_sealed(ivy, got.room, missed_answer, "while maubot was down")
    await assert_sealed(ivy, got.room, after_answer, "right after the start")
    said = [e["content"].get(ANSWERS) for e in bot_messages(ivy, got.room, bot, mark)]
    assert said == [sent[0], after], said  # each once, in the order written
    assert "(message 3 " in notice_text(after_answer)
    assert not ivy.undecryptable(got.room)


async def test_undecryptable_while_stopped_is_not_silent(encrypted, e2e_user) -> None:
    """Messages sent while the instance is stopped, read by the catch-up without their keys:
    one whose keys come after the start is answered (within the catch-up window), one whose
    keys never come gets the notice. Neither is passed over in silence."""
    stack = encrypted.stack
    need_crypto(stack)
    hal = await e2e_user("hal")
    got = await onboard(hal, stack, encrypted=True)
    bot = stack.bot_id
    await ask(hal, got.room, "hello", bot)
    await hal.sync_once(0)
    mark = hal.mark()

    log_mark = stack.log_mark()
    await stop_instance(stack)
    try:
        never = await hal.send_text_withheld(got.room, "keys that never come")
        late = await hal.send_text_withheld(got.room, "keys that come after the start")
    finally:
        await start_instance(stack)  # the catch-up has read the room by now
    await hal.release_keys(late)

    def both() -> bool:
        return bool(answers_to(hal, got.room, bot, late)) and bool(
            undecryptable_notices(hal, got.room, bot, mark)
        )

    with contextlib.suppress(TimeoutError):  # which one is missing is said below
        await hal.wait_until(both, NOTICE_TIMEOUT, "an answer and a notice")
    said = [notice_text(e) for e in bot_messages(hal, got.room, bot, mark)]
    logged = f"Can't decrypt {never} from " in stack.maubot.log_text()[log_mark:]
    assert len(answers_to(hal, got.room, bot, late)) == 1, (
        f"{late} (keys released after the start) was not answered: {said}"
    )
    assert len(undecryptable_notices(hal, got.room, bot, mark)) == 1, (
        f"{never} (keys never sent) got no notice: {said}; logged: {logged}"
    )


def _one_key(keys: dict, user_id: str) -> tuple[str, dict]:
    """The public key of a user's cross-signing key of /keys/query, and its object."""
    key_object = keys[user_id]
    [(key_id, public)] = key_object["keys"].items()
    assert key_id == f"ed25519:{public}", key_object
    return public, key_object


async def test_the_bot_device_is_cross_signed_as_a_client_sees_it(encrypted, e2e_user) -> None:
    """deploy() cross-signed the bot's device through maubot's management API (as an operator
    does in the admin UI): an encrypting client finds it signed by the bot's self-signing key,
    which its master key signs; the recovery key is in a 0600 file and in no log; the start
    logged it signed; `!lambda status` says so."""
    from mautrix.crypto.signature import verify_signature_json
    from mautrix.types import TrustState

    stack = encrypted.stack
    need_crypto(stack)
    assert stack.signing is not None and stack.signing.signed, stack.signing
    key_file = stack.signing.key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    recovery_key = key_file.read_text().strip()
    logs = stack.maubot.log_text() + (stack.maubot.dir / "maubot.out").read_text(errors="replace")
    assert len(recovery_key) > 40 and recovery_key not in logs
    assert recovery_key.replace(" ", "") not in logs.replace(" ", "")
    bot, device_id = stack.bot_id, stack.crypto.device_id
    stack.wait_for_log(f"The bot's device {device_id} is cross-signed")
    assert "is not cross-signed" not in stack.maubot.log_text()
    ivo = await e2e_user("ivo")
    got = await onboard(ivo, stack, encrypted=True)
    await stack.configure({"access": {"admins": [ivo.user_id]}})
    try:
        status = notice_text(await ivo.command(got.room, "!lambda status", bot))
    finally:
        await stack.configure({"access": {"admins": []}})
    assert f"The bot's device `{device_id}`: ✅ cross-signed" in status, status
    keys = await ivo.request(
        "POST", "/_matrix/client/v3/keys/query", {"device_keys": {bot: [device_id]}}
    )
    master, _ = _one_key(keys["master_keys"], bot)
    ssk, ssk_object = _one_key(keys["self_signing_keys"], bot)
    device = keys["device_keys"][bot][device_id]
    assert verify_signature_json(ssk_object, bot, master, master)
    assert verify_signature_json(device, bot, ssk, ssk), device
    # And as the client's own crypto (mautrix's OlmMachine) judges the bot's device.
    identity = await ivo.machine.get_or_fetch_device(bot, device_id)
    assert identity is not None
    assert await ivo.machine.resolve_trust(identity) >= TrustState.CROSS_SIGNED_UNTRUSTED
