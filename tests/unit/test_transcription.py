"""The transcription client against the local OpenAI-compatible test server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from lambda_plugin.agent_config import TranscriptionSpec
from lambda_plugin.agents import AgentError
from lambda_plugin.files import FileRefused
from lambda_plugin.intake import Incoming, Kind
from lambda_plugin.notices import Notices
from lambda_plugin.texts import TEXTS
from lambda_plugin.transcription import (
    MAX_ANSWER_BYTES,
    Transcriber,
    TranscriptionError,
)
from lambda_plugin.voice import Voice
from tests.servers import FormFile
from tests.servers.openai_server import OpenAIServer
from tests.unit.fake_media import (
    ROOM,
    USER,
    FakeMedia,
    hs_fixture,  # noqa: F401  (the fixture hs)
    mx_fixture,  # noqa: F401  (the fixture mx)
)
from tests.unit.test_config import settings as make_settings

LOG = logging.getLogger("test.transcription")
SECRET = "sk-transcribe-secret-456"
OGG = b"OggS\x00\x02 fake opus audio \r\n\x00\xff" * 10


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def server() -> AsyncIterator[OpenAIServer]:
    server = OpenAIServer()
    server.transcript = "Hello from a voice message."
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def make(http: aiohttp.ClientSession, server: OpenAIServer):
    def build(**options: Any) -> Transcriber:
        options.setdefault("api_key", SECRET)
        options.setdefault("timeout_s", 10.0)
        spec = TranscriptionSpec(URL(server.base_url), "whisper-1", **options)
        return Transcriber(spec, http, LOG)

    return build


def assert_no_secret(error: AgentError) -> None:
    for text in (error.user_message, str(error), repr(error), error.cause, error.describe("ru")):
        assert SECRET not in text


async def test_transcribes_a_voice_message(make, server: OpenAIServer) -> None:
    text = await make().transcribe(OGG, "Voice message.ogg", "audio/ogg")
    assert text == "Hello from a voice message."
    [sent] = server.requests
    assert (sent.method, sent.path) == ("POST", "/v1/audio/transcriptions")
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"
    assert sent.form == {
        "file": FormFile("Voice_message.ogg", "audio/ogg", OGG),
        "model": "whisper-1",
        "response_format": "json",
    }


async def test_without_a_key_no_authorization_is_sent(make, server: OpenAIServer) -> None:
    await make(api_key=None).transcribe(OGG, "v.ogg", "audio/ogg")
    assert "Authorization" not in server.requests[0].headers


@pytest.mark.parametrize(
    ("filename", "mime_type", "sent_name", "sent_type"),
    [
        # Element's voice messages are named without an extension; endpoints need one.
        ("Voice message", "audio/ogg; codecs=opus", "Voice_message.ogg", "audio/ogg"),
        ("memo", "audio/mp4", "memo.m4a", "audio/mp4"),
        ("../../etc/passwd", "audio/mpeg", "passwd.mp3", "audio/mpeg"),
        ("C:\\Users\\a\\rec.wav", "audio/wav", "rec.wav", "audio/wav"),
        ("", "audio/webm", "audio.webm", "audio/webm"),
        ("bad\nname\x00.ogg", "AUDIO/OGG", "bad_name.ogg", "audio/ogg"),
        ("Голос.ogg", "audio/ogg", "audio.ogg", "audio/ogg"),
        ("..", "audio/ogg", "audio.ogg", "audio/ogg"),
        ("clip", "", "clip.bin", "application/octet-stream"),
    ],
)
async def test_the_file_is_named_for_the_endpoint(
    make, server: OpenAIServer, filename: str, mime_type: str, sent_name: str, sent_type: str
) -> None:
    await make().transcribe(OGG, filename, mime_type)
    file = server.requests[0].form["file"]
    assert (file.filename, file.content_type, file.data) == (sent_name, sent_type, OGG)


async def test_the_transcript_is_stripped(make, server: OpenAIServer) -> None:
    server.transcript = "  Hi there.\n"
    assert await make().transcribe(OGG, "v.ogg", "audio/ogg") == "Hi there."


async def test_audio_over_max_mb_is_refused_before_sending(make, server: OpenAIServer) -> None:
    transcriber = make(max_mb=0.001)  # 1048 bytes
    assert await transcriber.transcribe(b"a" * 1048, "v.ogg", "audio/ogg")  # the limit itself
    with pytest.raises(TranscriptionError) as caught:
        await transcriber.transcribe(b"a" * 1049, "v.ogg", "audio/ogg")
    error = caught.value
    assert (error.key, error.values) == ("transcription.too_large", {"max_mb": "0.001"})
    assert "0.001 MB" in error.user_message
    assert len(server.requests) == 1  # only the first


async def test_audio_of_many_megabytes_goes_through(make, server: OpenAIServer) -> None:
    audio = bytes(range(256)) * 12_000  # about 3 MB
    assert await make().transcribe(audio, "long.ogg", "audio/ogg")
    assert server.requests[0].form["file"].data == audio


FAILURES = [
    ("fail", "transcription.http_error", {"status": 503}),
    ("garbage", "transcription.unreadable", {}),
    ("shape", "transcription.unreadable", {}),
    ("empty", "transcription.empty", {}),
]


@pytest.mark.parametrize(("mode", "key", "values"), FAILURES)
async def test_failures_are_transcription_errors(
    make, server: OpenAIServer, mode: str, key: str, values: dict[str, Any]
) -> None:
    server.transcription_mode = mode
    server.transcription_status = 503
    with pytest.raises(TranscriptionError) as caught:
        await make().transcribe(OGG, "v.ogg", "audio/ogg")
    error = caught.value
    assert isinstance(error, AgentError)  # the router's agent-failure path takes it as is
    assert (error.key, error.values) == (key, values)
    assert error.user_message == TEXTS["en"][key].format(**values)
    assert error.describe("en") == error.user_message
    assert_no_secret(error)


async def test_a_blank_transcript_is_empty(make, server: OpenAIServer) -> None:
    server.transcript = " \n\t "
    with pytest.raises(TranscriptionError) as caught:
        await make().transcribe(OGG, "v.ogg", "audio/ogg")
    assert caught.value.key == "transcription.empty"


async def test_an_error_cause_is_redacted(make, server: OpenAIServer, caplog) -> None:
    # The server echoes the Authorization header in its error body.
    caplog.set_level(logging.DEBUG)
    server.transcription_mode = "fail"
    server.transcription_status = 401
    with pytest.raises(TranscriptionError) as caught:
        await make().transcribe(OGG, "v.ogg", "audio/ogg")
    cause = str(caught.value)
    assert "HTTP 401" in cause and "Bearer ***" in cause and "/v1/audio/transcriptions" in cause
    assert_no_secret(caught.value)
    assert SECRET not in caplog.text


async def test_a_slow_service_times_out_as_a_whole(make, server: OpenAIServer) -> None:
    server.transcription_mode = "slow"
    started = time.monotonic()
    with pytest.raises(TranscriptionError) as caught:
        await asyncio.wait_for(make(timeout_s=0.3).transcribe(OGG, "v.ogg", "audio/ogg"), 5)
    assert caught.value.key == "transcription.timeout"
    assert time.monotonic() - started < 2.0


async def test_a_service_that_is_down_is_unreachable(make, server: OpenAIServer) -> None:
    transcriber = make()
    await server.stop()
    with pytest.raises(TranscriptionError) as caught:
        await transcriber.transcribe(OGG, "v.ogg", "audio/ogg")
    assert caught.value.key == "transcription.unreachable"
    assert_no_secret(caught.value)


async def test_an_oversized_answer_is_unreadable(make, server: OpenAIServer) -> None:
    server.transcript = "y" * MAX_ANSWER_BYTES
    with pytest.raises(TranscriptionError) as caught:
        await make().transcribe(OGG, "v.ogg", "audio/ogg")
    assert caught.value.key == "transcription.unreadable"


async def test_cancelling_is_not_an_error(make, server: OpenAIServer) -> None:
    server.transcription_mode = "slow"
    task = asyncio.create_task(make().transcribe(OGG, "v.ogg", "audio/ogg"))
    await server.wait_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_every_error_text_formats_and_is_translated() -> None:
    values = {"max_mb": "25", "status": 500}
    keys = [key for key in TEXTS["en"] if key.startswith("transcription.")]
    assert len(keys) == 6
    for key in keys:
        error = TranscriptionError.of(key, "cause", **values)
        assert error.describe("ru") == TEXTS["ru"][key].format(**values)


# A transcript is held to access.max_message_chars, like a typed message.

MAX_CHARS = 50


def voice_part(mx: Any, http: aiohttp.ClientSession) -> Voice:
    settings = make_settings(access__max_message_chars=MAX_CHARS)
    return Voice(
        mx=mx, notices=Notices(mx, lambda: settings), http=http, settings=lambda: settings,
        log=LOG,
    )  # fmt: skip


def voice_message(hs: FakeMedia) -> Incoming:
    hs.media["voice1"] = OGG
    content = {
        "msgtype": "m.audio", "body": "Voice message.ogg", "url": "mxc://example.org/voice1",
        "info": {"mimetype": "audio/ogg", "size": len(OGG)},
    }  # fmt: skip
    return Incoming(Kind.MESSAGE, "$voice", ROOM, USER, "Voice message.ogg", file=content)


@pytest.mark.parametrize("chars", [MAX_CHARS, MAX_CHARS + 1, 100_000])
async def test_a_transcript_is_held_to_max_message_chars(
    hs: FakeMedia, mx: Any, http: aiohttp.ClientSession, server: OpenAIServer, chars: int
) -> None:
    server.transcript = "я" * chars
    spec = TranscriptionSpec(URL(server.base_url), "whisper-1", api_key=SECRET, timeout_s=10.0)
    voice = voice_part(mx, http)
    if chars <= MAX_CHARS:
        assert await voice.transcript(voice_message(hs), spec) == server.transcript
        [(_, heard)] = hs.sent  # the transcript quoted in the room
        assert heard["body"].startswith(TEXTS["en"]["voice.transcript"].split("\n")[0])
        return
    with pytest.raises(FileRefused) as refused:
        await voice.transcript(voice_message(hs), spec)
    assert refused.value.key == "voice.too_long"
    for language in ("en", "ru"):
        said = refused.value.message(language)
        assert str(MAX_CHARS) in said and str(chars) in said
    assert hs.sent == []  # nothing said yet: the answer stage says why, and nothing is asked
