"""Voice messages: transcribed through an OpenAI-compatible /audio/transcriptions endpoint
(``transcription`` in the config, per agent overridable), shown in the room as a quoted
notice, and handed to the agent as the user's text."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from . import files
from .agent_config import TranscriptionSpec
from .intake import ABOUT, Incoming
from .matrix import Matrix
from .notices import Notices
from .part import Part
from .transcription import Transcriber

AUDIO = "m.audio"
SHOWN_CHARS = 4000


def is_voice(incoming: Incoming) -> bool:
    """An audio message (Element's voice messages are m.audio with
    org.matrix.msc3245.voice): what is transcribed, when a transcriber is configured."""
    return incoming.file is not None and incoming.file.get("msgtype") == AUDIO


@dataclass(eq=False, kw_only=True)
class Voice(Part):
    """Turns a voice message into the user's text."""

    mx: Matrix
    notices: Notices
    http: aiohttp.ClientSession

    async def transcript(self, incoming: Incoming, spec: TranscriptionSpec) -> str:
        """The message's words, shown in the room as a quote. Raises FileRefused (the audio
        could not be fetched, or is too long; the transcript is longer than a typed message
        may be: ``access.max_message_chars``, refused the same way, before it is shown) or
        TranscriptionError (an AgentError)."""
        settings = self.settings()
        audio = await files.fetch_inline(
            self.mx, incoming.file, min(spec.max_bytes, settings.max_file_bytes),
            deadline_s=settings.download_timeout_s,
        )  # fmt: skip
        transcriber = Transcriber(spec, self.http, self.log)
        text = await transcriber.transcribe(audio.data or b"", audio.name, audio.mime_type)
        if len(text) > settings.max_message_chars:
            cause = f"the transcript has {len(text)} characters > {settings.max_message_chars}"
            raise files.FileRefused(
                "voice.too_long", cause, chars=len(text), max=settings.max_message_chars
            )
        # Shown, not the answer (marked as work on the message): at most SHOWN_CHARS, so it
        # always fits one event; the agent gets all of it.
        shown = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + " …"
        quoted = "\n".join(f"> {line}" for line in shown.splitlines() or [""])
        text_shown = self.notices.text("voice.transcript", text=quoted)
        await self.notices.send(
            incoming.room_id, text_shown, reply_to=incoming.event_id, field=ABOUT
        )
        return text
