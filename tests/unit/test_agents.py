"""The agent backends against a real SQLite store and the local test servers."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from itertools import pairwise
from typing import Any

import aiohttp
import pytest
from mautrix.util.async_db import Database

from lambda_plugin.agent_config import AgentSpec
from lambda_plugin.agents import (
    Agent,
    AgentError,
    AgentReply,
    AgentRequest,
    Attachment,
    ContextInfo,
    Usage,
    create_agent,
)
from lambda_plugin.agents.http import ERROR_BODY_BYTES
from lambda_plugin.agents.openai import _sse_data
from lambda_plugin.db import HistoryBounds, Store, upgrade_table
from lambda_plugin.texts import TEXTS
from tests.servers.lambda_server import LambdaServer
from tests.servers.openai_server import OpenAIServer

LOG = logging.getLogger("test.agents")
CHAT = "pc-1"
SECRET = "sk-test-secret-123"

UNREACHABLE = "The agent is unreachable right now."
TIMEOUT = "The agent took too long to answer."
UNREADABLE = "The agent's answer could not be read."
EMPTY = "The agent gave an empty answer."


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[Store]:
    """SQLite only, overriding the conftest's two engines: agents use the Store's queries,
    which test_store.py covers on both."""
    db = Database.create(f"sqlite:{tmp_path}/t.db", upgrade_table=upgrade_table)
    await db.start()
    yield Store(db)
    await db.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def openai_server() -> AsyncIterator[OpenAIServer]:
    server = OpenAIServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def lambda_server() -> AsyncIterator[LambdaServer]:
    server = LambdaServer(token=SECRET)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def make(store: Store, http: aiohttp.ClientSession):
    """Builds an agent of a backend with options; time-outs default to a generous bound."""

    def build(backend: str, **options: Any) -> Agent:
        if backend != "echo":
            options.setdefault("timeout_s", 10)
        return create_agent(AgentSpec(backend, backend, options), store, http, LOG)

    return build


def ask(text: str = "hi", chat: str = CHAT, files: tuple[Attachment, ...] = ()) -> AgentRequest:
    return AgentRequest(platform_chat_id=chat, text=text, user_id="@alice:test", attachments=files)


async def history(store: Store, chat: str = CHAT) -> list[tuple[str, str]]:
    return [(row.role, row.content) for row in await store.history(chat)]


def assert_no_secret(error: AgentError) -> None:
    for text in (error.user_message, str(error), repr(error), error.cause):
        assert SECRET not in text


# echo


async def test_echo_counts_messages_and_keeps_history(make, store: Store) -> None:
    echo = make("echo")
    first = await echo.respond(ask("hello"))
    second = await echo.respond(ask("again"))
    assert first.text.startswith("echo: hello")
    assert "(message 1 in this conversation)" in first.text
    assert "(message 2 in this conversation)" in second.text
    assert await history(store) == [
        ("user", "hello"),
        ("assistant", first.text),
        ("user", "again"),
        ("assistant", second.text),
    ]
    chars = len("hello") + len(first.text) + len("again") + len(second.text)
    assert await echo.context(CHAT) == ContextInfo(messages=4, chars=chars)
    assert await echo.health() is None


async def test_echo_lists_attachments(make) -> None:
    files = (
        Attachment("a.pdf", "application/pdf", 10, workspace_path="surfaces/matrix/u/r/inbox/a"),
        Attachment("b.txt", "text/plain", 3, data=b"abc"),
    )
    reply = await make("echo").respond(ask("see", files=files))
    assert "- a.pdf (application/pdf, 10 bytes): surfaces/matrix/u/r/inbox/a" in reply.text
    assert "- b.txt (text/plain, 3 bytes): inline" in reply.text
    assert reply.attachments == ()


async def test_echo_drop_starts_afresh(make, store: Store) -> None:
    echo = make("echo")
    await echo.respond(ask("one"))
    await echo.respond(ask("other chat", chat="pc-2"))
    await echo.drop(CHAT)
    assert await echo.context(CHAT) == ContextInfo(0, 0)
    assert await echo.context("pc-2") == ContextInfo(2, (await echo.context("pc-2")).chars)
    assert "(message 1 in this conversation)" in (await echo.respond(ask("two"))).text
    await echo.drop("never-seen")  # no error


async def test_snapshot_continues_in_new_chats_and_stays_reusable(make, store: Store) -> None:
    echo = make("echo")
    await echo.respond(ask("one"))
    await echo.respond(ask("two"))
    snapshot = await echo.snapshot(CHAT)
    json.loads(snapshot)  # opaque, but JSON text
    for chat in ("pc-2", "pc-3"):
        await echo.restore(chat, snapshot)
        assert await history(store, chat) == await history(store, CHAT)
        reply = await echo.respond(ask("three", chat=chat))
        assert "(message 3 in this conversation)" in reply.text
    assert (await echo.context(CHAT)).messages == 4


def counting_rows(store: Store) -> list[int]:
    """Records how many rows each read of ``store``'s database hands back."""
    read: list[int] = []
    fetch, fetchrow = store.db.fetch, store.db.fetchrow

    async def counted_fetch(*args: Any) -> Any:
        rows = await fetch(*args)
        read.append(len(rows))
        return rows

    async def counted_fetchrow(*args: Any) -> Any:
        read.append(1)
        return await fetchrow(*args)

    store.db.fetch, store.db.fetchrow = counted_fetch, counted_fetchrow  # type: ignore[method-assign]
    return read


@pytest.mark.parametrize("backend", ["echo", "openai"])
@pytest.mark.parametrize("call", ["respond", "context", "snapshot"])
async def test_a_long_conversation_is_read_within_the_bound(
    store: Store, http: aiohttp.ClientSession, openai_server: OpenAIServer, backend: str,
    call: str,
) -> None:  # fmt: skip
    # 300 turns from before the bound (or a bound lowered since): no read takes them all.
    unbounded = Store(store.db, history_bounds=lambda: HistoryBounds(10**6, 10**9))
    await unbounded.append_history(CHAT, [("user", f"m{i}") for i in range(300)])
    small = Store(store.db, history_bounds=lambda: HistoryBounds(max_turns=10))
    options = {} if backend == "echo" else {"base_url": openai_server.base_url, "model": "m"}
    agent = create_agent(AgentSpec(backend, backend, {**options, "timeout_s": 10}), small, http, LOG)
    read = counting_rows(store)
    result = await getattr(agent, call)(ask("hello") if call == "respond" else CHAT)
    assert read and max(read) <= 10, read
    if call == "snapshot":
        assert [m["content"] for m in json.loads(result)["messages"]] == [f"m{i}" for i in range(290, 300)]
    if call == "context":
        assert result == ContextInfo(messages=300, chars=sum(len(f"m{i}") for i in range(300)))


async def test_a_restored_snapshot_keeps_its_newest_turns_within_the_bound(store: Store) -> None:
    small = Store(store.db, history_bounds=lambda: HistoryBounds(max_turns=4))
    echo = create_agent(AgentSpec("echo", "echo", {}), small, None, LOG)  # type: ignore[arg-type]
    messages = [{"role": "user", "content": f"m{i}"} for i in range(10)]
    await echo.restore("pc-2", json.dumps({"version": 1, "messages": messages}))
    assert await history(small, "pc-2") == [("user", f"m{i}") for i in range(6, 10)]
    assert await echo.context("pc-2") == ContextInfo(messages=4, chars=8, pruned=6)
    assert "(message 5 in this conversation)" in (await echo.respond(ask("x", chat="pc-2"))).text
    assert (await echo.context("pc-2")).pruned == 8


@pytest.mark.parametrize("snapshot", ["not json", '{"messages": 3}', '{"messages": [{"a": 1}]}'])
async def test_restore_refuses_a_foreign_snapshot(make, store: Store, snapshot: str) -> None:
    with pytest.raises(AgentError) as caught:
        await make("echo").restore(CHAT, snapshot)
    assert caught.value.user_message == "This snapshot cannot be used with this agent."
    assert await history(store) == []


# AgentError.describe: the one place an error becomes the user's text


def test_describe_translates_the_key_with_its_values() -> None:
    error = AgentError.of("agent.http_error", "POST /x: HTTP 502", status=502)
    assert error.describe("en") == "The agent answered with an error (HTTP 502)."
    assert error.describe("ru") == TEXTS["ru"]["agent.http_error"].format(status=502)
    assert error.describe("xx") == error.user_message  # an unknown language falls back to English


@pytest.mark.parametrize("key", ["", "agent.not_a_text_yet", "agent.http_error"])
def test_describe_falls_back_to_the_user_message(key: str) -> None:
    # No key, a key texts.py does not hold, or values that do not fit the text.
    error = AgentError("Something specific failed.", "cause", key=key)
    assert error.describe("ru") == "Something specific failed."


# openai: answers


def openai(make, server: OpenAIServer, **options: Any) -> Agent:
    return make("openai", base_url=server.base_url, model="test-model", **options)


async def test_openai_plain_answer(make, store: Store, openai_server: OpenAIServer) -> None:
    agent = openai(make, openai_server, stream=False, api_key=SECRET, system_prompt="Be brief.")
    reply = await agent.respond(ask("hello"))
    # The server counts a character as a token: the system prompt and the message in.
    usage = Usage(len("Be brief.") + len("hello"), len("reply to: hello"))
    assert reply == AgentReply("reply to: hello", usage=usage)
    [sent] = openai_server.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"
    assert sent.json == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
        ],
        "stream": False,
    }
    assert await history(store) == [("user", "hello"), ("assistant", "reply to: hello")]
    assert await agent.context(CHAT) == ContextInfo(2, len("hello") + len("reply to: hello"))


async def test_openai_sends_the_newest_history_within_its_limit(
    make, openai_server: OpenAIServer
) -> None:
    agent = openai(make, openai_server, stream=False, max_history=2)
    for text in ("one", "two", "three"):
        await agent.respond(ask(text))
    assert "Authorization" not in openai_server.requests[0].headers
    assert openai_server.requests[2].json["messages"] == [
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "reply to: two"},
        {"role": "user", "content": "three"},
    ]


async def test_openai_streams_growing_text(make, store: Store, openai_server: OpenAIServer) -> None:
    openai_server.reply_text = "one two three four five six seven"
    openai_server.chunks = 4
    seen: list[str] = []

    async def on_partial(text: str) -> None:
        seen.append(text)

    reply = await openai(make, openai_server).respond(ask("hello"), on_partial)
    assert reply.text == "one two three four five six seven"
    assert openai_server.requests[0].json["stream"] is True
    assert len(seen) == 4
    assert all(b.startswith(a) and len(b) > len(a) for a, b in pairwise(seen))
    assert seen[-1] == reply.text
    assert await history(store) == [("user", "hello"), ("assistant", reply.text)]


async def test_openai_reads_a_stream_it_did_not_ask_for(make, openai_server: OpenAIServer) -> None:
    openai_server.mode = "stream"
    reply = await openai(make, openai_server, stream=False).respond(ask("x"))
    assert reply.text == "reply to: x"


async def test_openai_keeps_the_answer_when_showing_a_partial_fails(
    make, openai_server: OpenAIServer
) -> None:
    async def on_partial(text: str) -> None:
        raise RuntimeError("edit failed")

    reply = await openai(make, openai_server).respond(ask("x"), on_partial)
    assert reply.text == "reply to: x"


async def test_openai_answers_once_a_stalled_server_goes_on(
    make, openai_server: OpenAIServer
) -> None:
    openai_server.mode = "stall"
    task = asyncio.create_task(openai(make, openai_server).respond(ask("late")))
    await openai_server.wait_requests(1)
    assert not task.done()
    openai_server.release.set()
    assert (await asyncio.wait_for(task, 10)).text == "reply to: late"


# openai: files


async def test_openai_inlines_text_and_images(make, store: Store, openai_server) -> None:
    png = b"\x89PNG fake"
    files = (
        Attachment("notes.txt", "text/plain; charset=utf-8", 5, data=b"hello"),
        Attachment("data.json", "application/json", 2, data=b"{}"),
        Attachment("cat.png", "image/png", len(png), data=png),
    )
    await openai(make, openai_server, stream=False).respond(ask("look", files=files))
    [text_part, image_part] = openai_server.requests[0].json["messages"][-1]["content"]
    assert text_part["type"] == "text"
    assert text_part["text"].startswith("look\n\n[attached file: notes.txt (text/plain, 5 bytes)]")
    assert "\nhello\n[end of notes.txt]" in text_part["text"]
    assert "[attached file: data.json (application/json, 2 bytes)]\n{}\n" in text_part["text"]
    assert "[attached image: cat.png (image/png, 9 bytes)]" in text_part["text"]
    expected_url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert image_part == {"type": "image_url", "image_url": {"url": expected_url}}
    # History keeps the text part only: the image would not fit a context.
    assert (await history(store))[0] == ("user", text_part["text"])


async def test_openai_truncates_long_text_files(make, openai_server: OpenAIServer) -> None:
    big = b"z" * 200_000
    files = (Attachment("big.log", "text/plain", len(big), data=big),)
    openai_server.reply_text = "read it"  # not the echo: over the answer cap
    await openai(make, openai_server, stream=False).respond(ask("", files=files))
    content = openai_server.requests[0].json["messages"][-1]["content"]
    assert content.startswith("[attached file: big.log (text/plain, 200000 bytes), truncated]")
    assert content.count("z") == 100 * 1024


async def test_openai_names_workspace_paths(make, openai_server: OpenAIServer) -> None:
    files = (Attachment("a.pdf", "application/pdf", 7, workspace_path="surfaces/matrix/a.pdf"),)
    await openai(make, openai_server, stream=False).respond(ask("read", files=files))
    assert openai_server.requests[0].json["messages"][-1]["content"] == (
        "read\n\n[attached file: a.pdf (application/pdf, 7 bytes),"
        " workspace path: surfaces/matrix/a.pdf]"
    )


async def test_openai_refuses_other_inline_files_before_sending(
    make, store: Store, openai_server: OpenAIServer
) -> None:
    files = (Attachment("a.zip", "application/zip", 3, data=b"PK\x03"),)
    with pytest.raises(AgentError) as caught:
        await openai(make, openai_server).respond(ask("x", files=files))
    assert caught.value.user_message == "This agent cannot take files of type application/zip."
    assert openai_server.requests == []
    assert await history(store) == []


# openai: failures


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("fail", "The agent answered with an error (HTTP 503)."),
        ("garbage", UNREADABLE),
        ("shape", UNREADABLE),
        ("empty", EMPTY),
    ],
)
async def test_openai_failures(
    make, store: Store, openai_server: OpenAIServer, mode: str, message: str, stream: bool
) -> None:
    openai_server.mode = mode
    openai_server.status = 503
    agent = openai(make, openai_server, stream=stream, api_key=SECRET)
    with pytest.raises(AgentError) as caught:
        await agent.respond(ask("x"), None)
    assert caught.value.user_message == message
    assert_no_secret(caught.value)
    assert await history(store) == []


async def test_openai_error_cause_is_short_and_redacted(make, openai_server: OpenAIServer) -> None:
    openai_server.mode = "fail"
    openai_server.status = 401
    with pytest.raises(AgentError) as caught:
        await openai(make, openai_server, api_key=SECRET).respond(ask("x"))
    error = caught.value
    assert error.key == "agent.http_error" and error.values == {"status": 401}
    # The server echoed the Authorization header: the cause shows where it was, not what.
    assert "HTTP 401" in str(error) and "Bearer ***" in str(error)
    assert_no_secret(error)


# Where the key's first character lands in the text the client cuts, for the key to be cut
# right after its first 8 characters: at the 200 characters a cause keeps of a body, or at
# the end of the 1024 bytes read of an error body (whose 1009 spaces collapse into one).
LEAK_CUTS = [
    ("leak", "x", 200 - 8),
    ("leak", " ", ERROR_BODY_BYTES - 8),
    ("leak_shape", "x", 200 - 8 - len("{'echo': '")),
]


@pytest.mark.parametrize(("mode", "filler", "key_at"), LEAK_CUTS)
async def test_a_key_cut_in_two_leaks_no_part_of_it(
    make, openai_server: OpenAIServer, mode: str, filler: str, key_at: int
) -> None:
    openai_server.mode = mode
    openai_server.leak_filler = filler
    openai_server.leak_after = key_at - len("Bearer ")
    with pytest.raises(AgentError) as caught:
        await openai(make, openai_server, api_key=SECRET, stream=False).respond(ask("x"))
    error = caught.value
    assert "Bearer" in str(error)  # the echo is in the cause, the key is not
    for text in (error.user_message, str(error), repr(error), error.cause):
        assert SECRET[:8] not in text


async def test_openai_cut_stream_is_unreadable(make, store: Store, openai_server) -> None:
    openai_server.mode = "cut"
    seen: list[str] = []

    async def on_partial(text: str) -> None:
        seen.append(text)

    with pytest.raises(AgentError) as caught:
        await openai(make, openai_server).respond(ask("x"), on_partial)
    assert caught.value.user_message == UNREADABLE
    assert seen  # it did start
    assert await history(store) == []


async def test_openai_unreachable(make, store: Store, openai_server: OpenAIServer) -> None:
    agent = openai(make, openai_server, api_key=SECRET)
    await openai_server.stop()
    with pytest.raises(AgentError) as caught:
        await agent.respond(ask("x"))
    assert caught.value.user_message == UNREACHABLE
    assert_no_secret(caught.value)
    assert await agent.health() == UNREACHABLE
    assert await history(store) == []


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_timeout(make, store: Store, openai_server, stream: bool) -> None:
    openai_server.mode = "stall"
    agent = openai(make, openai_server, stream=stream, timeout_s=0.3)
    with pytest.raises(AgentError) as caught:
        await agent.respond(ask("x"))
    assert caught.value.user_message == TIMEOUT
    assert await history(store) == []


@pytest.mark.parametrize(
    ("mode", "delay_s"), [("keepalive", 0.01), ("keepalive", 0.0), ("endless", 0.01)]
)
async def test_openai_stream_that_never_ends_stops_at_the_deadline(
    make, store: Store, openai_server: OpenAIServer, mode: str, delay_s: float
) -> None:
    # Something arrives all the time, so no single read ever waits long: only a deadline
    # for the whole answer ends it.
    openai_server.mode = mode
    openai_server.chunk_delay_s = delay_s
    agent = openai(make, openai_server, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(AgentError) as caught:
        await asyncio.wait_for(agent.respond(ask("x"), None), 5)
    assert caught.value.key == "agent.timeout"
    assert caught.value.user_message == TIMEOUT
    assert time.monotonic() - started < 1.0
    assert await history(store) == []


async def test_the_stream_reader_keeps_its_deadline_when_no_read_waits() -> None:
    # Lines always at hand: aiohttp's time-out, which fires only while a read waits, never
    # would.
    async def endless_comments() -> AsyncIterator[bytes]:
        while True:
            yield b": keep-alive\n"
            yield b"\n"

    with pytest.raises(AgentError) as caught:
        async for _ in _sse_data(endless_comments(), time.monotonic() + 0.05):  # type: ignore[arg-type]
            pass
    assert caught.value.key == "agent.timeout"


async def test_openai_endless_stream_stops_at_the_answer_cap(
    make, store: Store, openai_server: OpenAIServer
) -> None:
    openai_server.mode = "endless"
    seen: list[str] = []

    async def on_partial(text: str) -> None:
        seen.append(text)

    agent = openai(make, openai_server, max_answer_chars=1000)
    with pytest.raises(AgentError) as caught:
        await asyncio.wait_for(agent.respond(ask("x"), on_partial), 5)
    assert (caught.value.key, caught.value.values) == ("agent.too_long", {"limit": 1000})
    assert "1000" in caught.value.user_message
    assert seen and max(len(text) for text in seen) <= 1000
    assert await history(store) == []


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_answer_cap_holds_streamed_or_not(
    make, store: Store, openai_server: OpenAIServer, stream: bool
) -> None:
    agent = openai(make, openai_server, stream=stream, max_answer_chars=1000)
    openai_server.reply_text = "y" * 1000
    assert (await agent.respond(ask("x"))).text == "y" * 1000  # the cap itself is allowed
    openai_server.reply_text = "y" * 1001
    with pytest.raises(AgentError) as caught:
        await agent.respond(ask("x"))
    assert caught.value.key == "agent.too_long"
    assert len(await history(store)) == 2  # only the first exchange


async def test_lambda_answer_cap(make, lambda_server: LambdaServer) -> None:
    agent = platform(make, lambda_server, max_answer_chars=1000)
    lambda_server.reply_text = "z" * 1001
    with pytest.raises(AgentError) as caught:
        await agent.respond(ask("x"))
    assert (caught.value.key, caught.value.values) == ("agent.too_long", {"limit": 1000})


@pytest.mark.parametrize("backend", ["openai", "lambda"])
@pytest.mark.parametrize("value", [0, -5, 2.5, True, "100"])
async def test_the_answer_cap_option_is_checked(make, backend: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"agents\.registry\.{backend}\.max_answer_chars"):
        make(backend, base_url="http://h/v1", model="m", max_answer_chars=value)


async def test_openai_retry_after_a_failure_adds_history_once(
    make, store: Store, openai_server: OpenAIServer
) -> None:
    agent = openai(make, openai_server)
    openai_server.mode = "fail"
    with pytest.raises(AgentError):
        await agent.respond(ask("x"))
    openai_server.mode = "ok"
    await agent.respond(ask("x"))
    assert openai_server.requests[1].json["messages"] == [{"role": "user", "content": "x"}]
    assert await history(store) == [("user", "x"), ("assistant", "reply to: x")]


async def test_openai_cancelled_mid_stream_writes_nothing(
    make, store: Store, openai_server: OpenAIServer
) -> None:
    openai_server.chunk_delay_s = 60  # the stream hangs after its first piece
    started = asyncio.Event()

    async def on_partial(text: str) -> None:
        started.set()

    task = asyncio.create_task(openai(make, openai_server).respond(ask("x"), on_partial))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await history(store) == []


async def test_openai_health(make, openai_server: OpenAIServer) -> None:
    agent = openai(make, openai_server, api_key=SECRET)
    assert await agent.health() is None
    assert openai_server.requests[-1].path == "/v1/models"
    openai_server.mode = "fail"
    assert await agent.health() == "The agent answered with an error (HTTP 500)."


async def test_secrets_stay_out_of_the_log(
    make, openai_server: OpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    openai_server.mode = "fail"
    agent = openai(make, openai_server, api_key=SECRET)
    await agent.health()
    with pytest.raises(AgentError):
        await agent.respond(ask("x"))
    assert "Health check failed" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"model": "m"}, "agents.registry.openai.base_url is required"),
        ({"base_url": "http://h/v1"}, "agents.registry.openai.model is required"),
        ({"base_url": "ftp://h", "model": "m"}, "base_url must be an http(s) URL"),
        ({"base_url": "http://u:p@h", "model": "m"}, "base_url must not hold credentials"),
        ({"base_url": "http://h", "model": "m", "timeout_s": 0}, "timeout_s must be a positive"),
        ({"base_url": "http://h", "model": "m", "stream": "yes"}, "stream must be true or false"),
        ({"base_url": "http://h", "model": "m", "max_history": -1}, "max_history must be"),
    ],
)
async def test_openai_options_are_checked(make, options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        make("openai", **options)


async def test_unknown_options_are_warned_about(make, caplog: pytest.LogCaptureFixture) -> None:
    make("echo", colour="blue")
    assert "Ignoring unknown option agents.registry.echo.colour" in caplog.text


async def test_unknown_backend(store: Store, http: aiohttp.ClientSession) -> None:
    with pytest.raises(ValueError, match="backend 'nope' is unknown"):
        create_agent(AgentSpec("x", "nope"), store, http, LOG)


# lambda


def platform(make, server: LambdaServer, **options: Any) -> Agent:
    return make("lambda", base_url=server.base_url, token=SECRET, **options)


async def test_lambda_message(make, lambda_server: LambdaServer) -> None:
    lambda_server.reply_attachments = ["surfaces/matrix/out/report.pdf"]
    chat = "room/1 ?#%x"  # every character that must be quoted in a path
    files = (Attachment("a.txt", "text/plain", 3, workspace_path="surfaces/matrix/u/r/inbox/a"),)
    reply = await platform(make, lambda_server).respond(ask("hello", chat=chat, files=files))
    assert reply == AgentReply("reply to: hello", ("surfaces/matrix/out/report.pdf",))
    [sent] = lambda_server.requests
    assert sent.method == "POST"
    assert sent.raw_path == "/v1/chats/room%2F1%20%3F%23%25x/messages"
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"
    assert sent.json == {
        "text": "hello",
        "user_id": "@alice:test",
        "attachments": [
            {
                "name": "a.txt",
                "mime_type": "text/plain",
                "size": 3,
                "workspace_path": "surfaces/matrix/u/r/inbox/a",
            }
        ],
    }
    assert list(lambda_server.chats) == [chat]


async def test_lambda_needs_the_workspace_for_files(make, lambda_server: LambdaServer) -> None:
    files = (Attachment("a.txt", "text/plain", 3, data=b"abc"),)
    with pytest.raises(AgentError) as caught:
        await platform(make, lambda_server).respond(ask("x", files=files))
    assert caught.value.key == "agent.no_workspace"
    assert lambda_server.requests == []


async def test_lambda_context_drop_snapshot_restore(make, lambda_server: LambdaServer) -> None:
    agent = platform(make, lambda_server)
    assert await agent.context(CHAT) == ContextInfo(0, 0)
    await agent.respond(ask("one"))
    await agent.respond(ask("two"))
    chars = len("one") + len("reply to: one") + len("two") + len("reply to: two")
    assert await agent.context(CHAT) == ContextInfo(4, chars)

    snapshot = await agent.snapshot(CHAT)
    await agent.restore("pc-2", snapshot)
    restore = lambda_server.requests[-1]
    assert restore.path == "/v1/chats/pc-2/restore"
    assert restore.json == {"snapshot": json.loads(snapshot)}
    assert await agent.context("pc-2") == ContextInfo(4, chars)

    await agent.drop(CHAT)
    assert lambda_server.requests[-1].method == "DELETE"
    assert await agent.context(CHAT) == ContextInfo(0, 0)
    await agent.drop(CHAT)  # 404 now: just as forgotten
    assert await agent.context("pc-2") == ContextInfo(4, chars)


async def test_lambda_refuses_a_snapshot_that_is_not_json(make, lambda_server) -> None:
    with pytest.raises(AgentError) as caught:
        await platform(make, lambda_server).restore(CHAT, "not json")
    assert caught.value.key == "agent.bad_snapshot"
    assert lambda_server.requests == []


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("fail", "The agent answered with an error (HTTP 502)."),
        ("garbage", UNREADABLE),
        ("shape", UNREADABLE),
        ("empty", EMPTY),
    ],
)
async def test_lambda_message_failures(
    make, lambda_server: LambdaServer, mode: str, message: str
) -> None:
    lambda_server.mode = mode
    lambda_server.status = 502
    with pytest.raises(AgentError) as caught:
        await platform(make, lambda_server).respond(ask("x"))
    assert caught.value.user_message == message
    assert_no_secret(caught.value)
    assert lambda_server.chats == {}


@pytest.mark.parametrize(
    ("call", "mode", "message"),
    [
        *((call, "fail", "(HTTP 500)") for call in ("drop", "context", "snapshot", "restore")),
        # Only these two read the answer's body.
        ("context", "garbage", UNREADABLE),
        ("snapshot", "garbage", UNREADABLE),
    ],
)
async def test_lambda_conversation_call_failures(
    make, lambda_server: LambdaServer, call: str, mode: str, message: str
) -> None:
    lambda_server.mode = mode
    agent = platform(make, lambda_server)
    args = (CHAT, "{}") if call == "restore" else (CHAT,)
    with pytest.raises(AgentError) as caught:
        await getattr(agent, call)(*args)
    assert message in caught.value.user_message
    assert_no_secret(caught.value)


async def test_lambda_wrong_token(make, lambda_server: LambdaServer) -> None:
    agent = make("lambda", base_url=lambda_server.base_url, token="wrong")
    with pytest.raises(AgentError) as caught:
        await agent.respond(ask("x"))
    assert caught.value.user_message == "The agent answered with an error (HTTP 401)."
    assert "wrong" not in str(caught.value)


async def test_lambda_unreachable_and_timeout(make, lambda_server: LambdaServer) -> None:
    lambda_server.mode = "stall"
    with pytest.raises(AgentError) as caught:
        await platform(make, lambda_server, timeout_s=0.3).respond(ask("x"))
    assert caught.value.user_message == TIMEOUT
    agent = platform(make, lambda_server)
    await lambda_server.stop()
    with pytest.raises(AgentError) as caught:
        await agent.respond(ask("x"))
    assert caught.value.user_message == UNREACHABLE


async def test_lambda_health(make, lambda_server: LambdaServer) -> None:
    agent = platform(make, lambda_server)
    assert await agent.health() is None
    assert lambda_server.requests[-1].path == "/v1/health"
    lambda_server.health_status = "starting"
    assert await agent.health() == "The agent platform reports status 'starting'."
    lambda_server.mode = "fail"
    assert await agent.health() == "The agent answered with an error (HTTP 500)."
    await lambda_server.stop()
    assert await agent.health() == UNREACHABLE


async def test_lambda_health_problem_leaks_no_part_of_the_token(
    make, lambda_server: LambdaServer
) -> None:
    # The status is cut to 40 characters: with 32 before it, the token straddles the cut.
    lambda_server.health_status = "y" * 32 + SECRET
    problem = await platform(make, lambda_server).health()
    assert problem is not None and "yyyy" in problem
    assert SECRET[:8] not in problem


# usage: what each answer cost, read where the backend says and never an error


GARBAGE_USAGE = [
    "many",
    [3, 4],
    {"prompt_tokens": 3},
    {"prompt_tokens": "3", "completion_tokens": 4},
    {"prompt_tokens": 3, "completion_tokens": -1},
    {"prompt_tokens": True, "completion_tokens": 4},
    {"prompt_tokens": 3, "completion_tokens": 4.0},
    {"prompt_tokens": 3, "completion_tokens": 10**13},
]


def test_usage_of_reads_whole_counts_only() -> None:
    assert Usage.of({"a": 0, "b": 7, "c": "x"}, "a", "b") == Usage(0, 7)
    assert Usage.of({"a": 10**12, "b": 1}, "a", "b") == Usage(10**12, 1)
    for data in [None, *GARBAGE_USAGE]:
        assert Usage.of(data, "prompt_tokens", "completion_tokens") is None, data


async def test_echo_counts_characters_as_tokens(make) -> None:
    reply = await make("echo").respond(ask("hello"))
    assert reply.usage == Usage(len("hello"), len(reply.text))


async def test_openai_streamed_answer_asks_for_and_reads_its_usage(
    make, openai_server: OpenAIServer
) -> None:
    reply = await openai(make, openai_server).respond(ask("hello"), None)
    assert openai_server.requests[0].json["stream_options"] == {"include_usage": True}
    assert reply.text == "reply to: hello"
    assert reply.usage == Usage(len("hello"), len("reply to: hello"))


async def test_openai_plain_answer_asks_for_no_stream_options(
    make, openai_server: OpenAIServer
) -> None:
    reply = await openai(make, openai_server, stream=False).respond(ask("hello"))
    assert "stream_options" not in openai_server.requests[0].json
    assert reply.usage == Usage(len("hello"), len("reply to: hello"))


async def test_openai_stream_usage_can_be_turned_off(make, openai_server: OpenAIServer) -> None:
    # For a server that refuses stream_options: nothing asked, nothing counted.
    reply = await openai(make, openai_server, stream_usage=False).respond(ask("hello"))
    assert "stream_options" not in openai_server.requests[0].json
    assert (reply.text, reply.usage) == ("reply to: hello", None)
    with pytest.raises(ValueError, match=r"agents\.registry\.openai\.stream_usage"):
        openai(make, openai_server, stream_usage="no")


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_without_usage_answers_all_the_same(
    make, store: Store, openai_server: OpenAIServer, stream: bool
) -> None:
    openai_server.usage = None
    reply = await openai(make, openai_server, stream=stream).respond(ask("x"))
    assert (reply.text, reply.usage) == ("reply to: x", None)
    assert len(await history(store)) == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("usage", GARBAGE_USAGE)
async def test_openai_garbage_usage_is_none_never_an_error(
    make, store: Store, openai_server: OpenAIServer, caplog, usage: Any, stream: bool
) -> None:
    openai_server.usage = usage
    agent = openai(make, openai_server, stream=stream, api_key=SECRET)
    for _ in range(2):
        reply = await agent.respond(ask("x"))
        assert (reply.text, reply.usage) == ("reply to: x", None)
    assert len(await history(store)) == 4
    assert caplog.text.count("reports usage that cannot be read") == 1  # once per agent
    assert SECRET not in caplog.text


async def test_lambda_answer_may_carry_its_usage(make, lambda_server: LambdaServer) -> None:
    agent = platform(make, lambda_server)
    assert (await agent.respond(ask("x"))).usage is None  # optional: older platforms
    lambda_server.reply_usage = {"tokens_in": 120, "tokens_out": 35}
    reply = await agent.respond(ask("x"))
    assert reply == AgentReply("reply to: x", (), Usage(120, 35))


@pytest.mark.parametrize(
    "usage",
    ["lots", {"tokens_in": 1}, {"tokens_in": -1, "tokens_out": 2}, {"prompt_tokens": 1}],
)
async def test_lambda_garbage_usage_is_none(make, lambda_server: LambdaServer, usage) -> None:
    lambda_server.reply_usage = usage
    reply = await platform(make, lambda_server).respond(ask("x"))
    assert (reply.text, reply.usage) == ("reply to: x", None)


@pytest.mark.parametrize("backend", ["echo", "openai", "lambda"])
async def test_every_agent_takes_a_transcription_option(
    make, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Read by the plugin (Settings), not the backend: no "unknown option" warning for it.
    make(backend, base_url="http://h/v1", model="m", transcription=False)
    assert "transcription" not in caplog.text


async def test_lambda_sends_the_message_id_as_its_idempotency_key(
    make, lambda_server: LambdaServer
) -> None:
    agent = platform(make, lambda_server)
    await agent.respond(replace(ask("hello"), message_id="$event:test"))
    await agent.respond(ask("no id"))  # a request without one (a !new --from, say) has none
    first, second = lambda_server.requests
    assert first.json["message_id"] == "$event:test"
    assert "message_id" not in second.json


@pytest.mark.parametrize("backend", ["echo", "openai"])
async def test_a_message_asked_again_replaces_its_turn_never_doubles_it(
    make, store: Store, openai_server: OpenAIServer, backend: str
) -> None:
    agent = make("echo") if backend == "echo" else openai(make, openai_server, stream=False)
    first = replace(ask("one"), message_id="$1")
    await agent.respond(first)
    await agent.respond(replace(ask("two"), message_id="$2"))
    again = await agent.respond(replace(ask("two"), message_id="$2"))  # after a crash
    assert [text for role, text in await history(store) if role == "user"] == ["one", "two"]
    if backend == "echo":
        assert "(message 2 " in again.text
    else:  # the re-ask's prompt holds the earlier turns, not its own first attempt
        assert openai_server.requests[-1].json["messages"] == [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "reply to: one"},
            {"role": "user", "content": "two"},
        ]


async def test_lambda_names_the_turn_an_edit_replaces(make, lambda_server: LambdaServer) -> None:
    agent = platform(make, lambda_server)
    await agent.respond(replace(ask("hello"), message_id="$edit", replaces="$original"))
    await agent.respond(replace(ask("hi"), message_id="$new"))  # no edit: no replaces
    first, second = lambda_server.requests
    assert (first.json["message_id"], first.json["replaces"]) == ("$edit", "$original")
    assert "replaces" not in second.json


@pytest.mark.parametrize("backend", ["echo", "openai"])
async def test_an_edit_replaces_the_last_turn_of_the_conversation(
    make, store: Store, openai_server: OpenAIServer, backend: str
) -> None:
    agent = make("echo") if backend == "echo" else openai(make, openai_server, stream=False)
    await agent.respond(replace(ask("one"), message_id="$1"))
    await agent.respond(replace(ask("two"), message_id="$2"))
    edited = await agent.respond(replace(ask("deux"), message_id="$e", replaces="$2"))
    again = await agent.respond(replace(ask("zwei"), message_id="$e2", replaces="$2"))
    assert [text for role, text in await history(store) if role == "user"] == ["one", "zwei"]
    if backend == "echo":
        assert "(message 2 " in edited.text and "(message 2 " in again.text
    else:  # the edit's prompt holds the turns before it, not the text it replaces
        assert openai_server.requests[-1].json["messages"] == [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "reply to: one"},
            {"role": "user", "content": "zwei"},
        ]
