"""Voice messages answered from their transcript (plain and encrypted rooms), usage counted
from plain and streamed answers, and daily/monthly quotas, over a real Synapse + maubot with
the local OpenAI-compatible server as both the transcriber and the agents."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import pytest_asyncio

from devstack.matrix import Event, MatrixUser
from devstack.stack import Deployment
from tests.servers.openai_server import COUNT, OpenAIServer

from .helpers import completed, notice_text, onboard

pytestmark = pytest.mark.real

ANSWERS = "ai.lambda.matrix.answers"  # the user's event a notice or answer is for
# The same on what the bot sends while it works on it (a stream's first event, a transcript).
ANSWERING = "ai.lambda.matrix.answering"
# On a notice about it that does not end it (why it was kept; a voice message's transcript).
ABOUT = "ai.lambda.matrix.about"
HEARD = "🎤 Heard:\n"
API_KEY = "sk-voice-secret"
AUDIO = b"OggS\x00\x02" + bytes(range(256)) * 24  # what a voice message carries, give or take
USAGE_LINE = r"- {period}: (\d+) / (\d+), (\d+) answers"


# --- waiting and talking ---------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 60, what: str = "condition"
) -> Any:
    """Polls an async ``check`` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def from_bot(bot: str, answers: str | None = None, starts: str | None = None):
    """A message from the bot (not an edit), optionally answering ``answers`` and with a
    body starting with ``starts``."""

    def match(e: Event) -> bool:
        content = e["content"]
        if e["type"] != "m.room.message" or e["sender"] != bot:
            return False
        if content.get("m.relates_to", {}).get("rel_type") == "m.replace":
            return False
        named = (content.get(ANSWERS), content.get(ANSWERING), content.get(ABOUT))
        if answers is not None and answers not in named:
            return False
        return starts is None or content.get("body", "").startswith(starts)

    return match


async def say(user: MatrixUser, room: str, body: str, bot: str, timeout: float = 60) -> str:
    """Sends ``body`` and returns the bot's complete answer to it."""
    await user.sync_once(0)
    mark = user.mark()
    sent = await user.send_text(room, body)
    first = await user.wait_for_event(room, from_bot(bot, answers=sent), mark, timeout)
    return await completed(user, room, first, timeout=timeout)


async def retry(user: MatrixUser, room: str, bot: str, answers: str, starts: str) -> Event:
    """``!retry``: the bot says it retries, then sends its answer to the kept message."""
    await user.sync_once(0)
    mark = user.mark()
    await user.send_text(room, "!retry")
    await user.wait_for_event(room, lambda e: "Retrying" in e["content"].get("body", ""), mark)
    return await user.wait_for_event(room, from_bot(bot, answers=answers, starts=starts), mark)


def echo_answer(text: str, number: int) -> str:
    """What the echo agent answers to ``text``, the ``number``-th message of its chat."""
    return f"echo: {text}\n\n(message {number} in this conversation)"


async def send_voice(user: MatrixUser, room: str, data: bytes) -> str:
    """A voice message as Element sends it: m.audio with the MSC3245 voice marker; in an
    encrypted room (from an encrypting user) the audio goes as an encrypted attachment."""
    info = {"mimetype": "audio/ogg", "size": len(data), "duration": 2300}
    content: dict[str, Any] = {
        "msgtype": "m.audio",
        "body": "voice.ogg",
        "info": info,
        "org.matrix.msc1767.audio": {"duration": 2300, "waveform": [0, 512, 1024, 512, 0]},
        "org.matrix.msc3245.voice": {},
    }
    if hasattr(user, "machine") and await user.is_encrypted(room):  # an E2EUser
        from mautrix.crypto.attachments import encrypt_attachment

        ciphertext, sealed = encrypt_attachment(data)
        sealed.url = await user.upload(ciphertext, "application/octet-stream", "upload")
        content["file"] = sealed.serialize()
    else:
        content["url"] = await user.upload(data, "audio/ogg", "voice.ogg")
    return await user.send(room, content)


def transcription_requests(server: OpenAIServer) -> list:
    return [r for r in server.requests if r.path == "/v1/audio/transcriptions"]


def chat_requests(server: OpenAIServer) -> list:
    return [r for r in server.requests if r.path == "/v1/chat/completions"]


def prompt_chars(request) -> int:
    """The server's count of a request's tokens in: every message's characters."""
    return sum(len(m["content"]) for m in request.json["messages"])


def usage_line(body: str, period: str) -> tuple[int, int, int]:
    """(tokens in, tokens out, answers) of one line of ``!usage``."""
    found = re.search(USAGE_LINE.format(period=re.escape(period)), body)
    assert found, f"no {period!r} line in {body!r}"
    return int(found.group(1)), int(found.group(2)), int(found.group(3))


async def recorded_requests(stack: Deployment, user_id: str) -> int:
    """Answers counted for the user so far, read from the plugin database."""
    # Summed here: PostgreSQL's SUM is a NUMERIC, which maubot's query API can't send.
    rows = await stack.sql(f"SELECT requests FROM usage WHERE user_id='{user_id}'")
    return sum(int(row["requests"]) for row in rows)


async def wait_recorded(stack: Deployment, user_id: str, count: int) -> None:
    """Usage is recorded just after an answer is delivered: wait until it is there."""

    async def check() -> bool:
        return await recorded_requests(stack, user_id) >= count

    await eventually(check, 60, f"{count} answers recorded for {user_id}")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def next_day(now: datetime) -> str:
    return (now + timedelta(days=1)).strftime("%Y-%m-%d 00:00 UTC")


def next_month(now: datetime) -> str:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return f"{year:04d}-{month:02d}-01 00:00 UTC"


# --- the config, kept as it was ---------------------------------------------------------------


async def config_text(stack: Deployment) -> str:
    return (await stack.maubot.get_instance(stack.instance_id))["config"]


async def put_config_text(stack: Deployment, text: str) -> None:
    """Puts the whole config back as it was (a merge cannot remove keys or empty a map)."""
    await stack.maubot.api("PUT", f"/instance/{stack.instance_id}", json={"config": text})


@pytest_asyncio.fixture(scope="module")
async def openai(stack: Deployment) -> AsyncIterator[OpenAIServer]:
    """The OpenAI-compatible server, as the transcriber and as two agents: ``vgpt``
    (answers as one JSON) and ``vsgpt`` (streamed, usage in a last chunk)."""
    server = OpenAIServer()
    url = await server.start()
    before = await config_text(stack)
    common = {"backend": "openai", "base_url": url, "model": "test-model", "timeout_s": 10}
    await stack.configure(
        {
            "agents": {
                "registry": {
                    "vgpt": {**common, "api_key": "sk-test-secret", "stream": False},
                    "vsgpt": {**common, "api_key": "sk-test-secret", "stream": True},
                }
            },
            "replies": {"stream_edit_interval_s": 0.3},
        }
    )
    yield server
    await put_config_text(stack, before)
    await server.stop()


@pytest_asyncio.fixture
async def restored(stack: Deployment, openai: OpenAIServer) -> AsyncIterator[OpenAIServer]:
    """The server in its default modes, and the config put back as it was after the test."""
    before = await config_text(stack)
    yield openai
    openai.mode, openai.usage, openai.reply_text = "ok", COUNT, None
    openai.transcription_mode, openai.transcript = "ok", "a voice message, transcribed"
    await put_config_text(stack, before)


async def transcribe_with(stack: Deployment, server: OpenAIServer) -> None:
    await stack.configure(
        {"transcription": {"base_url": server.base_url, "model": "whisper-1", "api_key": API_KEY}}
    )


async def voice_round_trip(
    user: MatrixUser, room: str, bot: str, server: OpenAIServer, transcript: str, number: int
) -> tuple[str, Event, Event]:
    """A voice message: the quoted transcript, then echo's answer to it, both marked as the
    answers to it; and the transcriber got the very audio. Returns (event id, heard, answer)."""
    server.transcript = transcript
    seen = len(transcription_requests(server))
    await user.sync_once(0)
    mark = user.mark()
    voice = await send_voice(user, room, AUDIO)
    heard = await user.wait_for_event(room, from_bot(bot, answers=voice, starts=HEARD), mark, 90)
    assert notice_text(heard) == f"{HEARD}> {transcript}"
    assert "<blockquote>" in heard["content"].get("formatted_body", ""), heard
    answer = await user.wait_for_event(room, from_bot(bot, answers=voice, starts="echo:"), mark)
    assert notice_text(answer) == echo_answer(transcript, number)
    timeline = user.events_since(room, mark)
    assert timeline.index(heard) < timeline.index(answer)

    got = transcription_requests(server)[seen:]
    assert len(got) == 1, got
    form = got[0].form
    assert form["model"] == "whisper-1" and form["response_format"] == "json"
    assert form["file"].data == AUDIO
    assert form["file"].filename == "voice.ogg" and form["file"].content_type == "audio/ogg"
    assert got[0].headers.get("Authorization") == f"Bearer {API_KEY}"
    return voice, heard, answer


# --- 1. voice in a plain room ----------------------------------------------------------------


async def test_voice_message_answered_from_its_transcript(
    stack: Deployment, restored: OpenAIServer, new_user
) -> None:
    server = restored
    vic = await new_user("vic")
    got = await onboard(vic, stack)
    bot = stack.bot_id

    # No transcriber: a voice message is a file like any other, and nothing is transcribed
    seen = len(transcription_requests(server))
    assert "not transcribed" in notice_text(await vic.command(got.room, "!help", bot))
    await vic.sync_once(0)
    mark = vic.mark()
    plain = await send_voice(vic, got.room, AUDIO)
    answer = await vic.wait_for_event(got.room, from_bot(bot, answers=plain), mark)
    # (echo takes no files without a workspace: the audio is refused as any file would be)
    assert "voice.ogg was not passed on" in notice_text(answer)
    assert len(transcription_requests(server)) == seen

    # With one: the transcript quoted in the room, and echo answers the transcript.
    await transcribe_with(stack, server)
    assert "answered from their transcript" in notice_text(
        await vic.command(got.room, "!help", bot)
    )
    await voice_round_trip(vic, got.room, bot, server, "what is the weather like today", 1)

    # A transcriber that fails: a clear error and the message kept; !retry once it is back.
    server.transcription_mode = "fail"
    await vic.sync_once(0)
    mark = vic.mark()
    voice = await send_voice(vic, got.room, AUDIO)
    error = notice_text(await vic.wait_for_event(got.room, from_bot(bot, answers=voice), mark))
    assert "transcription service" in error and "HTTP 500" in error and "!retry" in error
    assert API_KEY not in error
    assert not [e for e in vic.events_since(got.room, mark) if from_bot(bot, starts=HEARD)(e)]
    server.transcription_mode = "ok"
    server.transcript = "and now once more"
    answer = await retry(vic, got.room, bot, voice, "echo:")
    assert notice_text(answer) == echo_answer("and now once more", 2)
    heard = [e for e in vic.events_since(got.room, mark) if from_bot(bot, starts=HEARD)(e)]
    assert [notice_text(e) for e in heard] == [f"{HEARD}> and now once more"]
    assert transcription_requests(server)[-1].form["file"].data == AUDIO
    assert API_KEY not in stack.maubot.log_text()


# --- 2. voice in an encrypted room -----------------------------------------------------------


async def test_voice_message_in_an_encrypted_room(
    stack: Deployment, restored: OpenAIServer
) -> None:
    if not (stack.crypto and stack.crypto.on):
        pytest.skip(f"maubot does not encrypt here: {stack.crypto and stack.crypto.describe()}")
    server = restored
    await stack.configure({"spaces": {"encryption": "auto"}})
    await transcribe_with(stack, server)
    eve = await stack.e2e_user(f"voice_e2e_{stack.engine}_{time.time_ns()}")
    try:
        got = await onboard(eve, stack, encrypted=True)
        bot = stack.bot_id
        assert await eve.is_encrypted(got.room)
        _, heard, answer = await voice_round_trip(
            eve, got.room, bot, server, "a secret spoken aloud", 1
        )
        assert heard.get("decrypted") and answer.get("decrypted")
        # The server saw neither the audio nor the transcript.
        for event_id in (heard["event_id"], answer["event_id"]):
            raw = await eve.request("GET", f"/_matrix/client/v3/rooms/{got.room}/event/{event_id}")
            assert raw["type"] == "m.room.encrypted" and "secret" not in str(raw)
        assert not eve.undecryptable(got.room)
    finally:
        await eve.close()
        stack.users.remove(eve)


# --- 3. usage from echo, a plain and a streamed answer --------------------------------------


async def test_usage_counted_for_plain_and_streamed_answers(
    stack: Deployment, restored: OpenAIServer, new_user
) -> None:
    server = restored
    uma = await new_user("uma")
    got = await onboard(uma, stack)
    bot = stack.bot_id
    tokens_in = tokens_out = 0

    # echo: a character is a token.
    text = "count these characters, please"
    answer = await say(uma, got.room, text, bot)
    assert answer == echo_answer(text, 1)
    tokens_in, tokens_out = tokens_in + len(text), tokens_out + len(answer)

    # openai, one JSON answer with its usage: the server counts a character as a token.
    assert "vgpt" in notice_text(await uma.command(got.room, "!agent vgpt", bot))
    seen = len(chat_requests(server))
    text = "a plain question"
    answer = await say(uma, got.room, text, bot)
    assert answer == f"reply to: {text}"
    request = chat_requests(server)[seen]
    assert request.json["stream"] is False
    tokens_in, tokens_out = tokens_in + prompt_chars(request), tokens_out + len(answer)

    # openai streamed: the usage comes in a last chunk, asked for.
    assert "vsgpt" in notice_text(await uma.command(got.room, "!agent vsgpt", bot))
    server.chunks, server.chunk_delay_s = 4, 0.2
    try:
        seen = len(chat_requests(server))
        text = "a streamed question with a longer answer"
        answer = await say(uma, got.room, text, bot)
    finally:
        server.chunks, server.chunk_delay_s = 3, 0.0
    assert answer == f"reply to: {text}"
    request = chat_requests(server)[seen]
    assert request.json["stream"] is True
    assert request.json["stream_options"] == {"include_usage": True}
    tokens_in, tokens_out = tokens_in + prompt_chars(request), tokens_out + len(answer)

    await wait_recorded(stack, uma.user_id, 3)
    usage = notice_text(await uma.command(got.room, "!usage", bot))
    expected = (tokens_in, tokens_out, 3)
    assert usage_line(usage, "today (UTC)") == expected, usage
    assert usage_line(usage, "this month") == expected, usage
    assert usage_line(usage, "this chat, this month") == expected, usage
    assert "(limit" not in usage
    # In the DM (not a chat room): the user's totals, no chat line.
    in_dm = notice_text(await uma.command(got.dm, "!usage", bot))
    assert usage_line(in_dm, "today (UTC)") == expected and "this chat" not in in_dm

    # A usage the server reports is taken as it is (past 32 bits: counted in BIGINT).
    assert "vgpt" in notice_text(await uma.command(got.room, "!agent vgpt", bot))
    server.usage = {"prompt_tokens": 3_000_000_000, "completion_tokens": 7}
    try:
        assert await say(uma, got.room, "an expensive one", bot) == "reply to: an expensive one"
    finally:
        server.usage = COUNT
    tokens_in, tokens_out = tokens_in + 3_000_000_000, tokens_out + 7
    await wait_recorded(stack, uma.user_id, 4)
    usage = notice_text(await uma.command(got.room, "!usage", bot))
    assert usage_line(usage, "this month") == (tokens_in, tokens_out, 4), usage

    # The admins' view: the top users, and the month as a CSV file.
    refused = notice_text(await uma.command(got.room, "!lambda usage", bot))
    assert "for the bot's admins" in refused
    await stack.configure({"access": {"admins": [uma.user_id]}})
    top = notice_text(await uma.command(got.room, "!lambda usage", bot))
    assert top.startswith("**Top users this month**"), top
    # The most tokens of anyone in this deployment: listed first.
    assert top.splitlines()[1] == f"- {uma.user_id}: {tokens_in} / {tokens_out}, 4", top

    await uma.sync_once(0)
    mark = uma.mark()
    await uma.send_text(got.room, "!lambda usage csv")
    first_day = utc_now().strftime("%Y-%m-01")
    said = await uma.wait_for_event(got.room, from_bot(bot, starts="Usage since"), mark)
    assert first_day[:7] in notice_text(said)

    def is_csv(e: Event) -> bool:
        return from_bot(bot)(e) and e["content"].get("body", "").endswith(".csv")

    file_event = await uma.wait_for_event(got.room, is_csv, mark)
    content = file_event["content"]
    assert content["msgtype"] == "m.file" and content["info"]["mimetype"] == "text/csv"
    assert content["body"] == f"usage-{first_day[:7]}.csv"
    rows = list(csv.reader(io.StringIO((await uma.download(content["url"])).decode())))
    assert rows[0] == ["day", "user_id", "room_id", "tokens_in", "tokens_out", "requests"]
    mine = [dict(zip(rows[0], row, strict=True)) for row in rows[1:] if row[1] == uma.user_id]
    assert mine, rows
    assert {r["room_id"] for r in mine} == {got.room}
    assert all(r["day"] >= first_day for r in mine)
    assert sum(int(r["tokens_in"]) for r in mine) == tokens_in
    assert sum(int(r["tokens_out"]) for r in mine) == tokens_out
    assert sum(int(r["requests"]) for r in mine) == 4


# --- 4. quotas ------------------------------------------------------------------------------


async def test_quota_refusal_and_its_reset(
    stack: Deployment, restored: OpenAIServer, new_user
) -> None:
    quinn = await new_user("quinn")
    got = await onboard(quinn, stack)
    bot = stack.bot_id
    await stack.configure({"access": {"daily_tokens": 5}})

    # Checked before answering: the first message goes through, and costs more than 5.
    assert await say(quinn, got.room, "hi", bot) == echo_answer("hi", 1)
    before = utc_now()
    await quinn.sync_once(0)
    mark = quinn.mark()
    kept = await quinn.send_text(got.room, "over the limit")
    refusal = notice_text(await quinn.wait_for_event(got.room, from_bot(bot, answers=kept), mark))
    assert refusal.startswith("⚠️ You have used today's 5 tokens."), refusal
    assert any(f"resets at {next_day(t)};" in refusal for t in (before, utc_now())), refusal
    assert "!retry" in refusal
    spent = len("hi") + len(echo_answer("hi", 1))
    usage = notice_text(await quinn.command(got.room, "!usage", bot))
    assert usage_line(usage, "today (UTC)") == (2, spent - 2, 1), usage
    assert "(limit 5)" in usage

    # A retry passes the same check: still refused.
    await quinn.sync_once(0)
    mark = quinn.mark()
    await quinn.send_text(got.room, "!retry")
    await quinn.wait_for_event(
        got.room, from_bot(bot, answers=kept, starts="⚠️ You have used today's"), mark
    )
    assert not [e for e in quinn.events_since(got.room, mark) if from_bot(bot, starts="echo:")(e)]

    # The limit raised live (a config change, as the admin UI makes it): !retry answers.
    await stack.configure({"access": {"daily_tokens": 100_000}})
    answer = await retry(quinn, got.room, bot, kept, "echo:")
    assert notice_text(answer) == echo_answer("over the limit", 2)

    # The month's limit, and a per-user exception lifting it.
    await stack.configure({"access": {"daily_tokens": 0, "monthly_tokens": 5}})
    before = utc_now()
    await quinn.sync_once(0)
    mark = quinn.mark()
    kept = await quinn.send_text(got.room, "and this month?")
    refusal = notice_text(await quinn.wait_for_event(got.room, from_bot(bot, answers=kept), mark))
    assert refusal.startswith("⚠️ You have used this month's 5 tokens."), refusal
    assert any(f"resets at {next_month(t)};" in refusal for t in (before, utc_now())), refusal
    await stack.configure({"access": {"token_limits": {quinn.user_id: {"monthly": 0}}}})
    answer = await retry(quinn, got.room, bot, kept, "echo:")
    assert notice_text(answer) == echo_answer("and this month?", 3)
