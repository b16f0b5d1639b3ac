"""What every agent backend offers the router, and the pieces the backends share.

An agent answers one message of one conversation at a time; the conversation is named by
its ``platform_chat_id`` only. Every failure an agent can have reaches the router as an
:class:`AgentError`, whose ``user_message`` is safe to show in the room.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from ..agent_config import AgentOptions, AgentSpec
from ..db import Store
from ..texts import TEXTS, text

# English texts of every AgentError, by key (texts.py holds them, with their translations).
ERROR_TEXTS: dict[str, str] = {k: v for k, v in TEXTS["en"].items() if k.startswith("agent.")}

# The default of each agent's max_answer_chars: longer answers are refused.
MAX_ANSWER_CHARS = 400_000  # about 35 events: long answers are split, runaway ones stopped
# Options the plugin reads for every agent, whatever its backend.
COMMON_OPTIONS = ("transcription",)
# More tokens than any one answer can cost: a count past it is garbage, not usage.
MAX_USAGE_TOKENS = 10**12


@dataclass(frozen=True)
class Attachment:
    name: str
    mime_type: str
    size: int
    # Relative path under the shared workspace root, when one is configured.
    workspace_path: str | None = None
    # Inline bytes when no workspace is configured (only the openai backend takes them).
    data: bytes | None = None


@dataclass(frozen=True)
class AgentRequest:
    platform_chat_id: str
    text: str
    user_id: str
    attachments: tuple[Attachment, ...] = ()
    # The Matrix event id of the message: asked again (after a crash), it is the same turn.
    message_id: str = ""
    # The message whose turn this one replaces (an edit's original, the message a 🔁 is
    # for): the conversation's last turn, answered again.
    replaces: str = ""

    @property
    def turn(self) -> str:
        """The conversation turn it is: the one it replaces, else its own."""
        return self.replaces or self.message_id


@dataclass(frozen=True)
class Usage:
    """What one answer cost, in the agent's own tokens."""

    tokens_in: int
    tokens_out: int

    @classmethod
    def of(cls, data: Any, in_key: str, out_key: str) -> Usage | None:
        """``data[in_key]`` and ``data[out_key]`` as a Usage when ``data`` is a map holding
        both as whole numbers from 0 to MAX_USAGE_TOKENS; anything else is None."""
        if not isinstance(data, dict):
            return None
        tokens_in, tokens_out = data.get(in_key), data.get(out_key)
        if _is_count(tokens_in) and _is_count(tokens_out):
            return cls(tokens_in, tokens_out)
        return None


def _is_count(value: Any) -> TypeGuard[int]:
    # bool is an int to Python, never a count to us.
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return 0 <= value <= MAX_USAGE_TOKENS


@dataclass(frozen=True)
class AgentReply:
    text: str
    # Relative workspace paths of files the agent returns; the router checks and uploads them.
    attachments: tuple[str, ...] = ()
    # What the answer cost, when the agent says (None: it did not, or not readably).
    usage: Usage | None = None


@dataclass(frozen=True)
class ContextInfo:
    messages: int
    chars: int
    pruned: int = 0  # older turns the plugin pruned of its history (history.max_turns/max_kb)


class AgentError(Exception):
    """An agent failed.

    ``user_message`` is short and safe to show in the room (never a secret, a URL or a
    token); ``key`` and ``values`` name the same text in :data:`ERROR_TEXTS` for
    translation, and :meth:`describe` gives it in the user's language; ``str(error)`` is
    the cause, for the log (secrets already redacted).
    """

    def __init__(
        self,
        user_message: str,
        cause: str,
        *,
        key: str = "agent.failed",
        values: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cause)
        self.user_message = user_message
        self.cause = cause
        self.key = key
        self.values = values or {}

    @classmethod
    def of(cls, key: str, cause: str, **values: Any) -> AgentError:
        return cls(ERROR_TEXTS[key].format(**values), cause, key=key, values=values)

    def describe(self, language: str) -> str:
        """The error as the user reads it: the text of ``key`` in ``language`` with
        ``values``, else (no key, or one texts.py does not hold) ``user_message``."""
        if self.key and self.key in TEXTS["en"]:
            try:
                if not self.values:  # text() leaves a text unformatted when given no values
                    return text(language, self.key).format()
                return text(language, self.key, **self.values)
            except (LookupError, ValueError):
                pass  # values that do not fit the text: the English message still does
        return self.user_message


# Called with the whole text so far while an answer streams.
PartialCallback = Callable[[str], Awaitable[None]]


class Agent(ABC):
    """One configured agent; the router keeps one instance per registry entry."""

    backend: str
    # The option keys this backend reads; others get a warning.
    OPTIONS: tuple[str, ...] = ()

    def __init__(self, spec: AgentSpec, log: logging.Logger) -> None:
        self.agent_id = spec.agent_id
        self.log = log
        self._usage_warned = False
        AgentOptions(spec).warn_unknown(log, (*self.OPTIONS, *COMMON_OPTIONS))

    def read_usage(self, data: Any, in_key: str, out_key: str) -> Usage | None:
        """The usage an answer reports in ``data``. Usage is optional: an absent one is
        None, and so is an unreadable one, never an error (said once in the log)."""
        usage = Usage.of(data, in_key, out_key)
        if usage is None and data is not None and not self._usage_warned:
            self._usage_warned = True
            self.log.warning("Agent %s reports usage that cannot be read", self.agent_id)
        return usage

    @abstractmethod
    async def respond(
        self, request: AgentRequest, on_partial: PartialCallback | None = None
    ) -> AgentReply:
        """Answers one message. Cancelling the task leaves the conversation unchanged."""

    @abstractmethod
    async def drop(self, platform_chat_id: str) -> None:
        """Forgets a conversation (``!clear``); forgetting an unknown one is no error."""

    @abstractmethod
    async def context(self, platform_chat_id: str) -> ContextInfo: ...

    @abstractmethod
    async def snapshot(self, platform_chat_id: str) -> str:
        """The conversation as opaque JSON text, for the plugin to store under a name."""

    @abstractmethod
    async def restore(self, platform_chat_id: str, snapshot: str) -> None:
        """Makes a new conversation continue from a snapshot this backend made."""

    @abstractmethod
    async def health(self) -> str | None:
        """None when the agent works, else a short problem text (safe to show admins)."""

    async def close(self) -> None:  # noqa: B027 - deliberately empty: most agents hold nothing
        pass


class StoreAgent(Agent):
    """An agent whose conversations are kept as history rows in the plugin database."""

    def __init__(self, spec: AgentSpec, store: Store, log: logging.Logger) -> None:
        super().__init__(spec, log)
        self.store = store

    async def remember(self, request: AgentRequest, user_text: str, answer: str) -> None:
        # One atomic write after the whole answer: a failed or cancelled attempt leaves no
        # half exchange behind, and a message asked again (after a crash between this write
        # and the answer's send), edited or regenerated replaces its turn: history never
        # holds a turn twice.
        await self.store.append_history(
            request.platform_chat_id,
            [("user", user_text), ("assistant", answer)],
            message_id=request.turn,
        )

    async def drop(self, platform_chat_id: str) -> None:
        await self.store.drop_history(platform_chat_id)

    async def context(self, platform_chat_id: str) -> ContextInfo:
        size = await self.store.history_size(platform_chat_id)  # sums: one row read
        return ContextInfo(messages=size.turns, chars=size.chars, pruned=size.pruned)

    async def snapshot(self, platform_chat_id: str) -> str:
        rows = await self.store.history(platform_chat_id)  # bounded: history.max_turns
        messages = [{"role": row.role, "content": row.content} for row in rows]
        return json.dumps({"version": 1, "messages": messages}, ensure_ascii=False)

    async def restore(self, platform_chat_id: str, snapshot: str) -> None:
        messages = _history_of(snapshot)
        await self.store.drop_history(platform_chat_id)
        if messages:
            await self.store.append_history(platform_chat_id, messages)


def _history_of(snapshot: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(snapshot)
        messages = [(m["role"], m["content"]) for m in data["messages"]]
    except (ValueError, TypeError, KeyError) as e:
        raise AgentError.of("agent.bad_snapshot", f"snapshot is not a history: {e!r}") from e
    if not all(isinstance(r, str) and isinstance(c, str) for r, c in messages):
        raise AgentError.of("agent.bad_snapshot", "snapshot history holds non-text entries")
    return messages


def check_length(answer: str, limit: int) -> None:
    """Refuses an answer longer than an agent's max_answer_chars."""
    if len(answer) > limit:
        cause = f"the answer has more than {limit} characters (max_answer_chars)"
        raise AgentError.of("agent.too_long", cause, limit=limit)
