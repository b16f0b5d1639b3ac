"""Voice messages into text, through an OpenAI-compatible ``POST {base_url}/audio/transcriptions``
(OpenAI, a local whisper server, LiteLLM, ...).

Every failure reaches the caller as a :class:`TranscriptionError`. It is an AgentError, so
the room gets the same kind of short, translated notice (and ``!retry``) as when an agent
fails, and ``str(error)`` is a cause for the log with the API key already redacted.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import posixpath
import re
from typing import Any

import aiohttp

from .agent_config import TranscriptionSpec
from .agents.base import AgentError
from .agents.http import HttpClient, read_body
from .texts import TEXTS

# The longest answer read: the transcript of the longest audio accepted is far shorter.
MAX_ANSWER_BYTES = 1024 * 1024

# The errors the HTTP client raises (as an agent's), as the transcription errors they are.
_FROM_AGENT = {
    "agent.unreachable": "transcription.unreachable",
    "agent.timeout": "transcription.timeout",
    "agent.http_error": "transcription.http_error",
    "agent.unreadable": "transcription.unreadable",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Endpoints tell the audio's format by the file name's extension: one is added when missing.
_EXTENSIONS = {
    "audio/ogg": ".ogg",
    "audio/opus": ".ogg",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
    "audio/mp4": ".m4a",
    "audio/x-m4a": ".m4a",
    "audio/aac": ".m4a",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/webm": ".webm",
    "audio/flac": ".flac",
}


class TranscriptionError(AgentError):
    """Transcribing failed. ``key`` (a ``transcription.*`` text) and ``values`` give the
    user's text, ``describe(language)`` it in their language; ``str(error)`` is the
    log-safe cause."""

    @classmethod
    def of(cls, key: str, cause: str, **values: Any) -> TranscriptionError:
        template = TEXTS["en"][key]
        return cls(template.format(**values), cause, key=key, values=values)


class Transcriber:
    """One configured transcription endpoint; it holds nothing but maubot's session."""

    def __init__(
        self, spec: TranscriptionSpec, http: aiohttp.ClientSession, log: logging.Logger
    ) -> None:
        self.spec = spec
        self.log = log
        # The key travels in the Authorization header only, and is redacted from causes.
        self.client = HttpClient(
            http, spec.base_url, log, secret=spec.api_key, timeout_s=spec.timeout_s
        )

    async def transcribe(self, data: bytes, filename: str, mime_type: str) -> str:
        """The text spoken in the audio ``data``; TranscriptionError on any failure.

        Audio over ``max_mb`` is refused before anything is sent; ``timeout_s`` bounds the
        whole request, the answer's reading included."""
        if len(data) > self.spec.max_bytes:
            max_mb = f"{self.spec.max_mb:g}"
            cause = f"the audio has {len(data)} bytes, more than max_mb ({max_mb})"
            raise TranscriptionError.of("transcription.too_large", cause, max_mb=max_mb)
        url = self.client.url("audio", "transcriptions")
        form = self._form(data, filename, mime_type)
        try:
            async with self.client.request("POST", url, form=form) as resp:
                answer = json.loads(await read_body(resp, MAX_ANSWER_BYTES))
        except AgentError as e:
            key = _FROM_AGENT.get(e.key, "transcription.unreadable")
            raise TranscriptionError.of(key, e.cause, **e.values) from e
        text = self._text(answer)
        self.log.debug("Transcribed %d bytes of audio into %d characters", len(data), len(text))
        return text

    def _form(self, data: bytes, filename: str, mime_type: str) -> aiohttp.FormData:
        mime = mime_type.split(";")[0].strip().lower() or "application/octet-stream"
        form = aiohttp.FormData()
        form.add_field("file", data, filename=_upload_name(filename, mime), content_type=mime)
        form.add_field("model", self.spec.model)
        form.add_field("response_format", "json")
        return form

    def _text(self, answer: Any) -> str:
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            cause = f'expected {{"text": ...}}, got {self.client.brief(answer)}'
            raise TranscriptionError.of("transcription.unreadable", cause)
        text = text.strip()
        if not text:
            raise TranscriptionError.of("transcription.empty", "the transcript is empty")
        return text


def _upload_name(filename: str, mime: str) -> str:
    """The file's name as sent: no path, plain ASCII (every other character an underscore,
    so no endpoint trips on its quoting), with an extension for ``mime`` when it has none."""
    stem, extension = posixpath.splitext(posixpath.basename(filename.replace("\\", "/")))
    stem = _UNSAFE.sub("_", stem).strip("._") or "audio"
    extension = _UNSAFE.sub("", extension)
    if len(extension) < 2:
        extension = _EXTENSIONS.get(mime) or mimetypes.guess_extension(mime) or ""
    return stem + extension
